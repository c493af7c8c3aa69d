"""Stage 2: train a sequential recommender on cached hidden states only.

No encoder is loaded here: the item encoder reads the stores written by stage 1
(``stores.hidden_states``) into memory once, and every step computes the item table from
those cached tensors (IISAN's decoupled PEFT with caching, Fu et al. SIGIR 2024, sec. III-F).

Protocol (SASRec / IISAN): all-position next-item training with full-softmax cross-entropy
over every item; leave-one-out by time (``pipeline.split``); validation NDCG@10 after every
epoch with early stopping (patience in epochs); test metrics at the best validation epoch
only (``pipeline.evaluate``). Long training sequences are cut into consecutive windows of
``max_len + 1`` items from the most recent backwards, so every training interaction is a
target exactly once (SASRec keeps only the last window; with MovieLens' long histories that
discards most of the data).

Outputs in ``<out_dir>/<name>/``: ``model.safetensors`` (weights; the cached hidden states
are buffers and are not saved), ``config.json`` (the resolved config and the specs of the
stores read), ``history.csv`` (per-epoch loss and validation metrics) and ``metrics.json``.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from models.recommender import ContentItemTable, IDItemTable, SequentialRecommender
from models.san import IISANConfig, IISANItemEncoder
from models.sasrec import SASRec, SASRecConfig
from pipeline.errors import ConfigError
from pipeline.evaluate import EvalConfig, evaluate, popularity_score_fn
from pipeline.split import SequenceSplit, build_split, pad_left
from stores.hidden_states import HiddenStateStore, StoreSpec, dump_json
from stores.tables import items_fingerprint, read_tables

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """One stage-2 training run, validated up front.

    Fields:
        name: label of the run (folder and metrics.csv ``model`` column).
        tables_dir: folder with interactions.parquet / items.parquet.
        out_dir: checkpoints go to ``out_dir/name``.
        item_encoder: ``id`` (ID embeddings) or ``iisan`` (IISAN-VS/VA over cached states).
        text_store / image_store: stores read by ``iisan`` (either may be None).
        text_layers / image_layers: hidden-state indices to read (default: all stored).
        hidden, max_len, n_layers, n_heads, dropout: SASRec settings (IISAN: 64, 50, 2, 2, 0.1).
        adapter_dim, use_intra, use_inter, use_gates: IISAN settings.
        lr, weight_decay, batch_size: AdamW settings; batch_size in training windows.
        max_epochs, patience: early stopping on validation ``monitor`` (in epochs).
        seed: controls initialisation and shuffling.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    tables_dir: Path
    out_dir: Path
    item_encoder: Literal["id", "iisan"] = "id"
    text_store: Path | None = None
    image_store: Path | None = None
    text_layers: tuple[int, ...] | None = None
    image_layers: tuple[int, ...] | None = None
    hidden: int = Field(default=64, ge=1)
    max_len: int = Field(default=50, ge=2)
    n_layers: int = Field(default=2, ge=1)
    n_heads: int = Field(default=2, ge=1)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    adapter_dim: int = Field(default=64, ge=1)
    use_intra: bool = True
    use_inter: bool = True
    use_gates: bool = True
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=64, ge=1)
    max_epochs: int = Field(default=100, ge=1)
    patience: int = Field(default=10, ge=1)
    monitor: str = "NDCG@10"
    seed: int = 42
    device: str = "cpu"
    eval: EvalConfig = EvalConfig()


