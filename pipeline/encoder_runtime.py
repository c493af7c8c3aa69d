"""A loaded frozen encoder: :class:`FrozenEncoder` (inputs, forward pass, pooled hidden states).

``FrozenEncoder.encode`` returns, for a batch of B items, the pooled hidden states of the K
kept layers only, shape (B, K, D); ``encode_tokens`` every token state, (B, K, T, D) + the
attention mask (B, T). :func:`plan_batches` is the length bucketing of a shard. Split out of
``pipeline/encoders.py`` (which re-exports every name); the loading is in
:mod:`pipeline.encoder_loading`.

Sources: IISAN (seed ``003_*``) for layer-wise hidden states; transformers'
``output_hidden_states`` convention.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from mmcache.errors import ConfigError
from models.capture import HiddenStateCapture, capture_hidden_states, left_align, pad_tokens
from models.pooling import pool
from pipeline.encoder_arch import _TEXT_TOWERS, _VISION_TOWERS
from pipeline.encoder_spec import EncoderSpec

def _find_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of transformer blocks of a transformers tower or an open_clip visual."""
    for path in ("transformer.resblocks", "trunk.blocks", "visual.transformer.resblocks",
                 "encoder.layer", "encoder.layers", "layers", "model.layers",
                 "vision_model.encoder.layers", "text_model.encoder.layers",
                 "transformer.h", "h", "blocks"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj):
            return obj
    raise ConfigError(f"cannot find the transformer blocks of {type(model).__name__}")


def _tower(model: torch.nn.Module, modality: str) -> torch.nn.Module:
    """The sub-model of ``modality`` of a dual encoder (CLIP, SigLIP); the model otherwise.

    The other tower is dropped so its memory is released.
    """
    mine, other = (_TEXT_TOWERS, _VISION_TOWERS) if modality == "text" else \
        (_VISION_TOWERS, _TEXT_TOWERS)
    for name in mine:
        sub = getattr(model, name, None)
        if isinstance(sub, torch.nn.Module):
            for o in other:
                if isinstance(getattr(model, o, None), torch.nn.Module):
                    setattr(model, o, None)
            return sub
    return model


def _truncate_config(cfg: Any, modality: str, keep_blocks: int) -> None:
    """Set the tower config's depth to ``keep_blocks`` (layer-type lists trimmed too)."""
    sub = getattr(cfg, "text_config" if modality == "text" else "vision_config", None) or cfg
    sub.num_hidden_layers = keep_blocks
    for key in ("layer_types", "sliding_window_pattern_list"):
        v = getattr(sub, key, None)
        if isinstance(v, list) and len(v) > keep_blocks:
            setattr(sub, key, v[:keep_blocks])


def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@dataclass
class Prepared:
    """Model inputs of N items, made on the CPU (tokenized texts or preprocessed images).

    Attributes:
        feats: per-text token features (unpadded), or None for images.
        pixels: (N, 3, H, W) float32 pixel values with the model's statistics, or None.
        lengths: (N,) int64 tokens per item. truncated: (N,) bool.
    """

    feats: list[dict[str, list[int]]] | None
    pixels: torch.Tensor | None
    lengths: np.ndarray
    truncated: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)


@dataclass
class Encoded:
    """Result of :meth:`FrozenEncoder.encode_items` for N items, in input order.

    Attributes:
        states: (N, K, D) float32 pooled vectors, or (N, K, T, D) token states.
        mask: (N, T) bool for token states (real tokens first), else None.
        lengths: (N,) int64 tokens per item after truncation (images: tokens per image).
        truncated: (N,) bool, the text was cut at the maximum length.
        batches: number of forward passes.
    """

    states: np.ndarray
    mask: np.ndarray | None
    lengths: np.ndarray
    truncated: np.ndarray
    batches: int


