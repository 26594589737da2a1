"""LoRA projections that share one input (the attention's q/k/v group, or o alone), fused into one
autograd function, and their reference with PEFT's maths.

PEFT computes each LoRA projection of a 4-bit model as about six separate steps (bitsandbytes
dequantises the NF4 weight and multiplies, PEFT clones the result, runs ``lora_A``, ``lora_B``,
scales and adds), each a Python call and a kernel launch, and autograd keeps every intermediate. With
small micro-batches (a tight memory budget) the step becomes bound by those Python calls rather
than by the GPU. Here one autograd function covers the group:

- forward: the weights are dequantised into one ``[sum(out), in]`` buffer (one matmul for q, k and
  v), the input goes through all the group's ``lora_A`` at once (``[T, n*r]``), and each ``lora_B``
  product is accumulated into its slice of the output by ``addmm_`` (no clone, no extra pass);
- backward: the weights are dequantised again rather than kept, and the ``lora_A`` gradients of the
  group come from one matmul.

Saved for backward: the input, the tiny ``x @ A^T`` (``[T, n*r]``) and the compute-dtype adapters.
Given the rotary tables (``rope=(cos, sin)``), the q/k/v group also rotates q and k in its own output
buffer (no tensors of their own: 8 kB a token at the 3B shape, kept for attention's backward in every
recomputed layer), and its backward rotates their gradients back in the buffer it builds.

Maths and dtypes (both paths): every matmul runs in the autocast dtype, or in the input's without
autocast; the result has that dtype. PEFT without autocast runs the adapter in its own (fp32) dtype
instead; the training step always runs under autocast, where the two agree.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from hizli.kernels._lora import (
    LoraPart,
    check_parts,
    compute_dtype,
    dequantized,
    no_autocast,
    projection_reference,
    scaled,
    stacked_bias,
)
from hizli.kernels.dispatch import use_triton
from hizli.kernels.lora_casts import ComputeCopies, compute_copy

__all__ = ["LoraPart", "lora_qkv", "lora_qkv_reference"]

# ---------------------------------------------------------------------------------------------
# Rotation inside the group's output buffer


def _rotate_qk(y: torch.Tensor, lead: torch.Size, sizes: Sequence[int], rope: tuple, backward: bool) -> None:
    """Rotary embedding on the q and k columns of a ``[tokens, sum(sizes)]`` buffer, in place."""
    from hizli.kernels.rope import rope_in_place

    cos, sin = rope
    d = cos.shape[-1]
    q = y[:, : sizes[0]].view(*lead, sizes[0] // d, d)
    k = y[:, sizes[0] : sizes[0] + sizes[1]].view(*lead, sizes[1] // d, d)
    rope_in_place(q, k, cos, sin, backward=backward)


# ---------------------------------------------------------------------------------------------
# autograd


class _LoraQKVFunction(torch.autograd.Function):
    """``y_i = x W_i^T + s_i (x A_i^T) B_i^T`` for projections sharing the input ``x``."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        bases: tuple,
        scalings: tuple,
        dtype: torch.dtype,
        rope: tuple | None,
        copies: ComputeCopies | None,
        *ab: torch.Tensor,
    ):
        a_list, b_list = ab[0::2], ab[1::2]
        sizes = [b.shape[0] for b in b_list]
        ranks = [a.shape[0] for a in a_list]
        with no_autocast(x.device):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            a_cat = (
                torch.cat([compute_copy(a, dtype, copies) for a in a_list])
                if len(a_list) > 1
                else compute_copy(a_list[0], dtype, copies)
            )
            b_list = [compute_copy(b, dtype, copies) for b in b_list]
            w = dequantized(bases, sizes, dtype, x.device)
            bias = stacked_bias(bases, sizes, dtype)  # a frozen base bias (Qwen2's q/k/v): no gradient
            y = x2 @ w.t() if bias is None else torch.addmm(bias, x2, w.t())
            del w
            xa = x2 @ a_cat.t()
            col = r0 = 0
            for b, s, size, r in zip(b_list, scalings, sizes, ranks):
                y[:, col : col + size].addmm_(xa[:, r0 : r0 + r], b.t(), alpha=s)
                col, r0 = col + size, r0 + r
            if rope is not None:
                _rotate_qk(y, x.shape[:-1], sizes, rope, backward=False)
        ctx.save_for_backward(x2, xa, a_cat, *b_list)  # b_list: the compute-dtype copies
        ctx.bases, ctx.scalings, ctx.dtype, ctx.rope = bases, scalings, dtype, rope
        ctx.sizes, ctx.ranks, ctx.x_shape, ctx.x_dtype = sizes, ranks, x.shape, x.dtype
        ctx.a_dtypes = [a.dtype for a in a_list]
        ctx.b_dtypes = [b.dtype for b in ab[1::2]]
        lead = x.shape[:-1]
        return tuple(part.view(*lead, size) for part, size in zip(y.split(sizes, dim=1), sizes))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        x2, xa, a_cat, *b_list = ctx.saved_tensors
        dtype, sizes, ranks, scalings = ctx.dtype, ctx.sizes, ctx.ranks, ctx.scalings
        n_tokens = x2.shape[0]
        with no_autocast(x2.device):
            parts = [
                torch.zeros((n_tokens, size), dtype=dtype, device=x2.device)
                if g is None
                else g.reshape(n_tokens, size).to(dtype)
                for g, size in zip(grads, sizes)
            ]
            dy = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            if ctx.rope is not None:  # back through the rotation, in dy (a fresh buffer: three parts)
                _rotate_qk(dy, ctx.x_shape[:-1], sizes, ctx.rope, backward=True)
                parts = list(dy.split(sizes, dim=1))
            d_xa, d_b = [], []
            r0 = 0
            for part, b, b_dtype, s, r in zip(parts, b_list, ctx.b_dtypes, scalings, ranks):
                d_xa.append(scaled(part @ b, s))
                d_b.append(scaled(part.t() @ xa[:, r0 : r0 + r], s).to(b_dtype))
                r0 += r
            del parts
            d_xa_cat = torch.cat(d_xa, dim=1) if len(d_xa) > 1 else d_xa[0]
            d_a = (d_xa_cat.t() @ x2).split(ranks, dim=0)
            dx = None
            if ctx.needs_input_grad[0]:
                w = dequantized(ctx.bases, sizes, dtype, x2.device)
                dx = dy @ w
                del w
                dx.addmm_(d_xa_cat, a_cat)
                dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        ab_grads: list[torch.Tensor] = []
        for da, db, a_dtype in zip(d_a, d_b, ctx.a_dtypes):
            ab_grads += [da.to(a_dtype), db]
        return (dx, None, None, None, None, None, *ab_grads)


