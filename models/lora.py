"""LoRA on a trained sequence model (EM3), through the ``peft`` library.

Papers: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022):
``W' = W + (alpha / r) B A`` with A (r x d_in) random, B (d_out x r) zero at init, W frozen;
EM3 (Deng et al., seed ``000_*``, sec. "LoRA-based sequential modeling"): train the
sequence model on short sequences, then freeze W and continue with a trainable LoRA module
(there: to follow longer histories and the drifting online distribution).

No hand-written adapter: :func:`apply_lora` calls ``peft.inject_adapter_in_model`` with a
``peft.LoraConfig`` and leaves only the ``lora_`` parameters trainable; :func:`merge_lora`
folds ``B A`` into W (peft's ``merge``) and swaps each wrapper for its base layer, so the
merged model has exactly the original architecture and ``state_dict`` keys.

Default targets: every ``nn.Linear`` of the sequence model's blocks (SASRec: ``qkv``,
``proj``, ``ffn.0``, ``ffn.3``; LRURec: ``in_re``, ``in_im``, ``out_re``, ``out_im``,
``gate``, ``w1``, ``w2``, of which LRURec's own block (``block="lrurec"``) has no ``gate``;
GRU4Rec: ``dense``). Departure: LoRA is refused on Matryoshka-nested
layers (the low-rank update would not respect the staircase mask).
Errors: ConfigError.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from mmcache.errors import ConfigError

from .matryoshka import MatryoshkaLinear

DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "SASRec": ("qkv", "proj", "ffn.0", "ffn.3"),
    "LRURec": ("in_re", "in_im", "out_re", "out_im", "gate", "w1", "w2"),
    "GRU4Rec": ("dense",),
}


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """LoRA target module names for a sequence model class. Raises ConfigError if unknown."""
    name = type(model).__name__
    if name not in DEFAULT_TARGETS:
        raise ConfigError(f"no default LoRA targets for {name}; pass targets explicitly")
    return DEFAULT_TARGETS[name]


def apply_lora(model: nn.Module, targets: Sequence[str] | None = None, rank: int = 8,
               alpha: float = 16.0, dropout: float = 0.0) -> nn.Module:
    """Freeze ``model`` and inject trainable LoRA adapters (in place; returns ``model``).

    Args:
        model: a trained sequence model (SASRec, LRURec, GRU4Rec or any nn.Module).
        targets: module-name suffixes to adapt (default :func:`default_targets`).
        rank: r >= 1. alpha: LoRA scaling numerator (scale = alpha / r). dropout: on A's input.
    Returns: the model, with only ``lora_A`` / ``lora_B`` parameters requiring grad.
    Raises: ConfigError for rank < 1, no matching target, or a Matryoshka-masked target.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
    targets = tuple(targets) if targets is not None else default_targets(model)
    hits = [(n, m) for n, m in model.named_modules()
            if any(n == t or n.endswith("." + t) for t in targets)]
    if not hits:
        raise ConfigError(f"no module of {type(model).__name__} matches LoRA targets {targets}")
    for n, m in hits:
        if isinstance(m, MatryoshkaLinear) and m.mask is not None:
            raise ConfigError(f"LoRA on the Matryoshka-nested layer {n!r} would break nesting")
    model.requires_grad_(False)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                     bias="none")
    inject_adapter_in_model(cfg, model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


def lora_parameters(model: nn.Module) -> int:
    """Number of LoRA parameters (trainable after :func:`apply_lora`)."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base weight and remove the wrappers (in place).

    Returns: the model with its original module types and ``state_dict`` keys, all
    parameters frozen as after :func:`apply_lora` (callers re-enable grads if needed).
    """
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model
