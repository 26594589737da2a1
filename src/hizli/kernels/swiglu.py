"""SwiGLU gating ``silu(gate) * up`` as fused Triton kernels (forward + backward) and a reference.

The Llama MLP computes ``down(act_fn(gate(x)) * up(x))`` with ``act_fn = silu``; this op is the
middle part. Inputs and outputs stay in the activation's dtype; the arithmetic inside is fp32 and the
result is rounded once (transformers rounds twice in bf16: after ``silu`` and after the product).

Derivatives, with ``s = sigmoid(g)``: ``d/dg = dy * up * s * (1 + g * (1 - s))`` and
``d/dup = dy * g * s``. The backward recomputes ``s`` from the saved ``gate`` instead of saving
``silu(gate)``: one [N, I] tensor less kept for backward (196 MB per layer at the recipe shape).

Bytes at the recipe shape (N = 12,000 tokens, intermediate I = 8,192, bf16, 196.6 MB per tensor):
forward reads gate, up and writes the product (590 MB); backward reads dy, gate, up and writes
d_gate, d_up (983 MB): 1.57 GB, 524 us at 3.0 TB/s. About 20 flops per element: bandwidth-bound.

Kernel design: a 2-d grid of (row, column block) so that ``gate`` and ``up`` may be strided row views
(for instance the two halves of one fused gate/up projection) without a copy. Liger's and Unsloth's
SwiGLU kernels were read for the derivative layout; the code is written from the formulas above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hizli.kernels._triton_utils import FP_FUSION, lazy_jit, next_power_of_2, tl
from hizli.kernels.dispatch import use_triton

# 2,048 bf16 elements (4 KB) per program and 8 per thread with 8 warps: 16-byte vector loads and a
# grid of 48,000 programs at the recipe shape, many waves over 132 multiprocessors.
_BLOCK = 2048
_WARPS = 8
_OPTIONS = {"num_warps": _WARPS, "enable_fp_fusion": FP_FUSION}  # both directions launch with these

# ---------------------------------------------------------------------------------------------
# Triton kernels


@lazy_jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, y_ptr, n_cols, g_stride, u_stride, y_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + row * y_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@lazy_jit
def _swiglu_bwd_kernel(
    dy_ptr,
    g_ptr,
    u_ptr,
    dg_ptr,
    du_ptr,
    n_cols,
    dy_stride,
    g_stride,
    u_stride,
    dg_stride,
    du_stride,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(dy_ptr + row * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    tl.store(dg_ptr + row * dg_stride + cols, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + row * du_stride + cols, (dy * silu).to(du_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g2, u2 = _rows(gate), _rows(up)
    n_rows, n_cols = g2.shape
    y = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    if y.numel():
        block = min(_BLOCK, next_power_of_2(n_cols))
        grid = (n_rows, -(-n_cols // block))
        _swiglu_fwd_kernel[grid](g2, u2, y, n_cols, g2.stride(0), u2.stride(0), y.stride(0), BLOCK=block, **_OPTIONS)
    return y.view(gate.shape)


def _swiglu_bwd(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    d2, g2, u2 = _rows(dy), _rows(gate), _rows(up)
    n_rows, n_cols = g2.shape
    if out is None:
        dg = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
        du = torch.empty((n_rows, n_cols), dtype=up.dtype, device=up.device)
    else:  # each program reads its elements before writing them, so out may alias gate and up
        dg, du = out
    if dg.numel():
        block = min(_BLOCK, next_power_of_2(n_cols))
        grid = (n_rows, -(-n_cols // block))
        _swiglu_bwd_kernel[grid](
            d2,
            g2,
            u2,
            dg,
            du,
            n_cols,
            d2.stride(0),
            g2.stride(0),
            u2.stride(0),
            dg.stride(0),
            du.stride(0),
            BLOCK=block,
            **_OPTIONS,
        )
    return dg.view(gate.shape), du.view(up.shape)


# ---------------------------------------------------------------------------------------------
# autograd


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return _swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        return _swiglu_bwd(dy, gate, up)


# ---------------------------------------------------------------------------------------------
# Reference and public op


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
            "must have the same shape and dtype"
        )


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch ``silu(gate) * up``, computed in (at least) fp32 and rounded once to the inputs' dtype.

    Args:
        gate: ``[..., I]`` gate projection output.
        up: ``[..., I]`` up projection output, same dtype.

    Returns:
        ``[..., I]`` in the inputs' dtype.
    """
    _check(gate, up)
    compute = torch.promote_types(gate.dtype, torch.float32)  # fp32 for half types, fp64 stays fp64
    return (F.silu(gate.to(compute)) * up.to(compute)).to(gate.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``: fused Triton kernels on CUDA, the reference elsewhere.

    Args:
        gate: ``[..., I]`` gate projection output (bf16, fp16 or fp32); rows may be strided.
        up: ``[..., I]`` up projection output, same shape and dtype.

    Returns:
        ``[..., I]`` contiguous, in the inputs' dtype.
    """
    _check(gate, up)
    if use_triton("swiglu", gate, up):
        return _SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` without autograd, for callers that write their own backward (the fused
    LoRA MLP). 2-d inputs ``[N, I]`` whose rows may be strided (halves of one ``[N, 2I]`` tensor)."""
    _check(gate, up)
    if use_triton("swiglu", gate, up):
        return _swiglu_fwd(gate, up)
    return swiglu_reference(gate, up)


def swiglu_backward(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(d_gate, d_up)`` of :func:`swiglu_forward` for 2-d ``[N, I]`` inputs.

    ``out`` receives them when given (two ``[N, I]`` tensors, which may be ``gate`` and ``up``
    themselves: the fused MLP overwrites its saved projections to save a ``[N, 2I]`` buffer).
    """
    _check(gate, up)
    if use_triton("swiglu", dy, gate, up):
        return _swiglu_bwd(dy, gate, up, out)
    compute = torch.promote_types(gate.dtype, torch.float32)
    g, u, d = gate.to(compute), up.to(compute), dy.to(compute)
    s = torch.sigmoid(g)
    dg = (d * u * s * (1 + g * (1 - s))).to(gate.dtype)
    du = (d * g * s).to(up.dtype)
    if out is None:
        return dg, du
    out[0].copy_(dg)
    out[1].copy_(du)
    return out
