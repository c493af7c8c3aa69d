"""Stage 2's model assembly: a :class:`pipeline.train.TrainConfig` and the cached hidden
states in, a :class:`models.recommender.SequentialRecommender` (or VBPR) out.

Split out of ``pipeline/train.py`` (no behaviour change): the item table (item IDs; IISAN
with its tower pairing; fMRLRec concat-and-project; EM3 Fusion-Q-Former; content + IDs), the
sequence model (SASRec / LRURec / GRU4Rec, Matryoshka sizes) and the score function the
full-ranking evaluation calls. ``pipeline.train`` re-exports every name.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

import torch

from models.gru4rec import GRU4Rec, GRU4RecConfig
from models.item_encoders import ContentIDItemTable, LinearFusionConfig, LinearFusionEncoder
from models.lru import LRUConfig, LRURec
from models.qformer import FusionQFormer, FusionQFormerConfig
from models.recommender import ContentItemTable, IDItemTable, SequentialRecommender
from models.san import IISANConfig, IISANItemEncoder
from models.sasrec import MatryoshkaSASRec, SASRec, SASRecConfig
from models.vbpr import VBPR, VBPRConfig
from pipeline.errors import ConfigError


if TYPE_CHECKING:
    from pipeline.train import TrainConfig

log = logging.getLogger("pipeline.train")


def build_seq_model(cfg: TrainConfig) -> torch.nn.Module:
    """The configured sequence model (SASRec / Matryoshka SASRec / LRURec / GRU4Rec)."""
    if cfg.seq_model == "sasrec":
        scfg = SASRecConfig(hidden=cfg.hidden, max_len=cfg.max_len, n_layers=cfg.n_layers,
                            n_heads=cfg.n_heads, dropout=cfg.dropout, attn_dropout=cfg.dropout)
        return MatryoshkaSASRec(scfg, cfg.sizes) if cfg.sizes else SASRec(scfg)
    if cfg.seq_model == "lru":
        return LRURec(LRUConfig(hidden=cfg.hidden, n_layers=cfg.n_layers, dropout=cfg.dropout,
                                lru_dropout=cfg.dropout, r_min=cfg.lru_r_min,
                                r_max=cfg.lru_r_max, state_mult=cfg.lru_state_mult,
                                sizes=cfg.sizes, block=cfg.lru_block))
    if cfg.seq_model == "gru4rec":
        return GRU4Rec(GRU4RecConfig(hidden=cfg.hidden, n_layers=cfg.gru_layers,
                                     dropout=cfg.dropout))
    raise ConfigError(f"{cfg.seq_model!r} is not a sequence model")


def tower_layers(cfg: TrainConfig, specs: dict[str, Any]) -> dict[str, Any]:
    """``{"text_layer_ids", "text_depth", "image_...": ...}`` of the loaded stores: the
    hidden-state index of each loaded row and the tower's blocks (``num_model_layers``),
    for the IISAN pairing (``models.san.IISANConfig``)."""
    out: dict[str, Any] = {}
    for m in ("text", "image"):
        if m in specs:
            out[f"{m}_layer_ids"] = tuple(getattr(cfg, f"{m}_layers")
                                          or specs[m]["layer_indices"])
            out[f"{m}_depth"] = int(specs[m]["num_model_layers"])
    return out


def iisan_config(cfg: TrainConfig, dims: dict[str, Any], rows: dict[str, int],
                 towers: dict[str, Any] | None = None) -> IISANConfig:
    """The IISAN encoder config of a run; ``iisan_pairing=None`` resolves to ``versa`` when
    the given rows hold its hidden states, else ``top``. Raises ConfigError as IISANConfig."""
    kw = dict(**dims, **rows, **(towers or {}), adapter_dim=cfg.adapter_dim, out_dim=cfg.hidden,
              use_intra=cfg.use_intra, use_inter=cfg.use_inter, use_gates=cfg.use_gates,
              inter_start=cfg.iisan_inter_start, ungated=cfg.iisan_ungated,
              without_intra=cfg.iisan_without_intra)
    if cfg.iisan_pairing is not None:
        return IISANConfig(**kw, pairing=cfg.iisan_pairing)
    try:
        return IISANConfig(**kw, pairing="versa")
    except ConfigError as exc:
        if "pairing='versa'" not in str(exc):
            raise
        log.info("%s: the stores lack the IISAN-Versa rows (%s); the Inter-SAN pairs the top "
                 "rows", cfg.name, exc)
        return IISANConfig(**kw, pairing="top")


def describe_model(model: torch.nn.Module) -> dict[str, Any]:
    """What the run's model resolved to, for ``config.json``: ``{"iisan": ...}`` for an
    IISAN item encoder (pairing, options, fused parts), else {}."""
    for m in model.modules():
        if isinstance(m, IISANItemEncoder):
            return {"iisan": m.cfg.resolved()}
    return {}


def token_counts(cfg: TrainConfig, text_h: torch.Tensor | None, image_h: torch.Tensor | None
                 ) -> dict[str, int]:
    """``{"text_tokens": T, "image_tokens": T'}`` of token-level states (N, K, T, D) (0 for
    pooled rows (N, K, D)). Raises ConfigError when token states reach an encoder other
    than the Fusion-Q-Former (IISAN, concat-and-project and VBPR read one vector per row)."""
    out = {f"{m}_tokens": int(h.shape[2]) if h is not None and h.dim() == 4 else 0
           for m, h in (("text", text_h), ("image", image_h))}
    if any(out.values()) and (cfg.item_encoder != "qformer" or cfg.seq_model == "vbpr"):
        raise ConfigError(f"{cfg.name}: a token-level store (pooling 'tokens') feeds only "
                          f"item_encoder 'qformer', not {cfg.item_encoder!r} / "
                          f"{cfg.seq_model!r}; use a store of pooled rows")
    return out


def build_item_table(cfg: TrainConfig, num_items: int, text_h: torch.Tensor | None,
                     image_h: torch.Tensor | None,
                     widths: dict[str, tuple[int, ...] | None] | None = None,
                     towers: dict[str, Any] | None = None,
                     masks: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The configured item table: IDs, a content encoder over the cache, or content + IDs.

    ``text_h`` / ``image_h``: (N, K, D) pooled rows, or (N, K, T, D) token states (the
    Fusion-Q-Former only, as EM3 reads them) with ``masks`` ``{"text_mask" / "image_mask":
    (N, T) bool}`` (:func:`pipeline.cached_inputs.token_masks`).
    ``widths``: :func:`row_widths` of mixed-width stores (a CNN's stages), passed to the
    content encoders (row-wise DTL, see ``models.dtl``); None for uniform rows.
    ``towers``: :func:`tower_layers` of the stores (IISAN pairing); None = rows 0..K-1.
    Raises: ConfigError (:func:`token_counts`; the encoders' configs).
    """
    if cfg.item_encoder == "id":
        return IDItemTable(num_items, cfg.hidden)
    tokens = token_counts(cfg, text_h, image_h)
    widths = {k: v for k, v in (widths or {}).items() if v is not None}
    dims = dict(text_dim=text_h.shape[-1] if text_h is not None else 0,
                image_dim=image_h.shape[-1] if image_h is not None else 0, **widths)
    rows = dict(text_rows=text_h.shape[1] if text_h is not None else 0,
                image_rows=image_h.shape[1] if image_h is not None else 0)
    if cfg.item_encoder == "iisan":
        enc: torch.nn.Module = IISANItemEncoder(iisan_config(cfg, dims, rows, towers))
    elif cfg.item_encoder == "concat":
        enc = LinearFusionEncoder(LinearFusionConfig(**dims, out_dim=cfg.hidden))
    else:
        enc = FusionQFormer(FusionQFormerConfig(
            **dims, **rows, d_model=cfg.qformer_dim, n_queries=cfg.qformer_queries,
            n_layers=cfg.qformer_layers, n_heads=cfg.qformer_heads, dropout=cfg.dropout,
            out_dim=cfg.hidden, token_norm=cfg.qformer_token_norm,
            query_init=cfg.qformer_query_init, **tokens))
    table: torch.nn.Module = ContentItemTable(enc, text_h, image_h, **(masks or {}),
                                              table_norm=cfg.table_norm)
    if cfg.use_id:
        table = ContentIDItemTable(table, IDItemTable(num_items, cfg.hidden))
    return table


