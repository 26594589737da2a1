"""What the fused LoRA ops (``lora_qkv``, ``lora_mlp``) share: the record of one projection, the dtype
the matmuls run in, the frozen weight dequantized into a buffer, and PEFT's maths for one projection.

A LoRA projection computes PEFT's ``y = base(x) + lora_B(lora_A(dropout(x))) * scaling``, with
``base(x) = x W^T`` and ``W`` dequantized first when the base layer is 4-bit (bitsandbytes NF4/FP4).
The fused ops take only projections whose dropout is off and whose only bias is a frozen one of the
base layer, which ``lora_qkv`` adds (see ``hizli.models.fused_lora.lora_parts``), so dropout is the
identity here.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch

from hizli.kernels.nf4 import dequantize_nf4, dequantize_nf4_reference


class LoraPart(NamedTuple):
    """One LoRA projection as the fused ops read it (a plain 4-tuple in this order works too).

    Attributes:
        base: the frozen base layer: a ``torch.nn.Linear`` or a bitsandbytes ``Linear4bit`` (anything
            with ``weight`` ``[out, in]``, or packed 4-bit bytes with a ``quant_state``, and
            ``in_features``). No gradient reaches it.
        a: ``lora_A`` weight ``[r, in]``.
        b: ``lora_B`` weight ``[out, r]``.
        scaling: ``lora_alpha / r`` (or rsLoRA's ``lora_alpha / sqrt(r)``).
    """

    base: Any
    a: torch.Tensor
    b: torch.Tensor
    scaling: float


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype PEFT's matmuls run in: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def no_autocast(device: torch.device):
    """Autocast off: the ops cast explicitly to the compute dtype, so every matmul runs where it was meant to."""
    return torch.autocast(device.type, enabled=False)


def scaled(t: torch.Tensor, s: float) -> torch.Tensor:
    """``t`` multiplied in place by the LoRA scaling ``s``; nothing when ``s`` is 1 (``lora_alpha == r``,
    the recipe's setting), where the multiply would be a kernel launch that changes no bit."""
    if s != 1.0:
        t.mul_(s)
    return t


def dequantize_into(base: Any, out: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
    """Write ``base``'s weight, dequantized if 4-bit, into ``out`` (``[out_features, in_features]``),
    or only its rows ``[start, stop)`` (an NF4 range must start and end on a block boundary: see
    :func:`row_chunk`)."""
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        out.copy_(weight if rows is None else weight[rows[0] : rows[1]])
        return
    if state.quant_type == "nf4":
        dequantize_nf4(weight, state, out=out, rows=rows)  # Triton on CUDA, its PyTorch reference elsewhere
        return
    import bitsandbytes.functional as bnbf

    whole = bnbf.dequantize_4bit(weight.data, state)
    out.copy_(whole if rows is None else whole[rows[0] : rows[1]])


def row_chunk(bases: Sequence[Any], rows: int, parts: int) -> int:
    """Rows per chunk to cut weights of ``rows`` rows into about ``parts`` pieces, each starting on a
    quantization-block boundary of every 4-bit base (a row starts on one every ``blocksize / gcd(in,
    blocksize)`` rows)."""
    from math import gcd

    step = 1
    for base in bases:
        state = getattr(base.weight, "quant_state", None)
        if state is not None:
            blocksize = int(state.blocksize)
            need = blocksize // gcd(base.in_features, blocksize)
            step = step * need // gcd(step, need)
    chunk = -(-rows // max(1, parts))
    return min(rows, -(-chunk // step) * step)


def stacked_bias(bases: Sequence[Any], sizes: Sequence[int], dtype: torch.dtype) -> torch.Tensor | None:
    """The biases of ``bases`` in one ``[sum(sizes)]`` vector in ``dtype`` (zeros for a base without
    one), or None when none has a bias."""
    biases = [getattr(base, "bias", None) for base in bases]
    if all(b is None for b in biases):
        return None
    device = next(b for b in biases if b is not None).device
    return torch.cat(
        [
            b.detach().to(dtype) if b is not None else torch.zeros(size, dtype=dtype, device=device)
            for b, size in zip(biases, sizes)
        ]
    )


def dequantized(bases: Sequence[Any], sizes: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The weights of ``bases`` stacked by rows, ``[sum(sizes), in_features]`` in ``dtype``."""
    w = torch.empty((sum(sizes), bases[0].in_features), dtype=dtype, device=device)
    row = 0
    for base, size in zip(bases, sizes):
        dequantize_into(base, w[row : row + size])
        row += size
    return w


def weight_reference(base: Any, dtype: torch.dtype) -> torch.Tensor:
    """``base``'s weight in ``dtype``, detached: NF4 through the pure-PyTorch dequantization, FP4
    through bitsandbytes (hizli has no FP4 reference), a plain weight by a cast."""
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight.detach().to(dtype)
    if state.quant_type == "nf4":
        return dequantize_nf4_reference(weight.detach(), state, dtype=dtype)
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, state).to(dtype)


def projection_reference(x: torch.Tensor, part: LoraPart) -> torch.Tensor:
    """PEFT's LoRA projection of ``x`` (already in the compute dtype, autocast off), in that dtype:
    ``x W^T + ((x A^T) B^T) * scaling``, the operations in PEFT's order."""
    base, a, b, scaling = part
    dtype = x.dtype
    bias = getattr(base, "bias", None)
    y = torch.nn.functional.linear(x, weight_reference(base, dtype), None if bias is None else bias.to(dtype))
    lora = torch.nn.functional.linear(torch.nn.functional.linear(x, a.to(dtype)), b.to(dtype))
    return y + lora * scaling


def check_parts(op: str, in_features: int, parts: Sequence[LoraPart]) -> None:
    """Raise ``ValueError`` unless every part reads ``in_features`` features and its A and B fit together."""
    if not parts:
        raise ValueError(f"{op}: parts is empty; pass at least one (base, lora_A, lora_B, scaling)")
    for i, (base, a, b, _scaling) in enumerate(parts):
        if base.in_features != in_features or a.shape[1] != in_features or b.shape[1] != a.shape[0]:
            raise ValueError(
                f"{op}: part {i} has base in_features {base.in_features}, lora_A {tuple(a.shape)} "
                f"and lora_B {tuple(b.shape)} but its input has {in_features} features: the base "
                f"must read {in_features}, lora_A be [r, {in_features}] and lora_B [out, r]"
            )
