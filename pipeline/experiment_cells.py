"""The cells and grids of the seed papers' comparisons (:mod:`pipeline.experiments` runs them).

A :class:`Cell` is a named set of :class:`pipeline.train.TrainConfig` overrides; ``GRIDS``
lists the cells of each grid (shared cells run once). Store values are placeholders that
:func:`pipeline.experiments.resolve` replaces by the experiment's stores: ``@text`` /
``@image`` (the LayerDrop stores), ``@text_all`` / ``@image_all`` (every hidden state, for
"without LayerDrop"), ``@text_tokens`` / ``@image_tokens`` (token states of the top hidden
state, ``pooling="tokens"``, the Fusion-Q-Former's input as EM3 reads it); ``"@top"`` as
``text_layers`` / ``image_layers`` reads the store's top hidden state alone.

Split out of ``pipeline/experiments.py`` (which re-exports every name).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


TEXT, IMAGE, TEXT_ALL, IMAGE_ALL = "@text", "@image", "@text_all", "@image_all"
TEXT_TOK, IMAGE_TOK = "@text_tokens", "@image_tokens"
STORE_KEYS = {TEXT: "text_store", IMAGE: "image_store", TEXT_ALL: "text_store_all",
              IMAGE_ALL: "image_store_all", TEXT_TOK: "text_store_tokens",
              IMAGE_TOK: "image_store_tokens"}
TOP = "@top"
"""``text_layers`` / ``image_layers`` placeholder: the top hidden state of the cell's store."""
VERSA = "@versa"
"""``text_layers`` / ``image_layers`` placeholder: hidden state 0 plus the rows IISAN-Versa
group LayerDrop keeps for the two stores' tower depths (``models.layerdrop.versa_blocks``;
MiniLM 6 + EfficientNet-Lite0 8 blocks: text 0, 3, 4, 5, 6 and image 0, 2, 4, 6, 8), with
``iisan_pairing="versa"`` (never the silent fall-back to the top rows)."""


@dataclass(frozen=True)
class Cell:
    """One configuration of a grid.

    Attributes:
        id: unique name (run folders are ``<id>-s<seed>``). label: table / plot label.
        overrides: TrainConfig fields; store values are the placeholders ``@text``,
            ``@image``, ``@text_all``, ``@image_all``, ``@text_tokens``, ``@image_tokens``;
            ``"@top"`` / ``"@versa"`` for ``text_layers`` / ``image_layers``; ``"@mrl"`` for
            ``sizes`` and ``"@mrl_max"`` for ``hidden`` take the experiment's Matryoshka sizes.
        lora_base: id of the cell (same seed) whose checkpoint this cell continues with LoRA.
    """

    id: str
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)
    lora_base: str | None = None


BOTH = {"text_store": TEXT, "image_store": IMAGE}
# IISAN on both towers, aligned as IISAN-Versa aligns them (issue 11, item 1): the text rows
# come from the every-hidden-state store, as the demo's text store keeps 0, 2, 4, 6 only
VERSA_BOTH = {"text_store": TEXT_ALL, "image_store": IMAGE, "text_layers": VERSA,
              "image_layers": VERSA}
TOKENS = {"text_store": TEXT_TOK, "image_store": IMAGE_TOK, "text_layers": TOP,
          "image_layers": TOP}
# LRURec as its paper's code builds and trains it: its own block (input LayerNorm, post-LN
# LRU with state width 2 D, GELU FFN of width 4 D; models.lru, block "lrurec"), AdamW lr 1e-3,
# batch 64, weight decay 0.01, with dropout 0.3 and an early stop that waits 30 epochs
# (README, Experiments, "LRURec at the peer's level": the probes behind each setting)
LRU_OWN = {"seq_model": "lru", "lru_block": "lrurec", "lru_state_mult": 2, "lr": 1e-3,
           "batch_size": 64, "weight_decay": 0.01, "dropout": 0.3, "min_epochs": 30}