def vbpr_features(text_h: torch.Tensor | None, image_h: torch.Tensor | None,
                  widths: dict[str, tuple[int, ...] | None] | None = None) -> torch.Tensor:
    """(N, F) VBPR item features: the top cached row of each given store, at its real width
    (``widths``: :func:`row_widths`; rows are zero-padded to D), concatenated."""
    widths = widths or {}
    parts = []
    for m, h in (("text", text_h), ("image", image_h)):
        if h is not None:
            w = widths.get(f"{m}_widths")
            parts.append(h[:, -1, :w[-1] if w else h.shape[2]].float())  # (N, d_top)
    return torch.cat(parts, dim=1)


def build_model(cfg: TrainConfig, num_items: int, text_h: torch.Tensor | None,
                image_h: torch.Tensor | None, num_users: int = 0,
                widths: dict[str, tuple[int, ...] | None] | None = None,
                towers: dict[str, Any] | None = None,
                masks: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """Item table + sequence model (a :class:`SequentialRecommender`), or VBPR.

    ``widths``: :func:`row_widths` of the loaded stores (None: every row full width);
    ``towers``: :func:`tower_layers` of the stores (None: rows 0..K-1 of a K-1 block tower);
    ``masks``: attention masks of token-level stores (:func:`build_item_table`)."""
    if cfg.seq_model == "vbpr":
        token_counts(cfg, text_h, image_h)
        return VBPR(VBPRConfig(num_users=num_users, num_items=num_items,
                               factors=cfg.vbpr_factors, visual_factors=cfg.vbpr_factors),
                    vbpr_features(text_h, image_h, widths))
    return SequentialRecommender(build_item_table(cfg, num_items, text_h, image_h, widths,
                                                  towers, masks), build_seq_model(cfg))


# --------------------------------------------------------------------------- evaluation

ScoreFn = Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]]


def score_fn_for(model: torch.nn.Module) -> ScoreFn:
    """(histories (B, L), user rows (B,)) -> one (B, N + 1) score tensor per size."""
    if isinstance(model, VBPR):
        fn = lambda hist, users: [model.score_all(users)]  # noqa: E731
    else:
        fn = lambda hist, users: model.score_last_sizes(hist)  # noqa: E731
    fn.model = model  # type: ignore[attr-defined]  # rank_examples caches its item table
    return fn
