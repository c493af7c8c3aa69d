"""The seed papers' comparisons as named grids of training runs on one cache.

Grids (cells are :class:`pipeline.train.TrainConfig` overrides, listed in
:mod:`pipeline.experiment_cells`; shared cells run once):

* ``modality`` - ID only, text only, image only, text + image (IISAN-Versa table V, the
  LMM-encoder study's frozen-feature comparison);
* ``iisan`` - IISAN-VS/VA and its ablations (IISAN-Versa table VI): frozen backbone (the
  frozen top features fused by the linear layer alone, i.e. concat-and-project), without
  LayerDrop (every hidden state: needs all-layer stores), without gates, without intra-
  and without inter-modal SANs;
* ``fusion`` - fMRLRec concat-and-project, IISAN, EM3 Fusion-Q-Former (text + image, and
  text only: what the image tower adds to each fusion; the Q-Former also on token states,
  as EM3 feeds it), and content + ID tables with and without EM3's CIC loss;
* ``seq`` - SASRec, LRURec, GRU4Rec on item IDs; VBPR (BPR, cached features; seed 001);
  EM3 LoRA: an LRURec trained on short windows, then frozen and continued with LoRA on the
  full windows;
* ``mrl`` - fMRLRec: one Matryoshka LRURec training (concat-and-project items) evaluated
  at every size against LRURecs trained independently at each size;
* ``all`` - every grid; ``smoke`` - one cell of each code path (for tests).

Every (cell, seed) writes a checkpoint under ``<out>/runs/<cell>-s<seed>`` and is skipped on
a re-run when it is finished (``metrics.json`` exists) for the identical resolved config and
unchanged inputs (tables, stores; :func:`pipeline.reuse.finished_run`), so an interrupted
grid resumes. Results: ``runs.csv`` (one row per run, size, split, subset,
metric), ``results.csv`` (mean, std, n over seeds), ``results.md`` (one table per grid:
test NDCG@10 / HR@10 for all users, cold and warm targets, mean +- std) and one PNG plot per
grid under ``<out>/plots``. The popularity baseline is added to every table.

Nothing here imports Prefect: ``flows/experiments.py`` wraps these functions as tasks.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import ConfigError
from pipeline.experiment_cells import (BOTH, CELLS, GRID_ORDER, GRIDS,  # noqa: F401 (re-exported)
                                       IISAN_DCE_CELLS, IMAGE, IMAGE_ALL, IMAGE_TOK, STORE_KEYS,
                                       TEXT, TEXT_ALL, TEXT_TOK, TOP, VERSA, Cell,
                                       independent_cell)
from pipeline.evaluate import EvalConfig
from pipeline.train import TrainConfig, evaluate_checkpoint, popularity, train
from pipeline.reuse import finished_run, record_inputs, run_inputs, same_config
from pipeline.significance import COMPARISONS, PairedTest, run_comparisons
from pipeline.significance import markdown as significance_markdown
from pipeline.train_runs import per_user_file

log = logging.getLogger(__name__)


class ExperimentConfig(BaseModel):
    """One grid run.

    Fields:
        grid: a name of ``GRIDS``. tables_dir: interactions / items tables.
        out_dir: ``runs/``, ``plots/`` and the result tables go here.
        text_store, image_store: the LayerDrop stores (stage 1).
        text_store_all, image_store_all: stores with every hidden state (for the
            "without LayerDrop" cell; required only by grids that contain it).
        text_store_tokens, image_store_tokens: token-state stores (``pooling="tokens"``)
            of the Fusion-Q-Former's token cells (required only by grids with them).
        seeds: one run per seed and cell. max_epochs, patience, min_epochs, batch_size, lr:
            shared training budget (every cell gets the same; early stopping never stops
            before ``min_epochs``: patience alone ended IISAN's slow, noisy climb on both
            towers at epoch 24 for one seed, while the others climbed to epochs 34-45).
            mrl_sizes: Matryoshka sizes of the ``mrl`` grid (the independent LRURecs use the
            same sizes). short_len: window of the LoRA base run (the LoRA run uses
            ``train.max_len``).
        train: further TrainConfig fields applied to every cell before the cell's own
            overrides (e.g. ``{"adapter_dim": 8}`` for a tiny test run).
        eval: evaluation settings (history-exclusion rule reported with every number).
        runs_in_parallel: the runs share the machine (several workers), recorded in each
            fresh run's ``timing.json``: a table reports time per epoch only for cells whose
            every run trained alone (issue 11: measured one run at a time, or dropped).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    grid: str
    tables_dir: Path
    out_dir: Path
    text_store: Path | None = None
    image_store: Path | None = None
    text_store_all: Path | None = None
    image_store_all: Path | None = None
    text_store_tokens: Path | None = None
    image_store_tokens: Path | None = None
    seeds: tuple[int, ...] = (1, 2, 3)
    max_epochs: int = Field(default=200, ge=1)
    patience: int = Field(default=10, ge=1)
    min_epochs: int = Field(default=30, ge=1)
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    mrl_sizes: tuple[int, ...] = (16, 32, 64, 128)
    short_len: int = Field(default=10, ge=2)
    train: dict[str, Any] = Field(default_factory=dict)
    eval: EvalConfig = EvalConfig()
    runs_in_parallel: bool = False


