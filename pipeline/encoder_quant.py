"""Loading options of a frozen encoder: quantization config, ``from_pretrained`` keywords.

:func:`quantization_config` builds transformers' ``BitsAndBytesConfig`` / ``GPTQConfig``,
:func:`load_kwargs` the keyword arguments of ``from_pretrained`` (dtype, ``device_map``,
``max_memory``), :func:`check_quantization_runtime` refuses a quantized load whose packages
or device are missing, naming what is missing. Split out of ``pipeline/encoders.py`` (which
re-exports every name); the CPU / device_map rules are in :mod:`pipeline.quantize`.

Sources: transformers ``BitsAndBytesConfig``, ``GPTQConfig``; bitsandbytes' CPU backend.
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any

import torch

from mmcache.errors import ConfigError
from pipeline.encoder_spec import EncoderSpec

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
