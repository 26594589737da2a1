"""The Llama MLP ``down(silu(gate(x)) * up(x))`` with LoRA on all three projections, fused into one
autograd function, and its reference with PEFT's maths.

What PEFT runs as three LoRA projections (each about six Python calls and kernel launches, see
:mod:`hizli.kernels.lora_qkv`) plus the activation becomes one function:

- forward: gate and up take turns in one dequantised weight-sized buffer (one transient weight, not
  two) and write into one ``[2, T, I]`` output; the input goes through both ``lora_A`` at once;
  SwiGLU runs as one fused kernel; the down projection follows;
- backward: the weights are dequantised again rather than kept (the dequantised MLP weights alone
  would be 100 MB per layer at the 3B shape), ``silu(gate) * up`` is recomputed, and the SwiGLU
  gradients overwrite the saved gate and up outputs.

Saved for backward: the input, ``x @ A^T`` for gate and up (``[T, 2r]``), the gate and up outputs
(``[2, T, I]``), ``h @ A_down^T`` and the compute-dtype adapters.

Maths and dtypes as in :mod:`hizli.kernels.lora_qkv`: every matmul in the autocast dtype (or the
input's), the result in that dtype. The fused SwiGLU computes in fp32 and rounds once where
transformers' ``act_fn(gate) * up`` rounds twice in bf16.
"""

from __future__ import annotations

from typing import Sequence

import torch

from hizli.kernels._lora import (
    LoraPart,
    check_parts,
    compute_dtype,
    dequantize_into,
    dequantized,
    no_autocast,
    projection_reference,
    row_chunk,
    scaled,
)
from hizli.kernels.dispatch import use_triton
from hizli.kernels.lora_casts import ComputeCopies, compute_copy

# ---------------------------------------------------------------------------------------------
# autograd


