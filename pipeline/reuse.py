"""When a finished training run can be reused instead of trained again.

One rule for the demo pipeline (``flows/pipeline.py``) and the experiments grid
(``pipeline.experiments``): the checkpoint in ``<out_dir>/<name>/`` is reused when

* it is finished: ``config.json``, ``model.safetensors`` and ``train_summary.json`` exist
  (and, where the caller needs metrics, a ``metrics.json`` written after the weights, for
  the same evaluation settings), and the training ended by its own rule (early stopping,
  the epoch cap or its time budget), not by a signal: a run stopped by SIGTERM / SIGINT
  keeps its best checkpoint but is trained again;
* its resolved config is unchanged: the saved ``TrainConfig`` is re-validated and compared
  with the requested one (so a field added to TrainConfig later, whose default keeps the old
  behaviour, does not invalidate finished runs; a saved config that no longer validates
  never matches). The one tolerated difference is a higher ``min_epochs`` that the run
  already passed (it stopped after epoch E >= the new floor): that training is the same;
* its inputs are unchanged: the tables (the fingerprints in ``manifest.json``), every store
  the run reads (its spec: items fingerprint, weights fingerprint, model, layers, pooling,
  ...; and the store must be complete) and, for a LoRA run, the weights it continues.

The inputs are recorded next to the checkpoint in ``inputs.json`` by :func:`train_or_reuse`
(computed before training). A run trained before ``inputs.json`` existed is judged by what
its ``config.json`` recorded: the specs of the stores it read (its tables are then assumed
unchanged).

Nothing here imports Prefect.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.evaluate import EvalConfig
from pipeline.train import TrainConfig, evaluate_checkpoint, train
from pipeline.train_runs import metrics_file

log = logging.getLogger(__name__)

INPUTS_FILE = "inputs.json"
STORE_FIELDS = {"text": "text_store", "image": "image_store"}


@dataclass(frozen=True)
class Decision:
    """Whether a run can be reused, and why (or why not), in words for the log."""

    reuse: bool
    reason: str

    def __bool__(self) -> bool:
        return self.reuse


# --------------------------------------------------------------------------- inputs

def tables_identity(tables_dir: Path) -> dict[str, Any]:
    """The fingerprints recorded in ``<tables_dir>/manifest.json`` (None when unreadable).

    ``stores.tables.read_tables`` checks the tables against these fingerprints, so they
    identify what a training run reads.
    """
    try:
        m = json.loads((Path(tables_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return {"dataset_fingerprint": None}
    tables = m.get("tables", {})
    return {"dataset_fingerprint": m.get("dataset_fingerprint"),
            "interactions": tables.get("interactions", {}).get("fingerprint"),
            "items": tables.get("items", {}).get("fingerprint")}


def _spec_identity(spec: dict[str, Any]) -> dict[str, Any]:
    """The fields of a store spec (as JSON) that decide what a training run reads: the
    store's identity (``StoreSpec.IDENTITY``: items and weights fingerprints, model,
    pooling, ...), its layers and whether the weights are pretrained. A field missing from
    an older record counts as its default None, and extra keys (``row_widths`` in a
    checkpoint's config.json, informative fields such as ``code_version``) are ignored, so
    fields added to StoreSpec later do not invalidate finished runs."""
    from stores.hidden_states import StoreSpec
    fields = (*StoreSpec.IDENTITY, "layer_indices", "layer_widths", "pretrained")
    return {k: spec.get(k) for k in dict.fromkeys(fields)}


def store_identity(path: Path) -> dict[str, Any]:
    """A store's spec (its provenance, without informative fields) and completion.

    Returns ``{"spec": {...} | None, "complete": bool}``; a missing or unreadable store has
    ``spec`` None.
    """
    from stores.hidden_states import HiddenStateStore
    try:
        st = HiddenStateStore.open(path, mode="r", require_complete=False)
    except (OSError, ValueError, KeyError, PipelineError):
        return {"spec": None, "complete": False}
    try:
        return {"spec": _spec_identity(st.spec.model_dump(mode="json")),
                "complete": st.is_complete()}
    finally:
        st.close()


def _file_digest(path: Path) -> str | None:
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    except OSError:
        return None


def run_inputs(cfg: TrainConfig) -> dict[str, Any]:
    """What ``cfg``'s training reads besides its config: tables, stores, LoRA base weights."""
    out: dict[str, Any] = {"tables": tables_identity(cfg.tables_dir), "stores": {}}
    for modality, field in STORE_FIELDS.items():
        path = getattr(cfg, field)
        if path is not None:
            out["stores"][modality] = store_identity(path)
    if cfg.lora_from is not None:
        out["lora_from"] = _file_digest(Path(cfg.lora_from) / "model.safetensors")
    return out


def record_inputs(run_dir: Path, inputs: dict[str, Any]) -> None:
    """Write ``inputs.json`` next to a finished checkpoint."""
    (Path(run_dir) / INPUTS_FILE).write_text(json.dumps(inputs, indent=2, sort_keys=True))


# --------------------------------------------------------------------------- the rule

def _diff(saved: dict[str, Any], wanted: dict[str, Any], limit: int = 3) -> str:
    keys = [k for k in dict.fromkeys([*wanted, *saved]) if saved.get(k) != wanted.get(k)]
    parts = [f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in keys[:limit]]
    return ", ".join(parts) + (f", +{len(keys) - limit} more" if len(keys) > limit else "")


def same_config(run_dir: Path, cfg: TrainConfig) -> Decision:
    """Whether ``run_dir/config.json`` holds ``cfg`` (re-validated, see the module docstring)."""
    try:
        raw = json.loads((Path(run_dir) / "config.json").read_text())["train"]
    except (OSError, ValueError, KeyError, TypeError):
        return Decision(False, "no finished checkpoint")
    try:
        saved = TrainConfig(**raw)
    except (ValueError, TypeError, PipelineError):
        return Decision(False, "its saved config no longer validates")
    a, b = json.loads(saved.model_dump_json()), json.loads(cfg.model_dump_json())
    if a != b and {**a, "min_epochs": b["min_epochs"]} == b:
        return _min_epochs_equivalent(run_dir, a["min_epochs"], b["min_epochs"])
    if a != b:
        return Decision(False, f"config changed ({_diff(a, b)})")
    return Decision(True, "config unchanged")


def _min_epochs_equivalent(run_dir: Path, trained: int, wanted: int) -> Decision:
    """A config that differs only in ``min_epochs`` trains the same epochs, bit for bit, when
    the finished run stopped at an epoch E >= ``wanted`` >= ``trained``: raising the floor
    changes no stop decision before E (none was taken there under the lower floor either)
    and E is past both floors. Lowering it could have stopped the run earlier: retrained."""
    try:
        ran = int(json.loads((Path(run_dir) / "train_summary.json").read_text())["epochs_run"])
    except (OSError, ValueError, KeyError, TypeError):
        return Decision(False, f"config changed (min_epochs: {trained} -> {wanted})")
    if trained <= wanted <= ran:
        return Decision(True, f"config unchanged but min_epochs {trained} -> {wanted}, which "
                              f"this run (stopped after epoch {ran}) already satisfies")
    return Decision(False, f"config changed (min_epochs: {trained} -> {wanted}; the run "
                           f"stopped after epoch {ran})")


def _recorded_inputs(run_dir: Path) -> dict[str, Any] | None:
    """inputs.json, or for a run trained before it existed what config.json recorded."""
    try:
        return json.loads((Path(run_dir) / INPUTS_FILE).read_text())
    except (OSError, ValueError):
        pass
    try:
        saved = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    stores = {m: {"spec": _spec_identity(s), "complete": True}
              for m, s in (saved.get("stores") or {}).items() if isinstance(s, dict)}
    return {"stores": stores, "legacy": True}


def same_inputs(run_dir: Path, cfg: TrainConfig,
                current: dict[str, Any] | None = None) -> Decision:
    """Whether the run's recorded inputs equal ``current`` (default: :func:`run_inputs`)."""
    now = run_inputs(cfg) if current is None else current
    for modality, ident in now["stores"].items():
        if ident["spec"] is None:
            return Decision(False, f"the {modality} store {getattr(cfg, STORE_FIELDS[modality])} "
                                   f"is missing")
        if not ident["complete"]:
            return Decision(False, f"the {modality} store is not complete")
    rec = _recorded_inputs(run_dir)
    if rec is None:
        return Decision(False, "no finished checkpoint")
    rec_stores = rec.get("stores") or {}
    if set(rec_stores) != set(now["stores"]):
        return Decision(False, f"it read other stores ({sorted(rec_stores)} -> "
                               f"{sorted(now['stores'])})")
    for modality, ident in now["stores"].items():
        if rec_stores[modality].get("spec") != ident["spec"]:
            return Decision(False, f"the {modality} store changed ("
                                   f"{_diff(rec_stores[modality].get('spec') or {}, ident['spec'])})")
    if rec.get("legacy"):
        return Decision(True, "stores unchanged (tables not recorded by this older run)")
    if rec.get("tables") != now["tables"]:
        return Decision(False, f"the tables changed ({_diff(rec.get('tables') or {}, now['tables'])})")
    if rec.get("lora_from") != now.get("lora_from"):
        return Decision(False, "the checkpoint it continues (lora_from) changed")
    return Decision(True, "inputs unchanged")


def metrics_for(run_dir: Path, eval_cfg: EvalConfig) -> dict[str, Any] | None:
    """The run's metrics for ``eval_cfg`` when written after the weights (same exclusion and
    repeat-target rules, same cut-offs), else None: the per-rule file
    (``metrics-<exclude>-<repeat_target>.json``), or ``metrics.json`` of a run evaluated
    before those files existed."""
    run_dir = Path(run_dir)
    path = run_dir / metrics_file(eval_cfg.exclude, eval_cfg.repeat_target)
    if not path.exists():  # written before the per-rule files existed
        path = run_dir / "metrics.json"
    try:
        m = json.loads(path.read_text())
        if (run_dir / "model.safetensors").exists() and \
                path.stat().st_mtime_ns < (run_dir / "model.safetensors").stat().st_mtime_ns:
            return None  # scores of earlier weights
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("exclude") != eval_cfg.exclude or \
            m.get("repeat_target", "rankable") != eval_cfg.repeat_target:
        return None
    ks = {int(k.split("@")[1]) for k in m.get("test", {}) if k.startswith("NDCG@")}
    return m if ks == set(eval_cfg.ks) else None


def finished_run(run_dir: Path, cfg: TrainConfig, eval_cfg: EvalConfig | None = None,
                 current: dict[str, Any] | None = None) -> Decision:
    """The reuse rule: finished, same config, same inputs (and, with ``eval_cfg``, metrics
    for it). ``current``: the inputs now (default: computed)."""
    run_dir = Path(run_dir)
    if not all((run_dir / f).exists() for f in ("config.json", "model.safetensors",
                                                 "train_summary.json")):
        return Decision(False, "no finished checkpoint")
    stopped = json.loads((run_dir / "train_summary.json").read_text()).get("stopped")
    if stopped not in (None, "time_budget"):
        return Decision(False, f"the training was stopped by {stopped}, not finished")
    d = same_config(run_dir, cfg)
    if not d:
        return d
    d = same_inputs(run_dir, cfg, current)
    if not d:
        return d
    if eval_cfg is not None and metrics_for(run_dir, eval_cfg) is None:
        return Decision(False, f"no metrics for exclude={eval_cfg.exclude!r}, ks={eval_cfg.ks}")
    return Decision(True, "config and inputs unchanged")


# --------------------------------------------------------------------------- entry points

def train_or_reuse(cfg: TrainConfig, reuse: bool = True) -> dict[str, Any]:
    """Reuse the finished run of ``cfg`` (see :func:`finished_run`) or train it.

    Either way the result is :func:`pipeline.train.train`'s summary plus ``"reused"``; a
    fresh training records its inputs (``inputs.json``, computed before training).
    """
    run_dir = cfg.out_dir / cfg.name
    current = run_inputs(cfg)
    if reuse:
        d = finished_run(run_dir, cfg, current=current)
        if d:
            log.info("reusing checkpoint %s (%s)", run_dir, d.reason)
            summary = json.loads((run_dir / "train_summary.json").read_text())
            return {**summary, "checkpoint_dir": str(run_dir), "reused": True}
        log.info("training %s: %s", cfg.name, d.reason)
    summary = train(cfg)
    record_inputs(run_dir, current)
    return {**summary, "reused": False}


def evaluate_or_reuse(run_dir: Path, eval_cfg: EvalConfig | None = None, device: str = "cpu",
                      reuse: bool = True) -> dict[str, Any]:
    """:func:`pipeline.train.evaluate_checkpoint`, or its ``metrics.json`` when ``reuse`` and
    that file scores the current weights for the same evaluation settings (``eval_cfg``
    None: the run's own)."""
    run_dir = Path(run_dir)
    if reuse:
        ecfg = eval_cfg
        if ecfg is None:
            try:
                ecfg = TrainConfig(**json.loads((run_dir / "config.json").read_text())
                                   ["train"]).eval
            except (OSError, ValueError, KeyError, TypeError, PipelineError):
                ecfg = None
        m = metrics_for(run_dir, ecfg) if ecfg is not None else None
        if m is not None:
            log.info("reusing metrics %s (weights and evaluation settings unchanged)",
                     run_dir / metrics_file(ecfg.exclude, ecfg.repeat_target))
            return m
    return evaluate_checkpoint(run_dir, eval_cfg, device=device)


__all__ = ["Decision", "INPUTS_FILE", "tables_identity", "store_identity", "run_inputs",
           "record_inputs", "same_config", "same_inputs", "metrics_for", "finished_run",
           "train_or_reuse", "evaluate_or_reuse"]