def training_windows(split: SequenceSplit, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All-position training windows covering every training interaction once.

    Each training sequence ``s`` (``split.train_sequences()``) is cut, from its end, into
    windows of at most ``max_len + 1`` items overlapping by one item; a window ``w`` gives
    input ``w[:-1]`` and target ``w[1:]``, left-padded with 0 to ``max_len``.

    Returns:
        inputs (W, max_len) long, targets (W, max_len) long (0 = no target).
    """
    ins, outs = [], []
    for s in split.train_sequences():
        end = len(s)
        while end >= 2:
            w = s[max(0, end - max_len - 1):end]
            ins.append(w[:-1])
            outs.append(w[1:])
            end -= max_len
    if not ins:
        raise ConfigError("no user has two or more training interactions")
    return pad_left(ins, max_len), pad_left(outs, max_len)


def load_cached(store: Path, layers: tuple[int, ...] | None, items_fp: str,
                item_ids: np.ndarray) -> tuple[torch.Tensor, StoreSpec]:
    """Read a complete store into memory as a float16 tensor (N, K, D).

    Raises:
        StoreIncompleteError, StoreMismatchError: half-written store, or a store written
            for another items table (field ``items_fingerprint``) or without ``layers``.
    """
    st = HiddenStateStore.open(store)
    if st.spec.items_fingerprint != items_fp:
        from pipeline.errors import StoreMismatchError
        raise StoreMismatchError("items_fingerprint", items_fp, st.spec.items_fingerprint,
                                 store=str(store))
    if not np.array_equal(st.item_ids, item_ids):
        from pipeline.errors import StoreMismatchError
        raise StoreMismatchError("item_id", f"{len(item_ids)} catalogue items",
                                 f"{st.num_items} stored rows", store=str(store))
    data = st.read(layers=layers)
    if st.spec.dtype == "bfloat16":
        from stores.hidden_states import bf16_bits_to_float32
        data = bf16_bits_to_float32(data)
    return torch.from_numpy(np.ascontiguousarray(data)).to(torch.float16), st.spec


def build_model(cfg: TrainConfig, num_items: int, text_h: torch.Tensor | None,
                image_h: torch.Tensor | None) -> SequentialRecommender:
    """Item table (ID or IISAN over cached states) + SASRec, as configured."""
    seq = SASRec(SASRecConfig(hidden=cfg.hidden, max_len=cfg.max_len, n_layers=cfg.n_layers,
                              n_heads=cfg.n_heads, dropout=cfg.dropout, attn_dropout=cfg.dropout))
    if cfg.item_encoder == "id":
        table: torch.nn.Module = IDItemTable(num_items, cfg.hidden)
    else:
        icfg = IISANConfig(
            text_dim=text_h.shape[2] if text_h is not None else 0,
            image_dim=image_h.shape[2] if image_h is not None else 0,
            text_rows=text_h.shape[1] if text_h is not None else 0,
            image_rows=image_h.shape[1] if image_h is not None else 0,
            adapter_dim=cfg.adapter_dim, out_dim=cfg.hidden, use_intra=cfg.use_intra,
            use_inter=cfg.use_inter, use_gates=cfg.use_gates)
        table = ContentItemTable(IISANItemEncoder(icfg), text_h, image_h)
    return SequentialRecommender(table, seq)


def _score_fn(model: SequentialRecommender):
    def score(histories: torch.Tensor) -> torch.Tensor:
        return model.score_last(histories)
    return score


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train, early-stop on validation, evaluate test at the best epoch, save the checkpoint.

    The test split is not touched here: :func:`evaluate_checkpoint` scores the saved weights.

    Returns:
        {"name", "checkpoint_dir", "best_epoch", "epochs_run", "best_valid": history row,
         "seconds", "seconds_per_epoch", "params"}
    Raises:
        ConfigError: ``iisan`` without any store; StoreError subclasses from the stores.
    """
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    tables = read_tables(cfg.tables_dir)
    items = tables.items.sort_values("item_id")
    item_ids = items["item_id"].to_numpy()
    split = build_split(tables.interactions, item_ids)
    text_h = image_h = None
    specs: dict[str, Any] = {}
    if cfg.item_encoder == "iisan":
        if cfg.text_store is None and cfg.image_store is None:
            raise ConfigError("item_encoder='iisan' needs text_store and/or image_store")
        fp = items_fingerprint(items)
        if cfg.text_store is not None:
            text_h, s = load_cached(cfg.text_store, cfg.text_layers, fp, item_ids)
            specs["text"] = s.model_dump(mode="json")
        if cfg.image_store is not None:
            image_h, s = load_cached(cfg.image_store, cfg.image_layers, fp, item_ids)
            specs["image"] = s.model_dump(mode="json")
    dev = torch.device(cfg.device)
    model = build_model(cfg, split.num_items, text_h, image_h).to(dev)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inputs, targets = training_windows(split, cfg.max_len)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    ecfg = cfg.eval.model_copy(update={"max_len": cfg.max_len})
    best, best_epoch, best_state, history = -1.0, 0, None, []
    run_dir = cfg.out_dir / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        perm = torch.randperm(len(inputs), generator=gen)
        losses = []
        for b in range(0, len(perm), cfg.batch_size):
            idx = perm[b:b + cfg.batch_size]
            loss = model.loss(inputs[idx].to(dev), targets[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        valid = evaluate(_score_fn(model), split, "valid", ecfg, device=dev)
        score = valid[cfg.monitor]
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), **valid})
        log.info("%s epoch %d loss %.4f valid %s %.4f", cfg.name, epoch, np.mean(losses),
                 cfg.monitor, score)
        if score > best:
            best, best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= cfg.patience:
            break
    model.load_state_dict(best_state)
    secs = time.perf_counter() - t0
    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()},
              str(run_dir / "model.safetensors"))
    (run_dir / "config.json").write_text(dump_json({
        "train": cfg.model_dump(mode="json"), "stores": specs,
        "num_items": split.num_items, "num_users": len(split.user_ids),
        "items_fingerprint": tables.manifest.get("items_fingerprint")
        or tables.manifest.get("fingerprint")}))
    with open(run_dir / "history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    result = {"name": cfg.name, "checkpoint_dir": str(run_dir), "best_epoch": best_epoch,
              "epochs_run": len(history), "best_valid": history[best_epoch - 1],
              "seconds": round(secs, 2), "seconds_per_epoch": round(secs / len(history), 3),
              "params": params, "exclude": ecfg.exclude}
    (run_dir / "train_summary.json").write_text(json.dumps(result, indent=2))
    return result


