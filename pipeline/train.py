"""Stage 2: train a recommender on cached hidden states only, and evaluate it.

Model assembly is in ``pipeline.model_build``, full ranking in ``pipeline.ranking`` and the
run mechanics (history, graceful stop, id maps) in ``pipeline.train_runs``, the training
examples (windows, VBPR pairs) in ``pipeline.train_examples``; every name is re-exported here.

No encoder is loaded here: item encoders read the stores written by stage 1
(``stores.hidden_states``) into memory once, and every step computes the item table from
those cached tensors (IISAN's decoupled PEFT with caching, Fu et al. SIGIR 2024, sec. III-F).

One :class:`TrainConfig` describes a run and is validated up front (cross-field rules raise
:class:`pipeline.errors.ConfigError` when the config is built): the item encoder (item IDs;
IISAN-VS/VA; fMRLRec concat-and-project; EM3 Fusion-Q-Former; a content encoder plus item
IDs), the sequence model (SASRec, LRURec, GRU4Rec; Matryoshka ``sizes`` for SASRec / LRURec;
or the non-sequential VBPR), the loss (full-softmax CE, IISAN's in-batch debiased CE, BPR;
plus EM3's CIC with a weight), LoRA continuation of a trained run (EM3), the optimiser
(AdamW) and the seed.

Protocol (SASRec / IISAN): all-position next-item training; leave-one-out by time
(``pipeline.split``); validation after every epoch at the largest size with early stopping
on ``monitor`` (patience in epochs; fMRLRec's public code also monitors the largest size);
test metrics at the best validation epoch only, for every Matryoshka size, for all users and
broken down into users whose target is a cold item (at most ``cold_threshold`` training
interactions) and the rest. The history-exclusion rule (``eval.exclude``) is reported with
every number. Long training sequences are cut into consecutive windows of ``max_len + 1``
items from the most recent backwards, so every training interaction is a target exactly once
(SASRec keeps only the last window; with MovieLens' long histories that discards most data).
VBPR trains on (user, item) pairs of the training sequences with BPR.

Outputs in ``<out_dir>/<name>/``: ``model.safetensors`` (weights; cached hidden states are
buffers and are not saved; LoRA adapters are merged), ``config.json`` (the resolved config
and the specs of the stores read), ``history.csv`` (per-epoch loss, validation metrics and
seconds), ``train_summary.json`` and, after :func:`evaluate_checkpoint`, ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from models.lora import apply_lora, lora_parameters, merge_lora
from models.losses import CICHead, bpr_loss, popularity_log_prob, sample_negatives
from models.matryoshka import effective_params
from models.rng import run_generators, seeded_init
from models.vbpr import VBPR
from pipeline.errors import ConfigError
from pipeline.evaluate import EvalConfig, evaluate, popularity_score_fn
from pipeline.metrics import metrics_from_ranks, repeat_targets
from pipeline.train_runs import (GracefulStop, HistoryLog, metrics_file, per_user_file,
                                 valid_sample, write_id_map, write_per_user)
from pipeline.split import SequenceSplit, build_split
from pipeline.cached_inputs import load_stores, row_widths, token_masks
from stores.hidden_states import dump_json
from stores.tables import key_maps, read_tables

# model assembly and full ranking live in their own modules; re-exported for callers and tests
from pipeline.model_build import (ScoreFn, build_item_table, build_model, build_seq_model,  # noqa: F401
                                  describe_model, iisan_config, score_fn_for, tower_layers,
                                  vbpr_features)
from pipeline.ranking import breakdown, rank_examples  # noqa: F401
from pipeline.train_examples import training_pairs, training_windows  # noqa: F401

log = logging.getLogger(__name__)

CONTENT_ENCODERS = ("iisan", "concat", "qformer")
# fields a LoRA run must share with the run it continues (max_len may differ without a
# position table: LRURec, GRU4Rec)
ARCH_FIELDS = ("item_encoder", "use_id", "text_store", "image_store", "text_layers",
               "image_layers", "feature_norm", "seq_model", "hidden", "sizes", "n_layers", "n_heads",
               "gru_layers", "lru_r_min", "lru_r_max", "lru_state_mult", "lru_block", "adapter_dim",
               "use_intra", "use_inter", "use_gates", "iisan_pairing", "iisan_inter_start",
               "iisan_ungated", "iisan_without_intra", "qformer_queries", "qformer_layers",
               "qformer_heads", "qformer_dim", "qformer_token_norm", "qformer_query_init",
               "table_norm", "vbpr_factors")


class TrainConfig(BaseModel):
    """One stage-2 training run, validated up front.

    Fields:
        name: label of the run (folder and metrics.csv ``model`` column).
        tables_dir: folder with interactions.parquet / items.parquet.
        out_dir: checkpoints go to ``out_dir/name``.
        item_encoder: ``id`` (item-ID embeddings), ``iisan`` (IISAN-VS/VA over the cached
            states), ``concat`` (fMRLRec concat-and-project of the top cached rows; with one
            store: the frozen-feature linear baseline) or ``qformer`` (EM3 Fusion-Q-Former).
        use_id: add learned item-ID embeddings to a content encoder's table (EM3).
        text_store / image_store: stores read by content encoders and VBPR (either may be None).
        text_layers / image_layers: hidden-state indices to read (default: all stored).
        cache_dtype: dtype the cached states are held in during training: ``float32``
            (default; fastest on CPU, twice the memory) or ``float16`` (as stored).
        feature_norm: ``standardize`` (default): each cached feature (row k, dim d) is
            shifted and scaled once at load time to mean 0 and std ``1 / sqrt(D)`` over the
            catalogue (a row then has norm ~1; features with std < 1e-6 are only centred);
            ``none``: the raw states. Departure from IISAN, whose pretrained BERT / ViT
            states are fed raw: here the random ViT's rows have norms ~30-40 whose
            item-independent part dwarfs the item-specific one (row 0, the [CLS] embedding
            output, is identical for all items); raw or unit-variance inputs gave initial
            losses of 15-35 (uniform: 7.5) and a diverging first epoch at lr 3e-3 on the
            demo data, unit-norm rows train smoothly.
        seq_model: ``sasrec``, ``lru`` (LRURec / fMRLRec), ``gru4rec`` or ``vbpr``.
        hidden: model width D (the largest Matryoshka size).
        sizes: Matryoshka sizes (ascending, last = hidden) for sasrec / lru; None = no nesting.
        max_len, n_layers, n_heads, dropout: sequence-model settings (IISAN: 50, 2, 2, 0.1).
        gru_layers: GRU4Rec layers. lru_r_min / lru_r_max / lru_state_mult: LRU settings.
        lru_block: "fmrlrec" (fMRLRec's block, nests) or "lrurec" (LRURec's own
            post-LN block with a 4 D GELU FFN; ``models.lru.LRUConfig.block``).
        adapter_dim, use_intra, use_inter, use_gates: IISAN settings (ablation switches).
        iisan_pairing: rows the Inter-SAN pairs (``models.san.IISANConfig.pairing``):
            ``versa`` (IISAN-Versa group LayerDrop for the stores' tower depths; the stores
            must hold those hidden states), ``top`` (top min(Lt, Li) rows) or None (default:
            ``versa`` when the stores hold its rows, else ``top``). The resolved pairing is
            written to the run's ``config.json`` (``model.iisan``).
        iisan_inter_start / iisan_ungated / iisan_without_intra: ``IISANConfig``'s
            ``inter_start`` (``zeros``, public code / ``gate``), ``ungated`` (``sum``, public
            code / ``half``) and ``without_intra`` (``inter_only``, public code /
            ``frozen_rows``).
        qformer_queries / qformer_layers / qformer_heads / qformer_dim / qformer_token_norm /
            qformer_query_init: Fusion-Q-Former (``models.qformer``; token-level stores,
            ``pooling="tokens"``, give it every token of each read row, as EM3).
        table_norm: a content table's normalisation over the catalogue
            (``models.recommender.ContentItemTable``): ``none``, ``center``, ``standardize``.
        vbpr_factors: K = K' of VBPR.
        loss: ``ce`` (full softmax; averaged over sizes, fMRLRec eq. 14), ``debiased_ce``
            (IISAN eq. 6-7) or ``bpr`` (``bpr_negatives`` uniform negatives per target).
        cic_weight, cic_temperature, cic_dim: EM3 CIC loss added with this weight (needs a
            content encoder with ``use_id``).
        lora_from: checkpoint folder of a trained run to continue with LoRA (EM3): its
            weights are loaded and frozen, adapters of rank ``lora_rank`` (scale
            ``lora_alpha / lora_rank``) on ``lora_targets`` (default: every linear layer of
            the sequence model) are trained, then merged into the saved weights.
        lr, weight_decay, batch_size: AdamW settings; batch_size in training windows (VBPR:
            ``batch_size * max_len`` pairs).
        max_epochs, patience, monitor: early stopping on validation (in epochs).
        min_epochs: early stopping never stops before this epoch (GRU4Rec sits on a
            popularity plateau for its first ~20 epochs, seed-dependent, before the
            sequence signal lifts validation; patience alone stopped some seeds there).
        valid_every: validate every this many epochs (patience still counts epochs; the
            last epoch is always validated).
        valid_users: validate during training on this fixed random sample of users (None:
            all); the best epoch's validation figures are then recomputed on all users, and
            the test is always full ranking over all users.
        time_budget_s: stop (after an epoch, best checkpoint kept) when the next epoch
            would end past this many seconds of training (None: no budget). The default,
            3 h, lets every run finish on a 2-core machine; early stopping ends most runs
            sooner. SIGTERM / SIGINT also stop a run cleanly (``pipeline.train_runs``).
        cold_threshold: a target item with at most this many training interactions is cold.
        seed: controls initialisation, shuffling and negative sampling.
    Raises:
        pydantic.ValidationError for a bad single field; ConfigError for an invalid
        combination (checked when the config is built).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    tables_dir: Path
    out_dir: Path
    item_encoder: Literal["id", "iisan", "concat", "qformer"] = "id"
    use_id: bool = False
    text_store: Path | None = None
    image_store: Path | None = None
    text_layers: tuple[int, ...] | None = None
    image_layers: tuple[int, ...] | None = None
    cache_dtype: Literal["float16", "float32"] = "float32"
    feature_norm: Literal["standardize", "none"] = "standardize"
    seq_model: Literal["sasrec", "lru", "gru4rec", "vbpr"] = "sasrec"
    hidden: int = Field(default=64, ge=1)
    sizes: tuple[int, ...] | None = None
    max_len: int = Field(default=50, ge=2)
    n_layers: int = Field(default=2, ge=1)
    n_heads: int = Field(default=2, ge=1)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    gru_layers: int = Field(default=1, ge=1)
    lru_r_min: float = Field(default=0.8, ge=0, lt=1)
    lru_r_max: float = Field(default=0.99, gt=0, lt=1)
    lru_state_mult: int = Field(default=1, ge=1)
    lru_block: Literal["fmrlrec", "lrurec"] = "fmrlrec"
    adapter_dim: int = Field(default=64, ge=1)
    use_intra: bool = True
    use_inter: bool = True
    use_gates: bool = True
    iisan_pairing: Literal["versa", "top"] | None = None
    iisan_inter_start: Literal["zeros", "gate"] = "zeros"
    iisan_ungated: Literal["sum", "half"] = "sum"
    iisan_without_intra: Literal["inter_only", "frozen_rows"] = "inter_only"
    qformer_queries: int = Field(default=4, ge=1)
    qformer_layers: int = Field(default=1, ge=1)
    qformer_heads: int = Field(default=2, ge=1)
    qformer_dim: int = Field(default=64, ge=1)
    qformer_token_norm: Literal["layernorm", "rms", "none"] = "layernorm"
    qformer_query_init: Literal["learned", "learned_plus_mean"] = "learned"
    table_norm: Literal["none", "center", "standardize"] = "none"
    vbpr_factors: int = Field(default=32, ge=1)
    loss: Literal["ce", "debiased_ce", "bpr"] = "ce"
    bpr_negatives: int = Field(default=1, ge=1)
    cic_weight: float = Field(default=0.0, ge=0)
    cic_temperature: float = Field(default=0.1, gt=0)
    cic_dim: int = Field(default=64, ge=1)
    lora_from: Path | None = None
    lora_rank: int = Field(default=8, ge=1)
    lora_alpha: float = Field(default=16.0, gt=0)
    lora_targets: tuple[str, ...] | None = None
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=64, ge=1)
    max_epochs: int = Field(default=100, ge=1)
    patience: int = Field(default=10, ge=1)
    min_epochs: int = Field(default=1, ge=1)
    monitor: str = "NDCG@10"
    valid_every: int = Field(default=1, ge=1)
    valid_users: int | None = Field(default=None, ge=1)
    time_budget_s: float | None = Field(default=3 * 3600.0, gt=0)
    cold_threshold: int = Field(default=20, ge=0)
    seed: int = 42
    device: str = "cpu"
    eval: EvalConfig = EvalConfig()

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        self.check()

    def check(self) -> None:
        """Cross-field rules. Raises ConfigError naming the fields."""
        content = self.item_encoder in CONTENT_ENCODERS
        has_store = self.text_store is not None or self.image_store is not None
        if self.seq_model == "vbpr":
            if self.loss != "bpr":
                raise ConfigError(f"seq_model='vbpr' is trained with loss='bpr', got {self.loss!r}")
            if not has_store:
                raise ConfigError("seq_model='vbpr' needs text_store and/or image_store (its "
                                  "item features)")
            if self.item_encoder != "id" or self.use_id or self.sizes or self.cic_weight:
                raise ConfigError("seq_model='vbpr' has its own item model: leave "
                                  "item_encoder='id', use_id, sizes and cic_weight unset")
        elif content and not has_store:
            raise ConfigError(f"item_encoder={self.item_encoder!r} needs text_store and/or "
                              f"image_store")
        elif self.item_encoder == "id" and has_store:
            raise ConfigError("item_encoder='id' reads no store: drop text_store / image_store "
                              "(or pick a content encoder)")
        if self.use_id and not content:
            raise ConfigError("use_id adds ID embeddings to a content encoder "
                              f"(iisan, concat, qformer), not to {self.item_encoder!r}")
        if self.table_norm != "none" and not content:
            raise ConfigError(f"table_norm normalises a content encoder's table, not "
                              f"item_encoder={self.item_encoder!r}")
        if self.cic_weight > 0 and not (content and self.use_id):
            raise ConfigError("cic_weight > 0 (EM3 CIC) needs a content encoder with use_id=True")
        if self.sizes is not None:
            if self.seq_model not in ("sasrec", "lru"):
                raise ConfigError(f"Matryoshka sizes are implemented for sasrec and lru, not "
                                  f"{self.seq_model!r}")
            s = self.sizes
            if not s or any(b <= a for a, b in zip(s, s[1:])) or s[0] < 1 or s[-1] != self.hidden:
                raise ConfigError(f"sizes must be ascending with the last equal to hidden="
                                  f"{self.hidden}, got {s}")
        if self.seq_model == "sasrec":
            bad = [v for v in (self.sizes or (self.hidden,)) if v % self.n_heads]
            if bad:
                raise ConfigError(f"SASRec width(s) {bad} not divisible by n_heads={self.n_heads}")
        if self.item_encoder == "qformer" and self.qformer_dim % self.qformer_heads:
            raise ConfigError(f"qformer_dim={self.qformer_dim} not divisible by qformer_heads="
                              f"{self.qformer_heads}")
        if self.lru_r_min >= self.lru_r_max:
            raise ConfigError(f"lru_r_min={self.lru_r_min} must be < lru_r_max={self.lru_r_max}")
        if self.lru_block == "lrurec" and self.sizes:
            raise ConfigError(f"lru_block 'lrurec' does not nest (sizes {self.sizes}); "
                              "Matryoshka LRURec uses lru_block 'fmrlrec'")
        if self.lora_from is not None and (self.seq_model == "vbpr" or self.sizes):
            raise ConfigError("LoRA continuation applies to a non-nested sequence model "
                              "(not vbpr, no Matryoshka sizes)")
        if self.monitor not in {f"{m}@{k}" for m in ("HR", "NDCG") for k in self.eval.ks} | {"MRR"}:
            raise ConfigError(f"monitor={self.monitor!r} is not a reported metric (HR@K / NDCG@K "
                              f"for K in {self.eval.ks}, or MRR)")

    @property
    def all_sizes(self) -> tuple[int, ...]:
        return self.sizes if self.sizes is not None else (self.hidden,)