def grid_cells(exp: ExperimentConfig) -> list[Cell]:
    """The cells of ``exp.grid`` in order, ``@independent`` expanded to one cell per size and
    the base run of a LoRA cell inserted before it.

    Raises: ConfigError for an unknown grid.
    """
    if exp.grid not in GRIDS:
        raise ConfigError(f"unknown grid {exp.grid!r}; known: {sorted(GRIDS)}")
    out: list[Cell] = []
    for cid in GRIDS[exp.grid]:
        cells = ([independent_cell(s) for s in exp.mrl_sizes] if cid == "@independent"
                 else [CELLS[cid]])
        for c in cells:
            if c.lora_base is not None and c.lora_base not in {o.id for o in out}:
                out.append(CELLS[c.lora_base])  # a LoRA cell's base run is part of the grid
            if c.id not in {o.id for o in out}:
                out.append(c)
    return out


def needed_stores(exp: ExperimentConfig) -> set[str]:
    """ExperimentConfig store fields the grid's cells use (e.g. {"text_store", ...})."""
    need = set()
    for cell in grid_cells(exp):
        for v in cell.overrides.values():
            if isinstance(v, str) and v in STORE_KEYS:
                need.add(STORE_KEYS[v])
    return need


def resolve(exp: ExperimentConfig, cell: Cell, seed: int,
            lora_from: Path | None = None) -> TrainConfig:
    """The TrainConfig of one (cell, seed).

    Raises: ConfigError if a store the cell needs is not configured.
    """
    base: dict[str, Any] = dict(
        tables_dir=exp.tables_dir, out_dir=exp.out_dir / "runs", max_epochs=exp.max_epochs,
        patience=exp.patience, min_epochs=exp.min_epochs, batch_size=exp.batch_size, lr=exp.lr,
        seed=seed, eval=exp.eval)
    base.update(exp.train)
    for k, v in cell.overrides.items():
        if isinstance(v, str) and v in STORE_KEYS:
            path = getattr(exp, STORE_KEYS[v])
            if path is None:
                raise ConfigError(f"cell {cell.id!r} needs {STORE_KEYS[v]} (not configured)")
            v = path
        elif v == "@mrl":
            v = tuple(exp.mrl_sizes)
        elif v == "@mrl_max":
            v = max(exp.mrl_sizes)
        elif v == "@short":
            v = exp.short_len
        base[k] = v
    for m in ("text", "image"):  # "@top": the top hidden state of the (resolved) store
        if base.get(f"{m}_layers") == TOP:
            from stores.hidden_states import HiddenStateStore
            if base.get(f"{m}_store") is None:
                raise ConfigError(f"cell {cell.id!r}: {m}_layers '@top' without a {m} store")
            top = HiddenStateStore.open(base[f"{m}_store"]).spec.layer_indices[-1]
            base[f"{m}_layers"] = (int(top),)
    if VERSA in (base.get("text_layers"), base.get("image_layers")):
        base.update(versa_layers(cell.id, base))
    if cell.lora_base is not None:
        base["lora_from"] = lora_from
    return TrainConfig(name=f"{cell.id}-s{seed}", **base)