def evaluate_checkpoint(run_dir: Path, eval_cfg: EvalConfig | None = None,
                        device: str = "cpu") -> dict[str, Any]:
    """Rebuild a trained model from ``config.json`` + ``model.safetensors`` and score it.

    The cached hidden states are re-read from the stores named in the config (they are not
    part of the checkpoint); a store that changed since training raises StoreMismatchError.

    Returns:
        {"name", "valid": metrics, "test": metrics, "exclude"}; also written to metrics.json.
    """
    from safetensors.torch import load_file

    saved = json.loads((Path(run_dir) / "config.json").read_text())
    cfg = TrainConfig(**saved["train"])
    if eval_cfg is not None:
        cfg = cfg.model_copy(update={"eval": eval_cfg})
    ecfg = cfg.eval.model_copy(update={"max_len": cfg.max_len})
    tables = read_tables(cfg.tables_dir)
    item_ids = tables.items.sort_values("item_id")["item_id"].to_numpy()
    split = build_split(tables.interactions, item_ids)
    text_h = image_h = None
    if cfg.item_encoder == "iisan":
        fp = items_fingerprint(tables.items.sort_values("item_id"))
        if cfg.text_store is not None:
            text_h, _ = load_cached(cfg.text_store, cfg.text_layers, fp, item_ids)
        if cfg.image_store is not None:
            image_h, _ = load_cached(cfg.image_store, cfg.image_layers, fp, item_ids)
    model = build_model(cfg, split.num_items, text_h, image_h)
    model.load_state_dict(load_file(str(Path(run_dir) / "model.safetensors")))
    model.to(device).eval()
    out = {"name": cfg.name, "exclude": ecfg.exclude,
           "valid": evaluate(_score_fn(model), split, "valid", ecfg, device=device),
           "test": evaluate(_score_fn(model), split, "test", ecfg, device=device)}
    (Path(run_dir) / "metrics.json").write_text(json.dumps(out, indent=2))
    return out


def popularity(tables_dir: Path, eval_cfg: EvalConfig = EvalConfig()) -> dict[str, Any]:
    """Popularity baseline: rank items by training-interaction count (same split and metrics)."""
    tables = read_tables(tables_dir)
    split = build_split(tables.interactions, tables.items["item_id"].to_numpy())
    fn = popularity_score_fn(split)
    return {"name": "popularity", "valid": evaluate(fn, split, "valid", eval_cfg),
            "test": evaluate(fn, split, "test", eval_cfg), "exclude": eval_cfg.exclude}