CELLS: dict[str, Cell] = {c.id: c for c in [
    Cell("sasrec-id", "SASRec, item ID"),
    Cell("iisan-text", "IISAN, text only", {"item_encoder": "iisan", "text_store": TEXT}),
    Cell("iisan-image", "IISAN, image only",
         {"item_encoder": "iisan", "image_store": IMAGE}),
    Cell("iisan", "IISAN, text + image", {"item_encoder": "iisan", **VERSA_BOTH}),
    Cell("concat", "concat-and-project (fMRLRec eq. 7) = frozen backbone",
         {"item_encoder": "concat", **BOTH}),
    Cell("iisan-no-layerdrop", "IISAN w/o LayerDrop (all hidden states)",
         {"item_encoder": "iisan", "text_store": TEXT_ALL, "image_store": IMAGE_ALL,
          # every row in both SANs: the inter-SAN pairs the top rows, not the Versa rows
          "iisan_pairing": "top"}),
    Cell("iisan-no-gates", "IISAN w/o modality gates",
         {"item_encoder": "iisan", "use_gates": False, **VERSA_BOTH}),
    Cell("iisan-no-intra", "IISAN w/o intra-modal SAN",
         {"item_encoder": "iisan", "use_intra": False, **VERSA_BOTH}),
    Cell("iisan-no-inter", "IISAN w/o inter-modal SAN",
         {"item_encoder": "iisan", "use_inter": False, **VERSA_BOTH}),
    Cell("qformer", "Fusion-Q-Former (EM3)", {"item_encoder": "qformer", **BOTH}),
    # text-only fusion rows: what the image tower adds to (or costs) each fusion
    Cell("concat-text", "concat-and-project, text only",
         {"item_encoder": "concat", "text_store": TEXT}),
    Cell("qformer-text", "Fusion-Q-Former, text only",
         {"item_encoder": "qformer", "text_store": TEXT}),
    Cell("concat-id", "concat + item ID", {"item_encoder": "concat", "use_id": True, **BOTH}),
    Cell("concat-id-cic", "concat + item ID + CIC",
         {"item_encoder": "concat", "use_id": True, "cic_weight": 0.1, **BOTH}),
    Cell("qformer-id", "Fusion-Q-Former + item ID",
         {"item_encoder": "qformer", "use_id": True, **BOTH}),
    Cell("qformer-id-cic", "Fusion-Q-Former + item ID + CIC",
         {"item_encoder": "qformer", "use_id": True, "cic_weight": 0.1, **BOTH}),
    # EM3's input (issue 11, item 3): every token state of the top hidden state of each
    # tower (MiniLM: up to 30 word pieces; EfficientNet-Lite0: the 7 x 7 head map), the
    # padding masked out of every attention; as written (item-independent queries), and
    # with the queries starting from the item's mean token (the diagnosis' fix: the item
    # signal then reaches the output through the residual stream, not only through attention)
    Cell("qformer-tokens", "Fusion-Q-Former on token states (EM3)",
         {"item_encoder": "qformer", **TOKENS}),
    Cell("qformer-tokens-mean", "Fusion-Q-Former on token states, queries + mean token",
         {"item_encoder": "qformer", "qformer_query_init": "learned_plus_mean", **TOKENS}),
    Cell("qformer-mean", "Fusion-Q-Former, queries + mean token",
         {"item_encoder": "qformer", "qformer_query_init": "learned_plus_mean", **BOTH}),
    Cell("qformer-mean-text", "Fusion-Q-Former, queries + mean token, text only",
         {"item_encoder": "qformer", "qformer_query_init": "learned_plus_mean",
          "text_store": TEXT}),
    Cell("qformer-tokens-mean-text",
         "Fusion-Q-Former on token states, queries + mean token, text only",
         {"item_encoder": "qformer", "qformer_query_init": "learned_plus_mean",
          "text_store": TEXT_TOK, "text_layers": TOP}),
    Cell("lru-id", "LRURec, item ID", LRU_OWN),
    # GRU4Rec as RecBole trains it: embedding dropout 0.3 (its default). At the grid's lr
    # 3e-3 / batch 128 it sits on a popularity plateau (validation ~ popularity) for ~20
    # epochs, how long depends on the seed, so early stopping waits 30 epochs
    Cell("gru4rec-id", "GRU4Rec, item ID", {"seq_model": "gru4rec", "dropout": 0.3,
                                            "min_epochs": 30}),
    Cell("lru-id-short", "LRURec, item ID, short windows (LoRA base)",
         {**LRU_OWN, "max_len": "@short"}),
    Cell("lru-id-lora", "LRURec short + LoRA on full windows (EM3)",
         LRU_OWN, lora_base="lru-id-short"),
    Cell("vbpr", "VBPR (BPR, text + image features)",
         {"seq_model": "vbpr", "loss": "bpr", **BOTH}),
    Cell("mrl-lru", "fMRLRec: Matryoshka LRURec, one training",
         {"seq_model": "lru", "item_encoder": "concat", "sizes": "@mrl", "hidden": "@mrl_max",
          **BOTH}),
]}

# IISAN's objective (issue 11, item 2): each IISAN ablation cell also trains with the paper's
# in-batch debiased CE, next to full-softmax CE (`<id>-dce`; pipeline.significance pairs them)
IISAN_DCE_CELLS = ("iisan", "iisan-no-layerdrop", "iisan-no-gates", "iisan-no-intra",
                   "iisan-no-inter")
for _id in IISAN_DCE_CELLS:
    CELLS[f"{_id}-dce"] = Cell(f"{_id}-dce", f"{CELLS[_id].label}, debiased in-batch CE",
                               {**CELLS[_id].overrides, "loss": "debiased_ce"})

GRIDS: dict[str, list[str]] = {
    "modality": ["sasrec-id", "iisan-text", "iisan-image", "iisan"],
    "iisan": ["iisan", "concat", "iisan-no-layerdrop", "iisan-no-gates", "iisan-no-intra",
              "iisan-no-inter", *(f"{c}-dce" for c in IISAN_DCE_CELLS)],
    "fusion": ["concat", "iisan", "qformer", "concat-text", "iisan-text", "qformer-text",
               "concat-id", "concat-id-cic", "qformer-id", "qformer-id-cic", "qformer-tokens",
               "qformer-tokens-mean", "qformer-mean", "qformer-mean-text",
               "qformer-tokens-mean-text"],
    "seq": ["sasrec-id", "lru-id", "gru4rec-id", "lru-id-short", "lru-id-lora", "vbpr"],
    "mrl": ["mrl-lru", "@independent"],
    "smoke": ["sasrec-id", "iisan-no-layerdrop", "qformer-id-cic", "qformer-tokens-mean-text",
              "gru4rec-id", "lru-id-lora", "vbpr", "mrl-lru", "@independent"],
}
GRID_ORDER = ("modality", "iisan", "fusion", "seq", "mrl")
GRIDS["all"] = [c for g in GRID_ORDER for c in GRIDS[g]]


def independent_cell(size: int) -> Cell:
    """An LRURec of width ``size`` trained on its own (fMRLRec's baseline for each size)."""
    return Cell(f"lru-concat-d{size}", f"LRURec d={size}, independent",
                {"seq_model": "lru", "item_encoder": "concat", "hidden": size, **BOTH})