def versa_layers(cell_id: str, base: dict[str, Any]) -> dict[str, Any]:
    """Resolve ``"@versa"`` rows: hidden state 0 plus IISAN-Versa's kept hidden states.

    Args:
        cell_id: for errors. base: the cell's resolved fields so far (``text_store``,
            ``image_store`` paths; ``text_layers`` / ``image_layers``, "@versa" or explicit).
    Returns: ``{"text_layers": (0, ...), "image_layers": (0, ...), "iisan_pairing":
        "versa"}`` for the "@versa" fields: the hidden states of
        :func:`models.layerdrop.versa_pairing` for the two stores' ``num_model_layers``.
    Raises: ConfigError if a store is missing or lacks a row the alignment needs (names the
        cell, the store and the rows).
    """
    from models.layerdrop import versa_pairing
    from stores.hidden_states import HiddenStateStore
    specs = {}
    for m in ("text", "image"):
        if base.get(f"{m}_store") is None:
            raise ConfigError(f"cell {cell_id!r}: '@versa' rows need both a text and an image "
                              f"store ({m}_store is not set)")
        specs[m] = HiddenStateStore.open(base[f"{m}_store"]).spec
    pairs = versa_pairing(specs["text"].num_model_layers, specs["image"].num_model_layers)
    out: dict[str, Any] = {"iisan_pairing": "versa"}
    for j, m in enumerate(("text", "image")):
        if base.get(f"{m}_layers") != VERSA:
            continue
        rows = (0, *(p[j] for p in pairs))
        missing = sorted(set(rows) - {int(i) for i in specs[m].layer_indices})
        if missing:
            raise ConfigError(f"cell {cell_id!r}: the {m} store {base[f'{m}_store']} lacks the "
                              f"IISAN-Versa hidden states {missing} (it holds "
                              f"{list(specs[m].layer_indices)}; needs {list(rows)})")
        out[f"{m}_layers"] = rows
    return out


def _same_config(run_dir: Path, cfg: TrainConfig) -> bool:
    """Whether ``run_dir`` holds a finished run of ``cfg``'s config (``metrics.json`` exists).

    The config comparison is :func:`pipeline.reuse.same_config` (the saved config is
    re-validated, so a field added to TrainConfig later with a default that keeps the old
    behaviour does not invalidate finished runs; a saved config that no longer validates
    never matches). :func:`run_cell` also checks the run's inputs
    (:func:`pipeline.reuse.finished_run`).
    """
    return bool(same_config(run_dir, cfg)) and (run_dir / "metrics.json").exists()