class _LoraMLPFunction(torch.autograd.Function):
    """``down(silu(gate(x)) * up(x))``, each projection ``x W^T + s (x A^T) B^T``."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        bases: tuple,
        scalings: tuple,
        dtype: torch.dtype,
        copies: ComputeCopies | None,
        a_gate,
        b_gate,
        a_up,
        b_up,
        a_down,
        b_down,
    ):
        from hizli.kernels.swiglu import swiglu_forward

        inter = b_gate.shape[0]
        r_gate = a_gate.shape[0]
        s_gate, s_up, s_down = scalings
        with no_autocast(x.device):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            a_cat = torch.cat([compute_copy(a_gate, dtype, copies), compute_copy(a_up, dtype, copies)])
            ctx.b_dtypes = (b_gate.dtype, b_up.dtype, b_down.dtype)
            b_gate, b_up, b_down = (compute_copy(b, dtype, copies) for b in (b_gate, b_up, b_down))
            # gate and up outputs in one [2, T, I] buffer; one dequantized weight at a time (50 MB at
            # the 3B shape rather than 100: ~450 tokens more per micro-batch under a tight cap)
            gu = torch.empty((2, x2.shape[0], inter), dtype=dtype, device=x.device)
            w = torch.empty((inter, x2.shape[1]), dtype=dtype, device=x.device)
            for i, base in enumerate(bases[:2]):
                dequantize_into(base, w)  # stream order: the previous matmul has read w by then
                torch.mm(x2, w.t(), out=gu[i])
            del w
            xa = x2 @ a_cat.t()
            gu[0].addmm_(xa[:, :r_gate], b_gate.t(), alpha=s_gate)
            gu[1].addmm_(xa[:, r_gate:], b_up.t(), alpha=s_up)
            h = swiglu_forward(gu[0], gu[1])
            a_d = compute_copy(a_down, dtype, copies)
            ha = h @ a_d.t()
            w = dequantized(bases[2:], (b_down.shape[0],), dtype, x.device)
            y = h @ w.t()
            del w, h
            y.addmm_(ha, b_down.t(), alpha=s_down)
        ctx.save_for_backward(x2, xa, gu, ha, a_cat, a_d, b_gate, b_up, b_down)
        ctx.bases, ctx.scalings, ctx.dtype, ctx.x_shape, ctx.x_dtype = bases, scalings, dtype, x.shape, x.dtype
        ctx.a_dtypes = (a_gate.dtype, a_up.dtype, a_down.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from hizli.kernels.swiglu import swiglu_backward, swiglu_forward

        x2, xa, gu, ha, a_cat, a_d, b_gate, b_up, b_down = ctx.saved_tensors
        dtype = ctx.dtype
        s_gate, s_up, s_down = ctx.scalings
        inter, r_gate = b_gate.shape[0], a_cat.shape[0] - b_up.shape[1]
        gate, up = gu[0], gu[1]
        with no_autocast(x2.device):
            dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
            # down projection
            h = swiglu_forward(gate, up)
            d_b_down = scaled(dy2.t() @ ha, s_down)
            d_ha = scaled(dy2 @ b_down, s_down)
            d_a_down = d_ha.t() @ h
            del h
            w = dequantized(ctx.bases[2:], (b_down.shape[0],), dtype, x2.device)
            dh = dy2 @ w
            del w
            dh.addmm_(d_ha, a_d)
            # SwiGLU: the gradients overwrite gate and up, which nothing needs any more
            d_gate, d_up = swiglu_backward(dh, gate, up, out=(gate, up))
            del dh
            # gate and up projections
            d_xa = torch.cat([scaled(d_gate @ b_gate, s_gate), scaled(d_up @ b_up, s_up)], dim=1)
            d_b_gate = scaled(d_gate.t() @ xa[:, :r_gate], s_gate)
            d_b_up = scaled(d_up.t() @ xa[:, r_gate:], s_up)
            d_a_gate, d_a_up = (d_xa.t() @ x2).split([r_gate, a_cat.shape[0] - r_gate], dim=0)
            dx = None
            if ctx.needs_input_grad[0]:
                w = torch.empty((inter, x2.shape[1]), dtype=dtype, device=x2.device)
                dequantize_into(ctx.bases[0], w)
                dx = d_gate @ w
                dequantize_into(ctx.bases[1], w)
                dx.addmm_(d_up, w)
                del w
                dx.addmm_(d_xa, a_cat)
                dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        a_gate_t, a_up_t, a_down_t = ctx.a_dtypes
        b_gate_t, b_up_t, b_down_t = ctx.b_dtypes
        return (
            dx,
            None,
            None,
            None,
            None,
            d_a_gate.to(a_gate_t),
            d_b_gate.to(b_gate_t),
            d_a_up.to(a_up_t),
            d_b_up.to(b_up_t),
            d_a_down.to(a_down_t),
            d_b_down.to(b_down_t),
        )


# Pieces the unread-output MLP's backward cuts the intermediate features into: its [T, I] temporaries
# shrink to three [T, I / 4] (the memory plan counts them through this constant), at about 18 more
# launches per piece.
UNREAD_CHUNKS = 4
# Pieces of a forward without autograd (an offloaded layer's first pass): [T, 3I] of temporaries
# become [T, 3I / 2], below what the layer's backward then needs, for 9 more launches.
NO_GRAD_CHUNKS = 2


class _GateUpSlices:
    """Gate and up projections of slices of the intermediate features, each from its own rows of
    the two weights, into buffers reused from slice to slice (the sliced MLP paths below).

    ``xa`` is ``x2 @ [A_gate; A_up]^T``, ``r_gate`` the gate adapter's rank; ``gate`` and ``up`` are
    PEFT layers' maths for those rows: ``x W^T + s (x A^T) B^T``.
    """

    def __init__(self, x2, xa, r_gate, bases, *, b_gate, b_up, scalings, parts: int) -> None:
        self.x2, self.xa, self.r_gate, self.bases = x2, xa, r_gate, bases
        self.b_gate, self.b_up, self.scalings = b_gate, b_up, scalings
        self.inter, hidden, n_tokens = b_gate.shape[0], x2.shape[1], x2.shape[0]
        self.chunk = row_chunk(bases, self.inter, parts)
        self.w_flat = torch.empty(2 * self.chunk * hidden, dtype=x2.dtype, device=x2.device)
        self.gu_flat = torch.empty(2 * n_tokens * self.chunk, dtype=x2.dtype, device=x2.device)

    def spans(self):
        """``(start, stop)`` of each slice, in order."""
        return [(start, min(self.inter, start + self.chunk)) for start in range(0, self.inter, self.chunk)]

    def compute(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(w, gate, up)``: the slice's dequantized rows ``[2, n, H]`` and its outputs ``[T, n]``
        each (valid until the next slice is computed)."""
        x2, n, hidden = self.x2, stop - start, self.x2.shape[1]
        w = self.w_flat[: 2 * n * hidden].view(2, n, hidden)
        dequantize_into(self.bases[0], w[0], rows=(start, stop))
        dequantize_into(self.bases[1], w[1], rows=(start, stop))
        gu = self.gu_flat[: 2 * x2.shape[0] * n].view(2, x2.shape[0], n)
        gate, up = gu[0], gu[1]
        torch.mm(x2, w[0].t(), out=gate)
        torch.mm(x2, w[1].t(), out=up)
        gate.addmm_(self.xa[:, : self.r_gate], self.b_gate[start:stop].t(), alpha=self.scalings[0])
        up.addmm_(self.xa[:, self.r_gate :], self.b_up[start:stop].t(), alpha=self.scalings[1])
        return w, gate, up


