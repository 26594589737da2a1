"""Which PEFT LoRA layers the fused LoRA ops (:mod:`hizli.kernels.lora_qkv`, :mod:`hizli.kernels.lora_mlp`)
compute exactly, and their parts as those ops read them.

The fused ops reproduce PEFT's ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` for one active
adapter with dropout off, on a plain or bitsandbytes 4-bit (NF4/FP4) base, without a bias except a
frozen one of the base layer in the q/k/v group (Qwen2's, which ``lora_qkv`` adds). Any layer they
do not cover exactly (dropout > 0, DoRA or another LoRA variant, any other bias, several active
adapters, a merged or disabled adapter, bitsandbytes' CPU-repacked layout) runs PEFT's own path instead; so do
eval and generation (the patched forwards in :mod:`hizli.models.patch` decide), where bitsandbytes'
4-bit inference kernels are faster for one token at a time. The adapters stay PEFT modules, so
saving, merging and loading do not change.
"""

from __future__ import annotations

from typing import Sequence

import torch

from hizli.kernels.lora_qkv import LoraPart


def lora_parts(layer: torch.nn.Module, base_bias: bool = False) -> LoraPart | None:
    """``(base_layer, A, B, scaling)`` for a PEFT LoRA layer the fused maths reproduces, else None.

    ``base_bias``: the caller adds a frozen bias of the base layer (``lora_qkv`` does, for Qwen2's q/k/v);
    a bias that trains (PEFT's ``bias="all"``) never qualifies."""
    lora_a = getattr(layer, "lora_A", None)
    if lora_a is None or getattr(layer, "disable_adapters", True) or getattr(layer, "merged", True):
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in lora_a:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return None
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, torch.nn.Identity) and getattr(dropout, "p", 1.0) > 0:
        return None
    b = layer.lora_B[name]
    base = layer.base_layer
    bias = getattr(base, "bias", None)
    if getattr(b, "bias", None) is not None or (bias is not None and (not base_bias or bias.requires_grad)):
        return None
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:
        if getattr(state, "packing_format_for_cpu", False) or state.quant_type not in ("nf4", "fp4"):
            return None
    elif not isinstance(base, torch.nn.Linear):
        return None
    return LoraPart(base, lora_a[name].weight, b.weight, float(layer.scaling[name]))


def group_parts(module: torch.nn.Module, names: Sequence[str], base_bias: bool = False) -> list[LoraPart] | None:
    """``lora_parts`` of each named projection of ``module``; None unless all of them qualify."""
    parts = []
    for name in names:
        p = lora_parts(getattr(module, name), base_bias)
        if p is None:
            return None
        parts.append(p)
    return parts