def run_cell(exp: ExperimentConfig, cell: Cell, seed: int) -> dict[str, Any]:
    """Train (unless an identical finished run exists) and evaluate one (cell, seed).

    Returns: {"cell", "label", "seed", "reused", "summary": train summary, "metrics":
        evaluate_checkpoint output}.
    """
    lora_from = None
    if cell.lora_base is not None:
        lora_from = exp.out_dir / "runs" / f"{cell.lora_base}-s{seed}"
        if not (lora_from / "metrics.json").exists():
            run_cell(exp, CELLS[cell.lora_base], seed)
    cfg = resolve(exp, cell, seed, lora_from)
    run_dir = cfg.out_dir / cfg.name
    current = run_inputs(cfg)
    decision = finished_run(run_dir, cfg, eval_cfg=cfg.eval, current=current)
    reused = decision.reuse
    if reused:
        summary = json.loads((run_dir / "train_summary.json").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
        log.info("reusing %s (%s)", run_dir, decision.reason)
    else:
        log.info("training %s: %s", cfg.name, decision.reason)
        summary = train(cfg)
        record_inputs(run_dir, current)
        record_timing(run_dir, exp)
        metrics = evaluate_checkpoint(run_dir, device=cfg.device)
    return {"cell": cell.id, "label": cell.label, "seed": seed, "reused": reused,
            "summary": summary, "metrics": metrics, "alone": trained_alone(run_dir)}


TIMING_FILE = "timing.json"


def record_timing(run_dir: Path, exp: ExperimentConfig) -> None:
    """Write ``timing.json`` next to a freshly trained run: whether its grid invocation ran
    several runs at once (``runs_in_parallel``), torch's thread count and the 1-minute load
    average at the end of training (``os.getloadavg``; informative: other processes on the
    machine are not detected)."""
    import os

    import torch
    (Path(run_dir) / TIMING_FILE).write_text(json.dumps({
        "runs_in_parallel": exp.runs_in_parallel, "threads": torch.get_num_threads(),
        "loadavg_1min": round(os.getloadavg()[0], 2)}, indent=2))


def trained_alone(run_dir: Path) -> bool:
    """Whether the run's ``timing.json`` says it trained with no other run of its grid beside
    it; False when the file is missing (a run trained before it existed: unknown)."""
    try:
        return not json.loads((Path(run_dir) / TIMING_FILE).read_text())["runs_in_parallel"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def run_cell_by_id(exp: ExperimentConfig, cell_id: str, seed: int,
                   threads: int | None = None) -> dict[str, Any]:
    """:func:`run_cell` for a cell named by id (picklable entry point for worker processes).

    Args: threads: if given, torch uses this many threads during the run (restored after).
    """
    import torch
    cell = next((c for c in grid_cells(exp) if c.id == cell_id), None) or CELLS.get(cell_id)
    if cell is None:
        raise ConfigError(f"unknown cell {cell_id!r} in grid {exp.grid!r}")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return run_cell(exp, cell, seed)
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- results

RUN_COLUMNS = ["cell", "label", "seed", "size", "split", "subset", "metric", "value", "n_users",
               "exclude", "best_epoch", "epochs_run", "capped", "seconds", "seconds_per_epoch",
               "alone", "params"]


def capped(summary: dict[str, Any], exp: ExperimentConfig) -> bool:
    """Whether a run stopped at the epoch cap rather than by early stopping: it ran
    ``max_epochs`` epochs and its best epoch is within ``patience`` of the last (it might
    still have improved)."""
    return (int(summary["epochs_run"]) >= exp.max_epochs
            and int(summary["epochs_run"]) - int(summary["best_epoch"]) < exp.patience)


def run_rows(result: dict[str, Any], exp: ExperimentConfig | None = None
             ) -> list[dict[str, Any]]:
    """Long-format rows of one run: every size x split x subset x metric (``capped``: 1 if
    the run stopped at ``exp``'s epoch cap, see :func:`capped`; 0 without ``exp``; ``alone``:
    1 if it trained with no other run beside it, see :func:`trained_alone`)."""
    s, m = result["summary"], result["metrics"]
    cap = int(exp is not None and capped(s, exp))
    alone = int(bool(result.get("alone", False)))
    rows = []
    for size, per_split in m["by_size"].items():
        for split, subsets in per_split.items():
            for subset, metrics in subsets.items():
                for metric, value in metrics.items():
                    if metric == "n_users":
                        continue
                    rows.append({"cell": result["cell"], "label": result["label"],
                                 "seed": result["seed"], "size": int(size), "split": split,
                                 "subset": subset, "metric": metric, "value": value,
                                 "n_users": metrics["n_users"], "exclude": m["exclude"],
                                 "best_epoch": s["best_epoch"], "epochs_run": s["epochs_run"],
                                 "capped": cap, "seconds": s["seconds"],
                                 "seconds_per_epoch": s["seconds_per_epoch"],
                                 "alone": alone, "params": s.get("params_effective", s["params"])})
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds per (cell, size, split, subset, metric)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["cell"], r["size"], r["split"], r["subset"], r["metric"]),
                          []).append(r)
    out = []
    for (cell, size, split, subset, metric), rs in groups.items():
        mean, std = _mean_std([float(r["value"]) for r in rs])
        sec, _ = _mean_std([float(r["seconds"]) for r in rs])
        spe, _ = _mean_std([float(r["seconds_per_epoch"]) for r in rs])
        ep, _ = _mean_std([float(r["best_epoch"]) for r in rs])
        out.append({"cell": cell, "label": rs[0]["label"], "size": size, "split": split,
                    "subset": subset, "metric": metric, "mean": mean, "std": std, "n": len(rs),
                    "n_users": rs[0]["n_users"], "exclude": rs[0]["exclude"],
                    "seconds": sec, "seconds_per_epoch": spe, "best_epoch": ep,
                    "capped": sum(int(r.get("capped", 0)) for r in rs),
                    "alone": all(int(r.get("alone", 0)) for r in rs),
                    "params": rs[0]["params"]})
    return out