def _forward_in_pieces(x, bases, scalings, dtype, copies, adapters):
    """The MLP's output without autograd, the intermediate features ``NO_GRAD_CHUNKS`` slices at a
    time: each slice's SwiGLU goes through its columns of the down projection into one sum.
    ``adapters``: ``(a_gate, b_gate, a_up, b_up, a_down, b_down)``."""
    from hizli.kernels.swiglu import swiglu_forward

    with no_autocast(x.device):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        a_gate, b_gate, a_up, b_up, a_down, b_down = (compute_copy(t, dtype, copies) for t in adapters)
        n_tokens, out_features = x2.shape[0], b_down.shape[0]
        xa = x2 @ torch.cat([a_gate, a_up]).t()
        slices = _GateUpSlices(
            x2, xa, a_gate.shape[0], bases[:2], b_gate=b_gate, b_up=b_up, scalings=scalings, parts=NO_GRAD_CHUNKS
        )
        w_down = dequantized(bases[2:], (out_features,), dtype, x.device)
        y = torch.empty((n_tokens, out_features), dtype=dtype, device=x.device)
        ha = torch.empty((n_tokens, a_down.shape[0]), dtype=dtype, device=x.device)
        for start, stop in slices.spans():
            beta = 0.0 if start == 0 else 1.0  # the first slice writes the sums (empty buffers)
            _w, gate, up = slices.compute(start, stop)
            h = swiglu_forward(gate, up)
            y.addmm_(h, w_down[:, start:stop].t(), beta=beta)
            ha.addmm_(h, a_down[:, start:stop].t(), beta=beta)
            del h
        y.addmm_(ha, b_down.t(), alpha=scalings[2])
    return y.view(*x.shape[:-1], out_features)