# --------------------------------------------------------------------------- data

def _base_checkpoint(cfg: TrainConfig) -> Path:
    base = Path(cfg.lora_from)  # type: ignore[arg-type]
    if not (base / "config.json").exists() or not (base / "model.safetensors").exists():
        raise ConfigError(f"lora_from={base} has no config.json / model.safetensors")
    saved = TrainConfig(**json.loads((base / "config.json").read_text())["train"])
    for f in ARCH_FIELDS:
        if getattr(saved, f) != getattr(cfg, f):
            raise ConfigError(f"lora_from run differs in {f}: {getattr(saved, f)!r} there, "
                              f"{getattr(cfg, f)!r} here")
    if cfg.seq_model == "sasrec" and saved.max_len != cfg.max_len:
        raise ConfigError(f"SASRec has a position table of max_len={saved.max_len}: a LoRA "
                          f"run cannot change it to {cfg.max_len}")
    return base


def _cic_items(seqs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    items = torch.unique(torch.cat([seqs.reshape(-1), targets.reshape(-1)]))
    return items[items != 0]


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train, early-stop on validation, save the best checkpoint.

    The test split is not touched here: :func:`evaluate_checkpoint` scores the saved weights.

    Returns:
        {"name", "checkpoint_dir", "best_epoch", "epochs_run", "best_valid": history row,
         "seconds", "seconds_per_epoch" (training only, without validation), "params"
         (trainable), "params_effective" (Matryoshka-masked weights not counted), "exclude"}
    Raises:
        ConfigError: invalid combination; StoreError subclasses from the stores.
    """
    from safetensors.torch import load_file, save_file

    from pipeline import progress

    cfg.check()
    t0 = time.perf_counter()
    tables = read_tables(cfg.tables_dir)
    items = tables.items.sort_values("item_id")
    item_ids = items["item_id"].to_numpy()
    split = build_split(tables.interactions, item_ids)
    text_h, image_h, specs = load_stores(cfg, tables, item_ids)
    dev = torch.device(cfg.device)
    # the run's own random streams: initial weights under its seed (not racing other runs'
    # threads for torch's global generator), dropout masks from run_generators below
    with seeded_init(cfg.seed):
        model = build_model(cfg, split.num_items, text_h, image_h, len(split.user_ids),
                            row_widths(specs), tower_layers(cfg, specs), token_masks(cfg, item_ids))
        lora_info: dict[str, Any] = {}
        if cfg.lora_from is not None:
            base = _base_checkpoint(cfg)
            model.load_state_dict(load_file(str(base / "model.safetensors")))
            model.requires_grad_(False)
            apply_lora(model.seq_model, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha)
            lora_info = {"lora_from": str(base), "lora_params": lora_parameters(model)}
        cic = (CICHead(cfg.hidden, cfg.hidden, cfg.cic_dim, cfg.cic_temperature)
               if cfg.cic_weight > 0 else None)
    model.to(dev)
    if cic is not None:
        cic.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params + (list(cic.parameters()) if cic else []), lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    counts = split.train_item_counts()
    log_pop = popularity_log_prob(torch.from_numpy(counts)).to(dev)
    vbpr = isinstance(model, VBPR)
    if vbpr:
        data = training_pairs(split)
        step_size = cfg.batch_size * cfg.max_len
    else:
        data = training_windows(split, cfg.max_len)
        step_size = cfg.batch_size
    ecfg = cfg.eval.model_copy(update={"max_len": cfg.max_len})
    score = score_fn_for(model)
    best, best_epoch, best_state, history = -1.0, 0, None, []
    train_secs = 0.0
    run_dir = cfg.out_dir / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    hist_log = HistoryLog(run_dir / "history.csv")
    metric_keys = [f"{m}@{k}" for k in ecfg.ks for m in ("HR", "NDCG")] + ["MRR"]
    n_valid = len(split.examples("valid")[1])
    sample = valid_sample(n_valid, cfg.valid_users, cfg.seed)
    log.info("%s: training on %d %s, %d items, %d trainable parameters, up to %d epochs "
             "(early stop on valid %s, patience %d; validation every %d epoch(s) on %s users; "
             "time budget %s; exclude %s, repeat targets %s)", cfg.name, len(data[0]),
             "pairs" if vbpr else "windows", split.num_items, n_params, cfg.max_epochs,
             cfg.monitor, cfg.patience, cfg.valid_every,
             "all" if sample is None else f"{len(sample)} of {n_valid}",
             f"{cfg.time_budget_s:.0f} s" if cfg.time_budget_s else "none", ecfg.exclude,
             ecfg.repeat_target)
    epochs_bar = progress.bar(cfg.max_epochs, cfg.name, unit="epoch")
    stopped: str | None = None
    t_loop = time.perf_counter()
    with GracefulStop() as stop, run_generators(cfg.seed):
        for epoch in range(1, cfg.max_epochs + 1):
            te = time.perf_counter()
            model.train()
            perm = torch.randperm(len(data[0]), generator=gen)
            losses = []
            for b in range(0, len(perm), step_size):
                if stop.requested:
                    break
                idx = perm[b:b + step_size]
                a, y = data[0][idx].to(dev), data[1][idx].to(dev)
                if vbpr:
                    neg = sample_negatives(y, split.num_items, cfg.bpr_negatives, gen)
                    loss = bpr_loss(model.score(a, y[:, None])[:, 0], model.score(a, neg))
                elif cic is not None:
                    content, ids = model.item_table.parts()  # each (N + 1, D)
                    table = content + ids
                    loss = model.loss(a, y, cfg.loss, table=table, log_pop=log_pop,
                                      num_negatives=cfg.bpr_negatives, generator=gen)
                    it = _cic_items(a, y)
                    loss = loss + cfg.cic_weight * cic(content[it], ids[it])
                else:
                    loss = model.loss(a, y, cfg.loss, log_pop=log_pop,
                                      num_negatives=cfg.bpr_negatives, generator=gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            train_secs += time.perf_counter() - te
            elapsed = time.perf_counter() - t_loop
            if stop.requested:
                stopped = stop.requested
            elif cfg.time_budget_s and elapsed + elapsed / epoch > cfg.time_budget_s:
                stopped = "time_budget"
            validate = (epoch % cfg.valid_every == 0 or epoch == cfg.max_epochs
                        or stopped is not None or best_state is None)
            epoch_loss = float(np.mean(losses)) if losses else float("nan")
            value, improved = float("nan"), False
            if validate:
                model.eval()
                ranks, _ = rank_examples(score, split, "valid", ecfg, dev, sample=sample)
                valid = {**metrics_from_ranks(ranks[-1], ecfg.ks), "n_users": len(ranks[-1])}
                value = valid[cfg.monitor]
                improved = value > best
                if improved:
                    best, best_epoch = value, epoch
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                valid = {**{k: "" for k in metric_keys}, "n_users": ""}
            epoch_s = time.perf_counter() - te
            row = {"epoch": epoch, "loss": epoch_loss, **valid, "validated": int(validate),
                   "seconds": round(epoch_s, 3)}
            history.append(row)
            hist_log.append(row)
            # one line per epoch (shown by Prefect: PREFECT_LOGGING_EXTRA_LOGGERS=pipeline)
            log.info("%s epoch %d/%d loss %.4f valid %s %s (best %.4f @ %d) %.1f s", cfg.name,
                     epoch, cfg.max_epochs, epoch_loss, cfg.monitor,
                     f"{value:.4f}" if validate else "-", best, best_epoch, epoch_s)
            epochs_bar.update(1)
            epochs_bar.set_postfix_str(f"loss {epoch_loss:.4f} {cfg.monitor} "
                                       f"{value:.4f} best {best:.4f} @ {best_epoch}")
            if stopped is not None:
                log.warning("%s: stopping after epoch %d (%s; %.0f s of training): the best "
                            "checkpoint (epoch %d) is saved", cfg.name, epoch,
                            "time budget" if stopped == "time_budget" else stopped, elapsed,
                            best_epoch)
                break
            if (validate and not improved and epoch - best_epoch >= cfg.patience
                    and epoch >= cfg.min_epochs):
                log.info("%s: stopping early after epoch %d: no better valid %s for %d epochs "
                         "(best %.4f @ %d)", cfg.name, epoch, cfg.monitor, cfg.patience, best,
                         best_epoch)
                break
    epochs_bar.close()
    model.load_state_dict(best_state)
    best_valid = dict(history[best_epoch - 1])
    if sample is not None:  # the best epoch's figures on every user
        model.eval()
        ranks, _ = rank_examples(score, split, "valid", ecfg, dev)
        best_valid.update(metrics_from_ranks(ranks[-1], ecfg.ks), n_users=len(ranks[-1]),
                          sampled_value=best)
    if cfg.lora_from is not None:
        merge_lora(model.seq_model)
    secs = time.perf_counter() - t0
    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()},
              str(run_dir / "model.safetensors"))
    (run_dir / "config.json").write_text(dump_json({
        "train": cfg.model_dump(mode="json"), "stores": specs, "model": describe_model(model),
        "num_items": split.num_items, "num_users": len(split.user_ids),
        "items_fingerprint": tables.manifest.get("items_fingerprint")
        or tables.manifest.get("fingerprint")}))
    item_keys, user_keys = key_maps(tables)
    write_id_map(run_dir, split.item_ids, item_keys, split.user_ids, user_keys)
    result = {"name": cfg.name, "checkpoint_dir": str(run_dir), "best_epoch": best_epoch,
              "epochs_run": len(history), "best_valid": best_valid,
              "seconds": round(secs, 2), "seconds_per_epoch": round(train_secs / len(history), 3),
              "params": n_params, "params_effective": effective_params(model)
              if cfg.lora_from is None else lora_info["lora_params"],
              "exclude": ecfg.exclude, "repeat_target": ecfg.repeat_target,
              "stopped": stopped, **lora_info}
    (run_dir / "train_summary.json").write_text(json.dumps(result, indent=2))
    return result


def load_checkpoint(run_dir: Path, device: str = "cpu"
                    ) -> tuple[TrainConfig, torch.nn.Module, SequenceSplit]:
    """Rebuild a trained model from ``config.json`` + ``model.safetensors``.

    The cached hidden states are re-read from the stores named in the config (they are not
    part of the checkpoint); a store that changed since training raises StoreMismatchError.
    Returns: (config, model in eval mode on ``device``, split).
    """
    from safetensors.torch import load_file

    saved = json.loads((Path(run_dir) / "config.json").read_text())
    cfg = TrainConfig(**saved["train"])
    tables = read_tables(cfg.tables_dir)
    item_ids = tables.items.sort_values("item_id")["item_id"].to_numpy()
    split = build_split(tables.interactions, item_ids)
    text_h, image_h, specs = load_stores(cfg, tables, item_ids)
    model = build_model(cfg, split.num_items, text_h, image_h, len(split.user_ids),
                        row_widths(specs), tower_layers(cfg, specs), token_masks(cfg, item_ids))
    model.load_state_dict(load_file(str(Path(run_dir) / "model.safetensors")))
    return cfg, model.to(device).eval(), split


def evaluate_checkpoint(run_dir: Path, eval_cfg: EvalConfig | None = None,
                        device: str = "cpu", top_k: int = 10) -> dict[str, Any]:
    """Score a saved checkpoint on valid and test: every size, all / cold / warm targets.

    Full ranking over all items for every user with a target, under the exclusion and
    repeat-target rules of ``eval_cfg`` (None: the run's own). Writes
    ``metrics-<exclude>-<repeat_target>.json`` (:func:`pipeline.train_runs.metrics_file`)
    and ``per_user-<exclude>-<repeat_target>.csv`` (each user's target, its rank and the
    ``top_k`` best items, in the original ids; largest size; a Matryoshka run also writes
    ``per_user-<exclude>-<repeat_target>-d<size>.csv`` for each smaller size, without the
    top items, for the paired tests per size); ``metrics.json`` only when the rules are
    the run's own, so evaluating under another rule never overwrites the training-time
    metrics.

    Returns:
        {"name", "exclude", "repeat_target", "valid": metrics, "test": metrics (largest
         size, all users, as :func:`pipeline.evaluate.evaluate`), "repeat_targets": {"valid",
         "test": number of targets also in the excluded history}, "sizes",
         "cold_threshold", "by_size": {size: {"valid" | "test": {"all" | "cold" | "warm":
         metrics}}}}.
    """
    cfg, model, split = load_checkpoint(Path(run_dir), device)
    own = cfg.eval
    if eval_cfg is not None:
        cfg = cfg.model_copy(update={"eval": eval_cfg})
    ecfg = cfg.eval.model_copy(update={"max_len": cfg.max_len})
    counts = split.train_item_counts()
    score = score_fn_for(model)
    sizes = cfg.all_sizes if cfg.seq_model != "vbpr" else (2 * cfg.vbpr_factors,)
    by_size: dict[str, dict[str, Any]] = {str(s): {} for s in sizes}
    item_keys, user_keys = key_maps(read_tables(cfg.tables_dir))
    per_user = Path(run_dir) / per_user_file(ecfg.exclude, ecfg.repeat_target)
    per_size = {sz: Path(run_dir) / per_user_file(ecfg.exclude, ecfg.repeat_target, sz)
                for sz in sizes[:-1]}
    for f in (per_user, *per_size.values()):
        f.unlink(missing_ok=True)
    repeats: dict[str, int] = {}
    users = split.user_ids[[u for u, s in enumerate(split.sequences) if len(s) >= 3]]
    for stage in ("valid", "test"):
        tops: list[torch.Tensor] = []
        ranks, targets = rank_examples(score, split, stage, ecfg, device, tops=tops,
                                       top_k=top_k)
        hist, _ = split.examples(stage)
        repeats[stage] = int(repeat_targets(hist, targets, ecfg.exclude, ecfg.max_len).sum())
        for s, r in zip(sizes, ranks):
            by_size[str(s)][stage] = breakdown(r, targets, counts, cfg.cold_threshold, ecfg.ks)
        write_per_user(per_user, stage, users, targets, ranks[-1], torch.cat(tops),
                       split.item_ids, item_keys, user_keys)
        for sz, r in zip(sizes[:-1], ranks):  # the smaller Matryoshka sizes (no top list)
            write_per_user(per_size[sz], stage, users, targets, r, None, split.item_ids,
                           item_keys, user_keys)
    top = by_size[str(sizes[-1])]
    out = {"name": cfg.name, "exclude": ecfg.exclude, "repeat_target": ecfg.repeat_target,
           "valid": top["valid"]["all"], "test": top["test"]["all"], "repeat_targets": repeats,
           "sizes": list(sizes), "cold_threshold": cfg.cold_threshold, "by_size": by_size}
    text = json.dumps(out, indent=2)
    (Path(run_dir) / metrics_file(ecfg.exclude, ecfg.repeat_target)).write_text(text)
    if ecfg.model_dump(exclude={"max_len"}) == own.model_dump(exclude={"max_len"}):
        (Path(run_dir) / "metrics.json").write_text(text)
    log.info("%s evaluated (exclude %s, repeat targets %s: %d valid / %d test): valid NDCG@10 "
             "%.4f, test NDCG@10 %.4f HR@10 %.4f", cfg.name, ecfg.exclude, ecfg.repeat_target,
             repeats["valid"], repeats["test"], out["valid"].get("NDCG@10", float("nan")),
             out["test"].get("NDCG@10", float("nan")), out["test"].get("HR@10", float("nan")))
    return out


def popularity(tables_dir: Path, eval_cfg: EvalConfig = EvalConfig()) -> dict[str, Any]:
    """Popularity baseline: rank items by training-interaction count (same split and metrics)."""
    tables = read_tables(tables_dir)
    split = build_split(tables.interactions, tables.items["item_id"].to_numpy())
    fn = popularity_score_fn(split)
    return {"name": "popularity", "valid": evaluate(fn, split, "valid", eval_cfg),
            "test": evaluate(fn, split, "test", eval_cfg), "exclude": eval_cfg.exclude,
            "repeat_target": eval_cfg.repeat_target}
