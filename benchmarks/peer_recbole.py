"""The peer side by side, in one run (issue 11, item 5): RecBole 1.2.1 SASRec / GRU4Rec and
this project's SASRec / GRU4Rec on exactly the same split, scored by the same metric code.

1. The demo tables (``--tables``) are split by ``pipeline.split.build_split`` (leave-one-out
   by time) and written as RecBole atomic files (``benchmarks/peer/atomic.py``: benchmark-file
   mode, train = every prefix of the training sequence -> next item, valid = training
   sequence -> valid item, test = training + valid -> test item; histories cut to 50).
2. For each model, RecBole trains in its own venv (``.peer-venv/bin/python
   benchmarks/peer/recbole_runner.py``; RecBole's default hyper-parameters, CE loss, full
   ranking, valid NDCG@10, stopping_step 10, 1 torch thread) under ``--budget-min`` minutes,
   and dumps its best checkpoint's full score matrices (valid and test users x all items).
3. Those scores are mapped back to this project's item / user order (RecBole's
   ``field2id_token``) and ranked by ``pipeline.metrics`` under the three history-exclusion
   rules ``none`` / ``window`` / ``all`` (pessimistic ties, repeat targets rankable).
4. This project's model trains with ``pipeline.train.train`` (item IDs, eval exclude
   ``all``, same budget, patience 10, 1 torch thread; GRU4Rec with its grid cell's settings,
   ``OURS``); its saved best checkpoint is scored
   under the three rules by ``pipeline.train.evaluate_checkpoint``.
5. Time to the peer's best: the wall time (seconds since the training loop started,
   validation included, summed from ``history.csv``) at which our validation NDCG@10 (rule
   ``all``) first reaches RecBole's best checkpoint's validation NDCG@10 under rule ``all``,
   against RecBole's wall time (since ``fit`` started, validation included) to its best
   epoch (the first epoch reaching RecBole's best value: RecBole also saves on ties, so its
   checkpoint may come from a later epoch with the same value, reported as
   ``checkpoint_epoch`` / ``checkpoint_reached_s``). Issue 11 target: ours <= 1/4 of
   RecBole's.

Run from the repository root (``make peer`` builds ``.peer-venv`` first)::

    .venv/bin/python benchmarks/peer_recbole.py                    # 2 x 2 x 15 min budgets
    .venv/bin/python benchmarks/peer_recbole.py --budget-min 3 --models sasrec   # smoke

Prints a table per model and writes ``benchmarks/results/peer_recbole.json`` (figures,
machine, versions, date, command). Work files go to ``--work`` (``outputs/peer``).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RESULTS = ROOT / "benchmarks" / "results" / "peer_recbole.json"
PEER_NAMES = {"sasrec": "SASRec", "gru4rec": "GRU4Rec"}
RULES = ("none", "window", "all")
# this project's models as the experiments grid trains them (pipeline.experiments): SASRec
# with TrainConfig's defaults; GRU4Rec as its grid cell (embedding dropout 0.3, early
# stopping that waits out its popularity plateau) at the grid's lr and batch size
OURS: dict[str, dict[str, Any]] = {
    "sasrec": {},
    "gru4rec": {"lr": 3e-3, "batch_size": 128, "dropout": 0.3, "min_epochs": 30},
}
KEYS = ("HR@10", "NDCG@10")


def first_reach(history_csv: Path, target: float, metric: str = "NDCG@10") -> dict[str, Any]:
    """When a run's validation ``metric`` first reached ``target``.

    Args:
        history_csv: ``history.csv`` of a ``pipeline.train`` run (columns ``epoch``,
            ``metric``, ``validated``, ``seconds``; seconds = the epoch's training plus
            validation wall time).
        target: the value to reach.

    Returns:
        ``{"epoch": int | None, "seconds": cumulative seconds at that epoch (None if never
        reached), "best": the run's best validated value, "best_epoch", "best_seconds",
        "total_seconds"}``.

    Raises:
        InputDataError: the file lacks a column (names the file).
    """
    from pipeline.errors import InputDataError
    with open(history_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"epoch", metric, "validated", "seconds"} <= set(rows[0]):
        raise InputDataError(f"history lacks epoch / {metric} / validated / seconds",
                             path=history_csv)
    elapsed, hit, best, best_at = 0.0, None, -1.0, (None, None)
    for r in rows:
        elapsed += float(r["seconds"])
        if r["validated"] not in ("1", "True") or r[metric] == "":
            continue
        v = float(r[metric])
        if v > best:
            best, best_at = v, (int(r["epoch"]), round(elapsed, 2))
        if hit is None and v >= target:
            hit = (int(r["epoch"]), round(elapsed, 2))
    return {"epoch": hit[0] if hit else None, "seconds": hit[1] if hit else None,
            "best": best, "best_epoch": best_at[0], "best_seconds": best_at[1],
            "total_seconds": round(elapsed, 2)}


def run_peer(model: str, atomic_root: Path, out: Path, budget_s: float, peer_python: Path,
             threads: int, seed: int) -> dict[str, Any]:
    """Train RecBole's ``model`` in the peer venv; returns its ``summary.json``.

    Raises: FileNotFoundError if ``peer_python`` is missing (run ``make peer``);
    RuntimeError if the runner fails (with the tail of its output).
    """
    if not peer_python.exists():
        raise FileNotFoundError(f"{peer_python} is missing: build the peer venv with `make peer`")
    cmd = [str(peer_python), str(ROOT / "benchmarks" / "peer" / "recbole_runner.py"),
           "--data-dir", str(atomic_root), "--model", PEER_NAMES[model], "--budget-s",
           str(budget_s), "--out", str(out), "--threads", str(threads), "--seed", str(seed)]
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    env.pop("PYENV_VERSION", None)
    print(f"  RecBole {PEER_NAMES[model]}: training (budget {budget_s:.0f} s) ...", flush=True)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (out / "runner.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"RecBole runner failed ({p.returncode}); see {out / 'runner.log'}:\n"
                           + (p.stdout + p.stderr)[-3000:])
    return json.loads((out / "summary.json").read_text())


def score_peer(out: Path, split: Any, max_len: int) -> dict[str, dict[str, dict[str, float]]]:
    """RecBole's dumped score matrices ranked by this project's metrics, per stage and rule.

    Returns: ``{"valid" | "test": {rule: metrics}}``.
    """
    import numpy as np

    from benchmarks.peer.atomic import metrics_from_score_matrix, scores_in_our_order
    res: dict[str, dict[str, dict[str, float]]] = {}
    for stage in ("valid", "test"):
        z = np.load(out / f"scores_{stage}.npz")
        scores = scores_in_our_order(z["scores"], [str(t) for t in z["items"]],
                                     [str(u) for u in z["users"]], split)
        res[stage] = {rule: metrics_from_score_matrix(scores, split, stage, rule, max_len)
                      for rule in RULES}
    return res


def run_ours(model: str, tables: Path, out_dir: Path, budget_s: float, seed: int
             ) -> tuple[dict[str, Any], dict[str, dict[str, dict[str, float]]]]:
    """Train this project's ``model`` and score its best checkpoint under every rule.

    Returns: (``train`` result, ``{"valid" | "test": {rule: metrics}}``).
    """
    from pipeline.evaluate import EvalConfig
    from pipeline.train import TrainConfig, evaluate_checkpoint, train
    cfg = TrainConfig(name=f"ours-{model}", tables_dir=tables, out_dir=out_dir,
                      item_encoder="id", seq_model=model, time_budget_s=budget_s, patience=10,
                      monitor="NDCG@10", seed=seed, eval=EvalConfig(exclude="all"),
                      **OURS.get(model, {}))
    print(f"  ours {model}: training (budget {budget_s:.0f} s) ...", flush=True)
    result = train(cfg)
    scored: dict[str, dict[str, dict[str, float]]] = {"valid": {}, "test": {}}
    for rule in RULES:
        m = evaluate_checkpoint(Path(result["checkpoint_dir"]), EvalConfig(exclude=rule))
        scored["valid"][rule], scored["test"][rule] = m["valid"], m["test"]
    return result, scored


def _pick(m: dict[str, float]) -> dict[str, float]:
    return {k: round(float(m[k]), 4) for k in (*KEYS, "MRR") if k in m}


def machine() -> dict[str, Any]:
    """Platform, CPU count, Python and torch of the project venv, load average."""
    import torch
    return {"platform": platform.platform(), "processor": platform.processor()
            or platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "load_average_at_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison (module doc); returns and writes the result dict."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", type=Path, default=ROOT / "outputs" / "demo" / "tables")
    ap.add_argument("--work", type=Path, default=ROOT / "outputs" / "peer")
    ap.add_argument("--models", nargs="+", choices=list(PEER_NAMES), default=list(PEER_NAMES))
    ap.add_argument("--budget-min", type=float, default=15.0,
                    help="wall-time budget per model and library, minutes")
    ap.add_argument("--peer-python", type=Path, default=ROOT / ".peer-venv" / "bin" / "python")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)

    import torch
    torch.set_num_threads(a.threads)
    from benchmarks.peer.atomic import write_atomic_files
    from pipeline.split import build_split
    from stores.tables import read_tables

    info = machine()
    t0 = time.perf_counter()
    tables = read_tables(a.tables)
    split = build_split(tables.interactions, tables.items["item_id"].to_numpy())
    atomic_root = a.work / "atomic"
    counts = write_atomic_files(split, atomic_root / "mmcache", "mmcache", a.max_len)
    print(f"split: {len(split.user_ids)} users, {split.num_items} items; RecBole rows {counts}",
          flush=True)
    budget_s = a.budget_min * 60.0
    figures: dict[str, Any] = {}
    peer_versions: dict[str, str] = {}
    for model in a.models:
        print(f"{model}:", flush=True)
        pdir = a.work / "recbole" / model
        pdir.mkdir(parents=True, exist_ok=True)
        summary = run_peer(model, atomic_root, pdir, budget_s, a.peer_python, a.threads, a.seed)
        peer_versions = summary["versions"]
        peer = score_peer(pdir, split, a.max_len)
        ours_train, ours = run_ours(model, a.tables, a.work / "ours", budget_s, a.seed)
        peer_best_all = peer["valid"]["all"]["NDCG@10"]
        reach = first_reach(Path(ours_train["checkpoint_dir"]) / "history.csv", peer_best_all)
        peer_s = summary["best_reached_s"]
        ratio = round(reach["seconds"] / peer_s, 4) if reach["seconds"] is not None else None
        figures[model] = {
            "recbole": {"test": {r: _pick(peer["test"][r]) for r in RULES},
                        "valid": {r: _pick(peer["valid"][r]) for r in RULES},
                        "best_valid_ndcg10_own_metric": summary["best_valid_ndcg10_recbole"],
                        "best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"],
                        "best_reached_s": peer_s, "fit_s": summary["fit_s"],
                        "checkpoint_epoch": summary.get("checkpoint_epoch"),
                        "checkpoint_reached_s": summary.get("checkpoint_reached_s"),
                        "stopped": summary["stopped"], "own_test": summary["recbole_test"],
                        "own_valid": summary["recbole_valid"], "config": summary["config"],
                        "model_params": summary["model_params"], "rows": summary["rows"]},
            "ours": {"test": {r: _pick(ours["test"][r]) for r in RULES},
                     "valid": {r: _pick(ours["valid"][r]) for r in RULES},
                     "best_epoch": ours_train["best_epoch"], "epochs_run": ours_train["epochs_run"],
                     "best_valid_ndcg10_all": round(reach["best"], 4),
                     "best_reached_s": reach["best_seconds"], "train_loop_s":
                     reach["total_seconds"], "stopped": ours_train["stopped"],
                     "seconds_per_epoch_train_only": ours_train["seconds_per_epoch"],
                     "params": ours_train["params"]},
            "time_to_peer_best": {
                "peer_best_valid_ndcg10_all": round(peer_best_all, 4),
                "recbole_s": peer_s, "ours_s": reach["seconds"], "ours_epoch": reach["epoch"],
                "ours_over_recbole": ratio, "target": "<= 0.25",
                "met": ratio is not None and ratio <= 0.25},
        }
        _print_model(model, figures[model])
    out = {"benchmark": "peer_recbole", "figures": figures,
           "split": {"users": len(split.user_ids), "items": split.num_items,
                     "interactions": int(sum(len(s) for s in split.sequences)),
                     "recbole_rows": counts, "max_len": a.max_len},
           "budget_min_per_model_and_library": a.budget_min,
           "units": {"*_s": "wall seconds since the training loop started (validation "
                     "included)", "HR@10/NDCG@10/MRR": "full ranking, pessimistic ties, "
                     "repeat targets rankable, this project's pipeline.metrics"},
           "notes": ["RecBole early-stops on its own valid NDCG@10 (no history exclusion, "
                     "RecBole's metric code); its best checkpoint is then re-scored here",
                     "both libraries: 1 torch thread, CPU, same machine, run one after the "
                     "other (not concurrently)"],
           "machine": info, "versions": {"ours": {"python": platform.python_version(),
                                                  "torch": torch.__version__},
                                         "peer": peer_versions},
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python " + " ".join([os.path.relpath(__file__, ROOT)]
                                           + (sys.argv[1:] if argv is None else argv)),
           "seconds": round(time.perf_counter() - t0, 1)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")
    return out


def _print_model(model: str, f: dict[str, Any]) -> None:
    print(f"\n{model}: test HR@10 / NDCG@10 by history-exclusion rule")
    print(f"  {'rule':<7} {'RecBole':>17} {'ours':>17}")
    for r in RULES:
        p, o = f["recbole"]["test"][r], f["ours"]["test"][r]
        print(f"  {r:<7} {p['HR@10']:>8.4f} {p['NDCG@10']:>8.4f} {o['HR@10']:>8.4f} "
              f"{o['NDCG@10']:>8.4f}")
    t = f["time_to_peer_best"]
    print(f"  best valid NDCG@10 (rule all): RecBole {t['peer_best_valid_ndcg10_all']:.4f} "
          f"(epoch {f['recbole']['best_epoch']}, {t['recbole_s']:.0f} s; RecBole's own metric "
          f"{f['recbole']['best_valid_ndcg10_own_metric']:.4f}), ours "
          f"{f['ours']['best_valid_ndcg10_all']:.4f} (epoch {f['ours']['best_epoch']}, "
          f"{f['ours']['best_reached_s']} s)")
    print(f"  time to RecBole's best: ours {t['ours_s']} s vs RecBole {t['recbole_s']:.0f} s -> "
          f"{t['ours_over_recbole']} (target <= 0.25: {'met' if t['met'] else 'NOT met'})\n",
          flush=True)


if __name__ == "__main__":
    main()