class _LoraMLPUnreadFunction(torch.autograd.Function):
    """The MLP of a layer that is recomputed only for its backward, whose output nobody reads.

    An offloaded layer runs again in backward only to rebuild what its backward needs; its output
    feeds the residual add alone, whose backward needs no values. So the forward here computes
    nothing: it keeps the input and returns zeros (a broadcast scalar, no memory), and the backward
    computes gate, up and SwiGLU itself, ``UNREAD_CHUNKS`` slices of the intermediate features at a
    time, from the gate and up weights' rows of that slice. What is kept per token falls from the
    input plus ``[2, T, I]`` to the input, and the backward's temporaries from ``[3, T, I]`` to three
    ``[T, I / UNREAD_CHUNKS]``; the down projection of the forward is not computed at all.
    """

    @staticmethod
    def forward(ctx, x, bases, scalings, dtype, copies, a_gate, b_gate, a_up, b_up, a_down, b_down):
        with no_autocast(x.device):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        ctx.save_for_backward(x2, a_gate, b_gate, a_up, b_up, a_down, b_down)
        ctx.bases, ctx.scalings, ctx.dtype, ctx.copies = bases, scalings, dtype, copies
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return torch.zeros((), dtype=dtype, device=x.device).expand(*x.shape[:-1], b_down.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from hizli.kernels.swiglu import swiglu_backward, swiglu_forward

        x2, *adapters = ctx.saved_tensors
        dtype, copies, device = ctx.dtype, ctx.copies, x2.device
        s_gate, s_up, s_down = ctx.scalings
        n_tokens, hidden = x2.shape
        with no_autocast(device):
            a_gate, b_gate, a_up, b_up, a_down, b_down = (compute_copy(t, dtype, copies) for t in adapters)
            inter, r_gate = b_gate.shape[0], a_gate.shape[0]
            a_cat = torch.cat([a_gate, a_up])
            dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
            xa = x2 @ a_cat.t()
            xa_gate, xa_up = xa[:, :r_gate], xa[:, r_gate:]
            d_ha = scaled(dy2 @ b_down, s_down)
            slices = _GateUpSlices(
                x2, xa, r_gate, ctx.bases[:2], b_gate=b_gate, b_up=b_up, scalings=ctx.scalings, parts=UNREAD_CHUNKS
            )
            w_down = dequantized(ctx.bases[2:], (hidden,), dtype, device)  # [H, I], read by column slices
            ha = torch.empty((n_tokens, a_down.shape[0]), dtype=dtype, device=device)
            d_xa = torch.empty_like(xa)
            dx = torch.empty((n_tokens, hidden), dtype=dtype, device=device)
            d_a_down_t = torch.empty((inter, a_down.shape[0]), dtype=dtype, device=device)
            d_b_gate = torch.empty_like(b_gate)
            d_b_up = torch.empty_like(b_up)
            for start, stop in slices.spans():
                beta = 0.0 if start == 0 else 1.0  # the first slice writes the sums (empty buffers)
                w, gate, up = slices.compute(start, stop)
                h = swiglu_forward(gate, up)
                ha.addmm_(h, a_down[:, start:stop].t(), beta=beta)
                torch.mm(h.t(), d_ha, out=d_a_down_t[start:stop])
                del h
                dh = dy2 @ w_down[:, start:stop]
                dh.addmm_(d_ha, a_down[:, start:stop])
                d_gate, d_up = swiglu_backward(dh, gate, up, out=(gate, up))  # over gate and up
                del dh
                d_xa[:, :r_gate].addmm_(d_gate, b_gate[start:stop], beta=beta, alpha=s_gate)
                d_xa[:, r_gate:].addmm_(d_up, b_up[start:stop], beta=beta, alpha=s_up)
                torch.mm(d_gate.t(), xa_gate, out=d_b_gate[start:stop])
                torch.mm(d_up.t(), xa_up, out=d_b_up[start:stop])
                dx.addmm_(d_gate, w[0], beta=beta)
                dx.addmm_(d_up, w[1])
            del slices, w_down
            scaled(d_b_gate, s_gate)
            scaled(d_b_up, s_up)
            d_b_down = scaled(dy2.t() @ ha, s_down)
            d_a_gate, d_a_up = (d_xa.t() @ x2).split([r_gate, a_cat.shape[0] - r_gate], dim=0)
            dx.addmm_(d_xa, a_cat)
            dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        grads = (d_a_gate, d_b_gate, d_a_up, d_b_up, d_a_down_t.t(), d_b_down)
        return (dx, None, None, None, None, *(g.to(t.dtype) for g, t in zip(grads, adapters)))


# ---------------------------------------------------------------------------------------------
# Reference and public op


def _check(x: torch.Tensor, parts: Sequence[LoraPart]) -> None:
    if len(parts) != 3:
        raise ValueError(f"lora_mlp: parts has {len(parts)} entries; pass three, for gate, up and down")
    gate, up, down = parts
    check_parts("lora_mlp", x.shape[-1], [gate, up])
    inter, inter_up = gate[2].shape[0], up[2].shape[0]
    if inter != inter_up:
        raise ValueError(f"lora_mlp: gate has {inter} outputs and up {inter_up}: they must match")
    check_parts("lora_mlp (down)", inter, [down])
    for i, part in enumerate(parts):
        if getattr(part[0], "bias", None) is not None:
            raise ValueError(
                f"lora_mlp: part {i}'s base layer has a bias; the fused MLP computes projections without one"
            )


def lora_mlp_reference(x: torch.Tensor, parts: Sequence[LoraPart], copies: ComputeCopies | None = None) -> torch.Tensor:
    """PEFT's maths in plain PyTorch, as the Llama MLP runs it over PEFT layers:
    ``down(silu(gate(x)) * up(x))``, each projection as in
    :func:`hizli.kernels.lora_qkv.lora_qkv_reference`; arguments and result as :func:`lora_mlp`."""
    _check(x, parts)
    gate, up, down = parts
    with no_autocast(x.device):
        xc = x.to(compute_dtype(x))
        h = torch.nn.functional.silu(projection_reference(xc, gate)) * projection_reference(xc, up)
        return projection_reference(h, down)


def lora_mlp(
    x: torch.Tensor,
    parts: Sequence[LoraPart],
    copies: ComputeCopies | None = None,
    output_unread: bool = False,
    in_pieces: bool = False,
) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` with LoRA on the three projections: the fused function on CUDA
    (its NF4 dequantization and SwiGLU in Triton), the reference elsewhere.

    Differentiable in ``x`` and every ``lora_A`` / ``lora_B`` (gradients in their own dtypes); the
    base weights are frozen.

    Args:
        x: ``[..., H]`` activations.
        parts: three :class:`~hizli.kernels.lora_qkv.LoraPart`, gate and up (``H -> I``) then down
            (``I -> H``); ``hizli.models.fused_lora.group_parts`` makes them from PEFT layers.
        copies: as in :func:`hizli.kernels.lora_qkv.lora_qkv`.
        output_unread: (with autograd on) the caller never reads the output's values, only
            backpropagates through it (a layer recomputed for its backward, the output going to a
            residual add): the fused function then returns zeros and does all its work in backward,
            keeping only ``x`` (see ``_LoraMLPUnreadFunction``). Ignored by the reference, which
            computes the output.
        in_pieces: without autograd (``torch.no_grad``: an offloaded layer's first pass), compute
            the output in ``NO_GRAD_CHUNKS`` slices of the intermediate features, holding half the
            temporaries for a few more launches. Ignored with autograd on and by the reference.

    Returns:
        ``[..., H_out]`` in the compute dtype (autocast's, else ``x``'s); zeros with ``output_unread``
        on the fused path.

    Raises:
        ValueError: not three parts, parts whose shapes do not chain, or a base layer with a bias.
    """
    _check(x, parts)
    (g_base, a_g, b_g, s_g), (u_base, a_u, b_u, s_u), (d_base, a_d, b_d, s_d) = parts
    if not use_triton("lora_mlp", x, a_g, b_g, a_u, b_u, a_d, b_d):
        return lora_mlp_reference(x, parts)
    args = (x, (g_base, u_base, d_base), (float(s_g), float(s_u), float(s_d)), compute_dtype(x), copies)
    adapters = (a_g, b_g, a_u, b_u, a_d, b_d)
    if in_pieces and not torch.is_grad_enabled():
        return _forward_in_pieces(*args, adapters)
    function = _LoraMLPUnreadFunction if output_unread else _LoraMLPFunction
    return function.apply(*args, *adapters)