@dataclass
class FrozenEncoder:
    """A loaded frozen encoder that returns pooled hidden states of the kept layers.

    Attributes:
        spec: the request. model: the tower run (transformers model or open_clip visual).
        blocks: its transformer blocks (possibly only the first ones, see
            ``drop_unused_blocks``). num_layers: L, the model's true depth.
        hidden_dim: D. layer_indices: kept hidden-state indices (K of them).
        preprocess: tokenizer / image processor / open_clip transform.
        image_size: pixels or None. max_length: effective text truncation or None.
        num_tokens: stored token axis T for ``pooling="tokens"``, else None.
        is_decoder: causal decoder LLM. final_from_library: index L is taken from
            transformers' ``output_hidden_states`` (after the final norm for decoders).
        input_device: where inputs are sent (device of the input embeddings).
    """

    spec: EncoderSpec
    model: torch.nn.Module
    blocks: Sequence[torch.nn.Module]
    num_layers: int
    hidden_dim: int
    layer_indices: tuple[int, ...]
    preprocess: Any
    image_size: int | None = None
    max_length: int | None = None
    num_tokens: int | None = None
    is_decoder: bool = False
    final_from_library: bool = False
    seq_first: bool = False
    input_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _forward_kwargs: dict[str, Any] = field(default_factory=dict)
    _accepts_positions: bool = False

    # ------------------------------------------------------------------ inputs
    def tokenize(self, texts: Sequence[str]) -> tuple[list[dict[str, list[int]]], np.ndarray]:
        """Tokenize without padding, truncated to ``max_length`` tokens.

        Returns:
            (one feature dict per text, (N,) bool: the text was truncated).
        """
        tok = self.preprocess
        m = self.max_length
        kw = {"truncation": m is not None, "max_length": m + 1 if m else None}
        enc = tok(list(texts), **kw)
        keys = list(enc.keys())
        feats = [{k: enc[k][i] for k in keys} for i in range(len(texts))]
        cut = np.array([m is not None and len(f["input_ids"]) > m for f in feats], dtype=bool)
        if cut.any():  # re-tokenize those few at the limit, so special tokens stay in place
            idx = np.flatnonzero(cut)
            again = tok([texts[i] for i in idx], truncation=True, max_length=m)
            for j, i in enumerate(idx):
                feats[i] = {k: again[k][j] for k in keys}
        return feats, cut

    def collate(self, feats: Sequence[dict[str, list[int]]]) -> tuple[dict[str, torch.Tensor],
                                                                       torch.Tensor]:
        """Pad token features into model inputs on the input device.

        Left padding gets ``position_ids`` counted from each row's first real token (so an
        item's states do not depend on the batch's longest item) when the model takes them.
        """
        tok = self.preprocess
        enc = tok.pad(list(feats), padding=True, return_tensors="pt",
                      padding_side=self.spec.padding_side or tok.padding_side)
        mask = enc["attention_mask"].bool()
        if self._accepts_positions and not bool(mask[:, 0].all()):
            enc["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        pin = self.input_device.type == "cuda"
        inputs = {k: (v.pin_memory() if pin else v).to(self.input_device, non_blocking=pin)
                  for k, v in enc.items()}
        return inputs, mask.to(self.input_device)

    def pixels(self, images: Sequence[Any]) -> torch.Tensor:
        """(B, 3, H, W) pixel values with the model's own processor statistics (on CPU)."""
        if self.spec.library == "open_clip":
            return torch.stack([self.preprocess(im) for im in images])
        return self.preprocess(images=list(images), return_tensors="pt")["pixel_values"]

    def prepare(self, batch: Sequence[Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Tokenize texts / preprocess images with the model's own statistics.

        Returns:
            (model inputs on device, attention mask (B, T) bool on device, None for images).
        """
        if self.spec.modality == "text":
            feats, _ = self.tokenize(list(batch))
            return self.collate(feats)
        return self._pixel_inputs(self.pixels(batch)), None

    def _pixel_inputs(self, px: torch.Tensor) -> dict[str, torch.Tensor]:
        pin = self.input_device.type == "cuda"
        px = (px.pin_memory() if pin else px).to(self.input_device, non_blocking=pin)
        return {"pixel_values": px.to(getattr(torch, self.spec.compute_dtype))}

    # ------------------------------------------------------------------ forward
    def _call(self, inputs: dict[str, torch.Tensor], last: int | None) -> Callable[[], Any]:
        if self.spec.library == "open_clip":
            return lambda: self.model(inputs["pixel_values"])
        kw = dict(self._forward_kwargs)
        if last is not None:
            kw["output_hidden_states"] = [last]
        return lambda: self.model(**inputs, **kw)

    def hidden_states(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor | None,
                      transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None
                      ) -> dict[int, torch.Tensor]:
        """Kept hidden states of one batch: {index: (B, T, D)} or ``transform``'s result.

        Indices below L come from hooks (and the forward stops after the deepest one);
        index L, when kept and ``final_from_library``, from transformers'
        ``output_hidden_states=[L]`` (after the final norm for decoder LLMs).
        """
        L = self.num_layers
        kept = list(self.layer_indices)
        if not (self.final_from_library and L in kept):
            return capture_hidden_states(self._call(inputs, None), self.blocks, kept,
                                         transform=transform, seq_first=self.seq_first)
        below = [i for i in kept if i < L]
        if below:
            cap = HiddenStateCapture(self.blocks, below, transform=transform, stop=False,
                                     seq_first=self.seq_first)
            out = cap.run(self._call(inputs, L))
            states = dict(cap.states)
        else:
            out, states = self._call(inputs, L)(), {}
        hs = getattr(out, "hidden_states", None)
        if hs is None or len(hs) <= L or hs[L] is None:
            raise RuntimeError(f"{self.spec.model_id}: the model did not return hidden state "
                               f"{L} for output_hidden_states=[{L}]")
        states[L] = transform(L, hs[L]) if transform else hs[L]
        return states

    def _mask_for(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:  # images: every patch token and the class token are real
            return torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        return mask.to(h.device)

    @torch.inference_mode()
    def _pooled(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        """(B, K, D) float32 pooled states on the model's device (pooled inside the hooks)."""
        name = self.spec.pooling

        def reduce(_i: int, h: torch.Tensor) -> torch.Tensor:
            # the mean is accumulated in float32 and kept so (no round trip through fp16)
            return pool(name, h.float() if name == "mean" else h, self._mask_for(h, mask)).float()
        hs = self.hidden_states(inputs, mask, reduce)
        dev = hs[self.layer_indices[0]].device
        return torch.stack([hs[l].to(dev) for l in self.layer_indices], dim=1)

    @torch.inference_mode()
    def _tokens(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, T_store, D) float32 token states (real tokens first) and (B, T_store) mask."""
        hs = self.hidden_states(inputs, mask, lambda _i, h: h.float())
        first = hs[self.layer_indices[0]]
        dev = first.device
        m = self._mask_for(first, mask)
        h = torch.stack([hs[l].to(dev) for l in self.layer_indices], dim=1)  # (B, K, T, D)
        h, m = left_align(h, m)
        T = self.num_tokens or h.shape[2]
        if self.spec.modality == "image" and h.shape[2] != T:
            raise ConfigError(f"{self.spec.model_id}: images give {h.shape[2]} tokens, the "
                              f"config promised {T}")
        return pad_tokens(h, m, T)

    def encode(self, batch: Sequence[Any]) -> np.ndarray:
        """Encode one batch of texts (str) or PIL images in one forward pass.

        Returns:
            (B, K, D) float32 numpy array: for each kept hidden-state index, the pooled vector.
        Raises:
            ConfigError: ``pooling="tokens"`` (use :meth:`encode_tokens`).
        """
        if self.spec.pooling == "tokens":
            raise ConfigError(f"encoder {self.spec.name!r} keeps token states: use encode_tokens")
        inputs, mask = self.prepare(batch)
        return self._pooled(inputs, mask).cpu().numpy()

    def encode_tokens(self, batch: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """Token states of the kept layers for one batch.

        Returns:
            ((B, K, T, D) float32, (B, T) bool mask) with each row's real tokens first and
            T = ``num_tokens`` (text: the maximum length; images: patches + class token).
        """
        inputs, mask = self.prepare(batch)
        h, m = self._tokens(inputs, mask)
        return h.cpu().numpy(), m.cpu().numpy()

    def plan_batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Deterministic batches over positions ``0..N-1`` (see :func:`plan_batches`)."""
        budget = self.spec.token_budget if self.spec.modality == "text" else None
        return plan_batches(lengths, self.spec.batch_size, budget)

    def prepare_items(self, items: Sequence[Any]) -> Prepared:
        """CPU side of :meth:`encode_items`: tokenize texts / preprocess images (thread-safe
        to run in a background thread while the previous items are computed)."""
        n = len(items)
        if self.spec.modality == "text":
            feats, cut = self.tokenize(list(items))
            lengths = np.array([len(f["input_ids"]) for f in feats], dtype=np.int64)
            return Prepared(feats=feats, pixels=None, lengths=lengths, truncated=cut)
        px = self.pixels(list(items)) if n else None
        return Prepared(feats=None, pixels=px,
                        lengths=np.full(n, self.num_tokens or 0, dtype=np.int64),
                        truncated=np.zeros(n, dtype=bool))

    def encode_items(self, items: Sequence[Any] | Prepared) -> Encoded:
        """Encode N items (texts, images, or their :class:`Prepared` inputs) in input order.

        Texts are tokenized once, sorted by token count (stable, longest first) and grouped
        under ``batch_size`` and ``token_budget``; images go in fixed batches in order.
        The batches depend on the items alone, so the same items give the same bytes.
        On a GPU, host-to-device copies use pinned memory and the copy of a batch's result
        back to the host overlaps the next batch's compute.
        """
        prep = items if isinstance(items, Prepared) else self.prepare_items(items)
        n = len(prep)
        tokens = self.spec.pooling == "tokens"
        batches = self.plan_batches(prep.lengths.tolist())
        K, D = len(self.layer_indices), self.hidden_dim
        if tokens:
            out = np.zeros((n, K, self.num_tokens, D), dtype=np.float32)
            out_mask = np.zeros((n, self.num_tokens), dtype=bool)
        else:
            out, out_mask = np.zeros((n, K, D), dtype=np.float32), None
        cuda = self.input_device.type == "cuda"
        pending: list[tuple[list[int], Any, Any, Any]] = []

        def drain(keep: int) -> None:
            while len(pending) > keep:
                pos, ev, h, m = pending.pop(0)
                if ev is not None:
                    ev.synchronize()
                out[pos] = h.numpy()
                if m is not None:
                    out_mask[pos] = m.numpy()

        for pos in batches:
            if prep.feats is not None:
                inputs, mask = self.collate([prep.feats[i] for i in pos])
            else:
                inputs, mask = self._pixel_inputs(prep.pixels[pos]), None
            if tokens:
                h, m = self._tokens(inputs, mask)
            else:
                h, m = self._pooled(inputs, mask), None
            if cuda:  # copy back asynchronously into pinned memory, overlap with next batch
                hh = torch.empty(h.shape, dtype=h.dtype, pin_memory=True)
                hh.copy_(h, non_blocking=True)
                mm = None
                if m is not None:
                    mm = torch.empty(m.shape, dtype=m.dtype, pin_memory=True)
                    mm.copy_(m, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record()
                pending.append((pos, ev, hh, mm))
                drain(1)
            else:
                pending.append((pos, None, h, m))
                drain(0)
        drain(0)
        return Encoded(states=out, mask=out_mask, lengths=prep.lengths,
                       truncated=prep.truncated, batches=len(batches))


def plan_batches(lengths: Sequence[int], max_items: int,
                 token_budget: int | None = None) -> list[list[int]]:
    """Group positions ``0..N-1`` into batches by length (length bucketing).

    Positions are sorted by length, longest first (ties keep their order: stable), and cut
    greedily into batches of at most ``max_items`` whose padded size (items x longest)
    stays within ``token_budget``; one item longer than the budget forms its own batch.
    Longest first puts the largest batch first, so an out-of-memory shows at once.

    Args:
        lengths: tokens per item. max_items: >= 1. token_budget: >= 1 or None.
    Returns:
        list of batches (lists of positions); every position appears exactly once.
    """
    if max_items < 1:
        raise ConfigError(f"batch size must be >= 1, got {max_items}")
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        ln = int(lengths[i])
        new_longest = max(longest, ln)
        if cur and (len(cur) >= max_items or
                    (token_budget is not None and (len(cur) + 1) * new_longest > token_budget)):
            batches.append(cur)
            cur, new_longest = [], ln
        cur.append(i)
        longest = new_longest
    if cur:
        batches.append(cur)
    return batches