def _fmt(mean: float, std: float, n: int) -> str:
    return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def markdown_tables(summary: list[dict[str, Any]], grid: str, exp: ExperimentConfig,
                    pop: dict[str, Any] | None = None) -> str:
    """One markdown table per grid of ``grid`` (test split; all / cold / warm targets)."""
    idx = {(s["cell"], s["size"], s["split"], s["subset"], s["metric"]): s for s in summary}
    grids = GRID_ORDER if grid == "all" else (grid,)
    lines: list[str] = []
    cold_n = next((s["n_users"] for s in summary if s["split"] == "test"
                   and s["subset"] == "cold"), None)
    all_n = next((s["n_users"] for s in summary if s["split"] == "test"
                  and s["subset"] == "all"), None)
    def spe(a: dict[str, Any]) -> str:  # time per epoch: only from one run at a time
        return f"{a['seconds_per_epoch']:.2f}" if a.get("alone") else "-"

    for g in grids:
        sub = exp.model_copy(update={"grid": g})
        cells = grid_cells(sub)
        lines += [f"#### grid `{g}`", "",
                  "| cell | size | NDCG@10 | HR@10 | NDCG@10 cold | NDCG@10 warm | best epoch "
                  "| s/epoch | params |", "|---|---|---|---|---|---|---|---|---|"]
        if pop is not None:
            p = pop["test"]
            lines.append(f"| popularity | - | {p['all']['NDCG@10']:.4f} | {p['all']['HR@10']:.4f} "
                         f"| {p['cold'].get('NDCG@10', float('nan')):.4f} "
                         f"| {p['warm'].get('NDCG@10', float('nan')):.4f} | - | - | 0 |")
        for c in cells:
            sizes = sorted({s["size"] for s in summary if s["cell"] == c.id})
            for size in sizes:
                def get(subset: str, metric: str) -> str:
                    s = idx.get((c.id, size, "test", subset, metric))
                    return _fmt(s["mean"], s["std"], s["n"]) if s else "n/a"
                a = idx.get((c.id, size, "test", "all", "NDCG@10"))
                if a is None:
                    continue
                # runs that stopped at the epoch cap, not by early stopping, are flagged
                cap = f" (at cap: {a['capped']}/{a['n']})" if a.get("capped") else ""
                lines.append(f"| {c.label} | {size} | {get('all', 'NDCG@10')} | "
                             f"{get('all', 'HR@10')} | {get('cold', 'NDCG@10')} | "
                             f"{get('warm', 'NDCG@10')} | {a['best_epoch']:.1f}{cap} | "
                             f"{spe(a)} | {a['params']:,} |")
        lines.append("")
    n_seeds = max((s["n"] for s in summary), default=0)
    lines.append(f"Test split, full ranking over all items, leave-one-out; mean ± sample std "
                 f"over {n_seeds} seed(s) {tuple(exp.seeds)}; history exclusion "
                 f"`{exp.eval.exclude}`; cold = target item with <= "
                 f"{exp.train.get('cold_threshold', 20)} training interactions "
                 f"({cold_n} of {all_n} test users). Budget: max {exp.max_epochs} epochs, "
                 f"patience {exp.patience} (never before epoch {exp.min_epochs}), "
                 f"batch {exp.batch_size}, lr {exp.lr}; \"at cap: "
                 f"k/n\": k of n seeds stopped at the epoch cap with their best epoch within "
                 f"the patience window (early stopping did not decide; raise --max-epochs)."
                 + " s/epoch: only for cells whose every run trained with no other run of "
                   "its grid beside it (`timing.json`; --workers 1 measures it), else -.")
    return "\n".join(lines)


