"""Stage 2's inputs: the cached hidden states of a training run, read from its stores.

:func:`load_cached` reads one complete store (rows aligned to the catalogue by item id),
:func:`load_stores` the text and image stores of a run with their specs and per-row widths
(CNN stores hold rows of different widths, zero-padded: ``stores/README.md``),
:func:`standardize` normalises each cached feature, :func:`row_widths` gives the widths the
content encoders need (``models.dtl``), :func:`check_store_modality` refuses a store of the
wrong modality for a slot (an image store as the text store). No encoder is loaded here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from stores.hidden_states import HiddenStateStore, StoreSpec
from stores.sidecars import records_dir
from stores.tables import items_fingerprint


ENCODER_RECORD = "encoder.json"
"""Stage 1's record of the encoder, in the store's records folder ``<store>.stage1/``
(``stores.sidecars.records_dir``; written by ``pipeline.cache``)."""


def recorded_modality(store: str | Path) -> str:
    """The modality a store holds: ``text``, ``image`` or ``text:<column>``.

    Read from stage 1's record ``<store>.stage1/encoder.json`` (the encoder spec's ``modality`` and
    ``text_column``); stores written without stage 1's record (tests, other writers) are
    read from their provenance (``StoreSpec.modality``).

    Raises:
        StoreNotFoundError: no store at ``store``.
    """
    rec = records_dir(store) / ENCODER_RECORD
    if rec.is_file():
        enc = json.loads(rec.read_text()).get("encoder", {})
        if enc.get("modality"):
            col = enc.get("text_column") or "text"
            if enc["modality"] == "text" and col != "text":
                return f"text:{col}"
            return str(enc["modality"])
    return HiddenStateStore.open(store).spec.modality


def check_store_modality(store: str | Path, slot: str) -> str:
    """Refuse a store in the wrong slot: ``slot`` is ``"text"`` or ``"image"``.

    A ``text:<column>`` store fits the text slot. Returns the recorded modality.

    Raises:
        StoreMismatchError: field ``modality``, naming the store and the modality it holds.
        StoreNotFoundError: no store at ``store``.
    """
    found = recorded_modality(store)
    if found.split(":", 1)[0] != slot:
        from pipeline.errors import StoreMismatchError
        raise StoreMismatchError("modality", slot, found, store=str(store))
    return found


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
    # rows are aligned to the catalogue by item id: a grown store keeps rows in order of
    # addition (UnknownItemError names a catalogue item the store does not hold)
    if st.spec.dtype == "bfloat16":
        from stores.hidden_states import bf16_bits_to_float32
        data = bf16_bits_to_float32(st.read(layers=layers)[st.rows_for(item_ids)])
        return torch.from_numpy(np.ascontiguousarray(data)).to(torch.float16), st.spec
    from stores.reader import load_hidden_states
    return load_hidden_states(st, layers, item_ids=item_ids, dtype=torch.float16), st.spec


def load_stores(cfg: Any, tables: Any, item_ids: np.ndarray
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, Any]]:
    """The cached tensors a training run reads: (text (N, Lt, Dt) or None, image (N, Li, Di)
    or None, {"text" / "image": store spec + ``row_widths``}).

    ``cfg`` is a :class:`pipeline.train.TrainConfig` (its stores, layers, ``feature_norm``
    and ``cache_dtype``); rows follow ``item_ids``. Raises as :func:`load_cached`, and
    StoreMismatchError (field ``modality``) for a store in the wrong slot (check_store_modality).
    """
    text_h = image_h = None
    specs: dict[str, Any] = {}
    if cfg.text_store is None and cfg.image_store is None:
        return None, None, specs
    for slot, store in (("text", cfg.text_store), ("image", cfg.image_store)):
        if store is not None:
            check_store_modality(store, slot)
    fp = items_fingerprint(tables.items.sort_values("item_id"))
    if cfg.text_store is not None:
        text_h, s = load_cached(cfg.text_store, cfg.text_layers, fp, item_ids)
        specs["text"] = {**s.model_dump(mode="json"),
                         "row_widths": list(_row_widths(s, cfg.text_layers))}
    if cfg.image_store is not None:
        image_h, s = load_cached(cfg.image_store, cfg.image_layers, fp, item_ids)
        specs["image"] = {**s.model_dump(mode="json"),
                          "row_widths": list(_row_widths(s, cfg.image_layers))}
    dtype = getattr(torch, cfg.cache_dtype)
    masks = token_masks(cfg, item_ids) if cfg.feature_norm == "standardize" else {}

    def prep(h: torch.Tensor | None, m: str) -> torch.Tensor | None:
        if h is None:
            return None
        if cfg.feature_norm == "standardize":
            h = standardize(h, specs[m]["row_widths"], masks.get(f"{m}_mask"))
        return h.to(dtype)
    return prep(text_h, "text"), prep(image_h, "image"), specs


def token_masks(cfg: Any, item_ids: np.ndarray) -> dict[str, torch.Tensor]:
    """``{"text_mask" / "image_mask": (N, T) bool}``: the attention masks of the run's
    token-level stores (``pooling="tokens"``; True = a real token), rows following
    ``item_ids``; stores of pooled rows have none (an empty dict when neither is token-level).

    Raises: StoreNotFoundError; UnknownItemError for a catalogue item the store lacks.
    """
    out: dict[str, torch.Tensor] = {}
    for m in ("text", "image"):
        store = getattr(cfg, f"{m}_store")
        if store is None:
            continue
        st = HiddenStateStore.open(store)
        if not st.layout.get("num_tokens"):
            continue
        mask = np.asarray(st.group["attention_mask"][:])[st.rows_for(item_ids)]  # (N, T)
        out[f"{m}_mask"] = torch.from_numpy(mask.astype(bool))
    return out


def _row_widths(spec: StoreSpec, layers: tuple[int, ...] | None) -> tuple[int, ...]:
    """Real width of each loaded row (the requested layers of a store, in order)."""
    stored = tuple(spec.layer_indices)
    return tuple(spec.widths[stored.index(l)] for l in (layers or stored))


def row_widths(specs: dict[str, Any]) -> dict[str, tuple[int, ...] | None]:
    """``{"text_widths": ..., "image_widths": ...}`` of :func:`load_stores`' specs, None for
    uniform rows (so uniform stores build exactly the models they built before)."""
    out: dict[str, tuple[int, ...] | None] = {}
    for m in ("text", "image"):
        w = tuple(specs[m]["row_widths"]) if m in specs else None
        out[f"{m}_widths"] = w if w is not None and len(set(w)) > 1 else None
    return out


def standardize(h: torch.Tensor, widths: Sequence[int] | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-feature z-score over items, scaled to unit row norm: (N, K, D) -> (N, K, D) float32.

    ``(h - mean_n h) / (std_n h * sqrt(d_k))`` for every (row k, dim d), d_k the row's real
    width (``widths``; D when None); features with std < 1e-6 (e.g. a constant [CLS]
    embedding row, or the zero padding of a narrow row) are only centred, so padding stays 0.

    Token states (N, K, T, D) (``pooling="tokens"``) are standardized per (row k, dim d)
    over every item's real tokens (``mask`` (N, T), True = real; None = all real), and
    padding tokens come out 0.
    """
    x = h.float()
    if x.dim() == 4:
        return _standardize_tokens(x, widths, mask)
    std = x.std(0, keepdim=True)  # (1, K, D)
    z = (x - x.mean(0, keepdim=True)) / torch.where(std < 1e-6, torch.ones_like(std), std)
    d = torch.tensor(list(widths) if widths is not None else [x.shape[-1]] * x.shape[1],
                     dtype=z.dtype)
    return z / d.sqrt().view(1, -1, *([1] * (z.dim() - 2)))  # (N, K, D)


def _standardize_tokens(x: torch.Tensor, widths: Sequence[int] | None,
                        mask: torch.Tensor | None) -> torch.Tensor:
    """:func:`standardize` of token states x (N, K, T, D) float32, statistics over real tokens."""
    N, K, T, D = x.shape
    keep = mask.bool() if mask is not None else torch.ones(N, T, dtype=torch.bool)
    real = x.permute(0, 2, 1, 3)[keep]  # (R, K, D): every real token of every item
    mean, std = real.mean(0), real.std(0)  # (K, D)
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    z = (x - mean[:, None]) / std[:, None] * keep[:, None, :, None]  # (N, K, T, D), pads 0
    d = torch.tensor(list(widths) if widths is not None else [D] * K, dtype=z.dtype)
    return z / d.sqrt().view(1, K, 1, 1)


__all__ = ["recorded_modality", "check_store_modality", "load_cached", "load_stores", "row_widths", "standardize", "token_masks"]