# ---------------------------------------------------------------------------------------------
# Reference and public op


def _check(x: torch.Tensor, parts: Sequence[LoraPart], rope: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    check_parts("lora_qkv", x.shape[-1], parts)
    if rope is not None and (len(parts) != 3 or any(t.requires_grad for t in rope)):
        raise ValueError(
            "lora_qkv: rope=(cos, sin) is for a q/k/v group of three projections with constant "
            "cos/sin (no gradient); rotate other groups with hizli.kernels.rope.rope"
        )


def lora_qkv_reference(
    x: torch.Tensor,
    parts: Sequence[LoraPart],
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    copies: ComputeCopies | None = None,
) -> tuple[torch.Tensor, ...]:
    """PEFT's maths in plain PyTorch, projection by projection; arguments and result as :func:`lora_qkv`.

    Each output is ``x W^T + ((x A^T) B^T) * scaling`` (PEFT's ``base(x) + lora_B(lora_A(dropout(x)))
    * scaling`` with dropout off), ``W`` dequantized by :func:`hizli.kernels.nf4.dequantize_nf4_reference`
    when it is NF4; q and k are then rotated as transformers' ``apply_rotary_pos_emb`` does.
    """
    _check(x, parts, rope)
    dtype = compute_dtype(x)
    with no_autocast(x.device):
        xc = x.to(dtype)
        outs = [projection_reference(xc, part) for part in parts]
        if rope is None:
            return tuple(outs)
        from hizli.kernels.rope import rope_reference

        cos, sin = (t.to(dtype) for t in rope)
        d = cos.shape[-1]
        q, k = (o.view(*x.shape[:-1], -1, d) for o in outs[:2])
        q, k = rope_reference(q, k, cos, sin, unsqueeze_dim=2)
        return q.flatten(-2), k.flatten(-2), outs[2]


def lora_qkv(
    x: torch.Tensor,
    parts: Sequence[LoraPart],
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    copies: ComputeCopies | None = None,
) -> tuple[torch.Tensor, ...]:
    """Outputs of LoRA projections sharing the input ``x``: the fused function on CUDA (its NF4
    dequantization and rotation in Triton), the reference elsewhere.

    Differentiable in ``x`` and every ``lora_A`` / ``lora_B`` (gradients in their own dtypes); the
    base weights are frozen.

    Args:
        x: ``[..., in]`` activations.
        parts: one :class:`LoraPart` ``(base, lora_A, lora_B, scaling)`` per projection, all reading
            ``in`` features (``hizli.models.fused_lora.group_parts`` makes them from PEFT layers).
        rope: ``(cos, sin)``, the rotary module's ``[B, T, head_dim]`` tables without gradient, for a
            q/k/v group: q and k come out rotated, as ``apply_rotary_pos_emb`` would make them.
        copies: the training run's kept compute-dtype adapter weights (``hizli.kernels.lora_casts``);
            None casts them at every use. The reference always casts.

    Returns:
        One ``[..., out_i]`` tensor per part, in the compute dtype (autocast's, else ``x``'s).

    Raises:
        ValueError: parts that do not fit ``x``, or ``rope`` on a group other than three projections.
    """
    _check(x, parts, rope)
    ab: list[Any] = []
    for _base, a, b, _scaling in parts:
        ab += [a, b]
    if not use_triton("lora_qkv", x, *ab):
        return lora_qkv_reference(x, parts, rope)
    return _LoraQKVFunction.apply(
        x, tuple(p[0] for p in parts), tuple(float(p[3]) for p in parts), compute_dtype(x), rope, copies, *ab
    )
