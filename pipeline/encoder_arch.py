"""An encoder's architecture from its config alone, spec validation and weights fingerprints.

:func:`architecture` reads depth, width and input geometry from the model's config (no
weights), :func:`validate_spec` checks a spec against it before any weight or item is read,
:func:`weights_fingerprint` identifies the weights without loading them, and
:func:`hidden_state_convention` says what the stored row of the last block holds. Split out of
``pipeline/encoders.py`` (which re-exports every name).

Sources: transformers ``AutoConfig``; open_clip model configs; IISAN (seed ``003_*``) for the
LayerDrop rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from mmcache.errors import ConfigError
from models.layerdrop import select_hidden_states
from pipeline.encoder_spec import EncoderSpec

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