def plot_grid(summary: list[dict[str, Any]], exp: ExperimentConfig, grid: str,
              path: Path) -> Path:
    """Bar chart (test NDCG@10, all / cold / warm, mean ± std) or, for ``mrl``, the
    quality-by-size curve (one Matryoshka training vs independent trainings)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = {(s["cell"], s["size"], s["split"], s["subset"], s["metric"]): s for s in summary}
    cells = grid_cells(exp.model_copy(update={"grid": grid}))
    path.parent.mkdir(parents=True, exist_ok=True)
    if grid == "mrl":
        fig, ax = plt.subplots(figsize=(6, 4))
        mrl = [c for c in cells if c.id == "mrl-lru"][0]
        sizes = sorted({s["size"] for s in summary if s["cell"] == mrl.id})
        for subset, style in (("all", "-"), ("cold", ":")):
            pts = [(z, idx.get((mrl.id, z, "test", subset, "NDCG@10"))) for z in sizes]
            pts = [(z, s) for z, s in pts if s]
            ax.errorbar([z for z, _ in pts], [s["mean"] for _, s in pts],
                        yerr=[s["std"] for _, s in pts], fmt="o" + style, capsize=3,
                        label=f"Matryoshka, one training ({subset})")
            ind = [(int(c.overrides["hidden"]), idx.get((c.id, int(c.overrides["hidden"]),
                                                          "test", subset, "NDCG@10")))
                   for c in cells if c.id.startswith("lru-concat-d")]
            ind = [(z, s) for z, s in ind if s]
            ax.errorbar([z for z, _ in ind], [s["mean"] for _, s in ind],
                        yerr=[s["std"] for _, s in ind], fmt="s" + style, capsize=3,
                        label=f"independent trainings ({subset})")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(z) for z in sizes])
        ax.minorticks_off()
        ax.set_xlabel("model width (Matryoshka size)")
        ax.set_ylabel("test NDCG@10")
        ax.set_title("fMRLRec: quality by size")
        ax.legend(fontsize=7)
    else:
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(cells)), 4))
        width = 0.27
        for k, subset in enumerate(("all", "cold", "warm")):
            xs, ys, es = [], [], []
            for i, c in enumerate(cells):
                size = max((s["size"] for s in summary if s["cell"] == c.id), default=None)
                s = idx.get((c.id, size, "test", subset, "NDCG@10"))
                if s:
                    xs.append(i + (k - 1) * width)
                    ys.append(s["mean"])
                    es.append(s["std"])
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=subset)
        ax.set_xticks(range(len(cells)))
        ax.set_xticklabels([c.label for c in cells], rotation=25, ha="right", fontsize=7)
        ax.set_ylabel("test NDCG@10")
        ax.set_title(f"grid '{grid}' (mean ± std over seeds)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(results: list[dict[str, Any]], exp: ExperimentConfig,
                  seconds: float | None = None) -> dict[str, Any]:
    """Write runs.csv, results.csv, results.md and the plots; returns their paths."""
    exp.out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for res in results for r in run_rows(res, exp)]
    with open(exp.out_dir / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RUN_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    summary = summarize(rows)
    with open(exp.out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    pop = popularity_breakdown(exp)
    md = markdown_tables(summary, exp.grid, exp, pop)
    reused = sum(bool(r.get("reused")) for r in results)
    train_min = sum(float(r["summary"]["seconds"]) for r in results) / 60
    md += (f" Runs: {len(results)} ({reused} reused from an earlier invocation); their "
           f"training + validation time adds up to {train_min:.1f} min")
    md += f", wall time of this invocation {seconds / 60:.1f} min." if seconds is not None else "."
    pairs = comparisons(exp)
    tests = run_comparisons(per_user_files(results, exp), pairs)
    with open(exp.out_dir / "comparisons.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(PairedTest.__dataclass_fields__))
        w.writeheader()
        w.writerows(t.row() for t in tests)
    if tests:
        md += "\n\n#### paired tests (test split)\n\n" + significance_markdown(
            tests, {(a, b): q for a, b, q in pairs})
    (exp.out_dir / "results.md").write_text(md + "\n")
    grids = GRID_ORDER if exp.grid == "all" else (exp.grid,)
    plots = [str(plot_grid(summary, exp, g, exp.out_dir / "plots" / f"{g}.png"))
             for g in grids if g != "smoke"]
    if exp.grid == "smoke":
        plots = [str(plot_grid(summary, exp, "smoke", exp.out_dir / "plots" / "smoke.png"))]
    return {"runs_csv": str(exp.out_dir / "runs.csv"),
            "comparisons_csv": str(exp.out_dir / "comparisons.csv"),
            "results_csv": str(exp.out_dir / "results.csv"),
            "results_md": str(exp.out_dir / "results.md"), "plots": plots, "markdown": md}


def per_user_files(results: list[dict[str, Any]], exp: ExperimentConfig
                   ) -> dict[str, dict[int, Path]]:
    """cell id -> seed -> that run's ``per_user-<exclude>-<repeat>.csv`` (runs that have one);
    a Matryoshka run also under ``<cell>@<size>`` for each size (its ``-d<size>`` files; the
    largest size is the main file)."""
    out: dict[str, dict[int, Path]] = {}
    for r in results:
        m = r["metrics"]
        rules = (m["exclude"], m.get("repeat_target", exp.eval.repeat_target))
        run = exp.out_dir / "runs" / f"{r['cell']}-s{r['seed']}"
        f = run / per_user_file(*rules)
        if f.is_file():
            out.setdefault(r["cell"], {})[int(r["seed"])] = f
        sizes = [int(x) for x in m.get("sizes", [])]
        if len(sizes) > 1 and f.is_file():
            for size in sizes:
                g = f if size == sizes[-1] else run / per_user_file(*rules, size)
                if g.is_file():
                    out.setdefault(f"{r['cell']}@{size}", {})[int(r["seed"])] = g
    return out


def comparisons(exp: ExperimentConfig) -> list[tuple[str, str, str]]:
    """``pipeline.significance.COMPARISONS`` plus fMRLRec's claim per Matryoshka size: the one
    training (``mrl-lru@<size>``) against the independent LRURec of that width."""
    return [*COMPARISONS, *((f"mrl-lru@{s}", independent_cell(s).id,
                             f"fMRLRec: one Matryoshka training vs an independent LRURec, "
                             f"d={s}") for s in exp.mrl_sizes)]


def popularity_breakdown(exp: ExperimentConfig) -> dict[str, Any]:
    """Popularity baseline with the same all / cold / warm breakdown (test and valid)."""
    import numpy as np

    from pipeline.evaluate import popularity_scores
    from pipeline.split import build_split
    from pipeline.train import breakdown, rank_examples
    from stores.tables import read_tables
    tables = read_tables(exp.tables_dir)
    split = build_split(tables.interactions, tables.items["item_id"].to_numpy())
    scores = popularity_scores(split)
    fn = lambda hist, users: [scores.expand(hist.shape[0], -1).clone()]  # noqa: E731
    ecfg = exp.eval
    cold = int(exp.train.get("cold_threshold", 20))
    out = {}
    for stage in ("valid", "test"):
        ranks, targets = rank_examples(fn, split, stage, ecfg)
        out[stage] = breakdown(ranks[0], np.asarray(targets), split.train_item_counts(),
                               cold, ecfg.ks)
    out["reference"] = popularity(exp.tables_dir, ecfg)["test"]
    return out


def run_grid(exp: ExperimentConfig) -> dict[str, Any]:
    """Every (cell, seed) of the grid in order, then the result files (no Prefect)."""
    t0 = time.perf_counter()
    results = [run_cell(exp, c, s) for c in grid_cells(exp) for s in exp.seeds]
    return write_results(results, exp, time.perf_counter() - t0)
