"""Loading a frozen encoder (:func:`load_encoder`) and reading its inputs defensively.

:func:`load_encoder` builds a :class:`pipeline.encoder_runtime.FrozenEncoder` from a spec
(transformers ``AutoModel``, open_clip, or a timm CNN via :mod:`pipeline.cnn`), keeping only
the blocks up to the deepest kept one when asked; :func:`load_image` and :func:`check_text`
refuse a missing / undecodable image or an empty text, naming the file and item. Split out of
``pipeline/encoders.py`` (which re-exports every name).

Sources: transformers ``AutoModel``, ``AutoTokenizer``, ``AutoImageProcessor``; open_clip
``create_model_and_transforms``; Pillow.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from mmcache.errors import ConfigError, CorruptImageError, EmptyTextError, MissingImageError
from pipeline.encoder_arch import architecture, effective_max_length, validate_spec
from pipeline.encoder_quant import check_quantization_runtime, load_kwargs
from pipeline.encoder_runtime import FrozenEncoder, _accepts, _find_blocks, _tower, _truncate_config
from pipeline.encoder_spec import EncoderSpec

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
