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

The code lives in one module per responsibility; this module re-exports every name:

* :mod:`pipeline.encoder_spec`: :class:`EncoderSpec`, ``PRESETS``, ``EXAMPLES``, :func:`preset`;
* :mod:`pipeline.encoder_arch`: :func:`architecture`, :func:`validate_spec`,
  :func:`weights_fingerprint`, :func:`hidden_state_convention`, :func:`library_versions`;
* :mod:`pipeline.encoder_quant`: :func:`quantization_config`, :func:`load_kwargs`,
  :func:`check_quantization_runtime`;
* :mod:`pipeline.encoder_runtime`: :class:`FrozenEncoder`, :func:`plan_batches`;
* :mod:`pipeline.encoder_loading`: :func:`load_encoder`, :func:`load_image`, :func:`check_text`.
"""

from models.capture import capture_hidden_states  # noqa: F401  (re-exported)
from pipeline.encoder_arch import (_NO_CLS_MODEL_TYPES, _TEXT_TOWERS, _VISION_TOWERS,  # noqa: F401
                                   _ARCH_CACHE, _architecture, _hash_file_sample, _is_decoder_lm,
                                   _local_dir, _open_clip_tower, _sub_config,
                                   _tokenizer_max_length, architecture, effective_max_length,
                                   hidden_state_convention, library_versions, quantization_tag,
                                   validate_spec, weights_fingerprint)
from pipeline.encoder_loading import _load_open_clip, check_text, load_encoder, load_image  # noqa: F401
from pipeline.encoder_quant import (_QUANT_PACKAGES, check_quantization_runtime,  # noqa: F401
                                    load_kwargs, quantization_config)
from pipeline.encoder_runtime import (Encoded, FrozenEncoder, Prepared, _accepts,  # noqa: F401
                                      _find_blocks, _tower, _truncate_config, plan_batches)
from pipeline.encoder_spec import (EXAMPLES, PRESET_MODALITIES, PRESETS, EncoderSpec,  # noqa: F401
                                   Quantization, _efficientnet_lite, presets_of, minilm_path, preset, spec_json,
                                   store_modality)


__all__ = ["EncoderSpec", "PRESETS", "EXAMPLES", "preset", "load_encoder", "FrozenEncoder",
           "Encoded", "Prepared", "load_image", "check_text", "library_versions", "weights_fingerprint",
           "capture_hidden_states", "architecture", "validate_spec", "load_kwargs",
           "quantization_config", "quantization_tag", "effective_max_length", "check_quantization_runtime",
           "store_modality", "plan_batches", "minilm_path", "spec_json",
           "hidden_state_convention", "PRESET_MODALITIES", "presets_of"]
