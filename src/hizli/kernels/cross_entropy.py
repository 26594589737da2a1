"""Fused linear cross-entropy: ``loss = CE(hidden @ weight.T, targets)`` without the [N, V] logits.

Rows go through the language-model head a chunk at a time. For each chunk the logits are made by one
matrix product (in the inputs' dtype, fp32 accumulation inside cuBLAS: the same rounding as
``lm_head(hidden)`` in transformers, which then upcasts), then one pass computes in fp32 the
log-sum-exp, each row's loss and the gradient of the loss wrt the logits, written over the logits
buffer in place; one more product turns it into the chunk's gradient wrt ``hidden`` (and, only if
``weight`` requires grad, accumulates the gradient wrt ``weight``). The gradients are computed in the
forward pass and kept until backward, which only scales them by the incoming gradient: the approach
of Liger-Kernel's fused linear cross-entropy (read for the idea; this code is written from the
math). The chunk's per-row pass is a Triton kernel on CUDA and plain torch elsewhere; the chunk loop,
the products and the autograd glue are shared.

Optional ``logit_scale`` (logits multiplied by it, as Cohere/Granite heads do) and ``softcap``
(``softcap * tanh(z / softcap)``, as Gemma-2 does) are applied in fp32 before the softmax.

A target that is neither ``ignore_index`` nor in ``[0, V)`` gives a NaN loss (the trainer's NaN
check then names the step) instead of a device-side assert or an out-of-bounds read.

FLOPs and bytes at the recipe shape (N = 12,000 rows at most, all tokens trained; H = 3,072;
V = 128,256; bf16): the logits product and the hidden-gradient product are 2*N*V*H = 9.46 TFLOP
each, 18.9 TFLOP in all (a third product, another 9.46, only when the head is trained), 24 ms at
790 TFLOP/s. The logits are 1.54e9 elements; the per-row pass reads each twice and writes it once
(6 bytes a bf16 element) and the two products write and read it once more (4 bytes): 15.4 GB,
5.1 ms at 3.0 TB/s, a cost that only a matmul with the softmax in its epilogue would remove. The
weight (788 MB) is read by two products per chunk: 12 chunks of 1,024 rows read 18.9 GB, under the
products' own time because a 1,024-row product does 1,024 flops per weight byte, well above the
H100's 263 flops-per-byte ridge (790 TFLOP/s over 3.0 TB/s).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from hizli.kernels._triton_utils import FP_FUSION, lazy_jit, next_power_of_2, tl
from hizli.kernels.dispatch import use_triton

# ---------------------------------------------------------------------------------------------
# Triton kernel


@lazy_jit
def _capped(z, softcap, HAS_SOFTCAP: tl.constexpr):
    """(softcapped logits, tanh term) for fp32 z; tanh via exp(-2|x|) so that nothing overflows."""
    if HAS_SOFTCAP:
        x = z / softcap
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(x < 0, -t, t)
        return softcap * t, t
    return z, z


@lazy_jit
def _ce_chunk_kernel(
    logits_ptr,
    targets_ptr,
    loss_ptr,
    n_cols,
    row_stride,
    ignore_index,
    logit_scale,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < n_cols)
    # The target's logit, read before pass 2 overwrites the row in place. Warps run apart: without
    # the barrier before pass 2, a warp that got there early could overwrite the target column
    # before a slower warp (the one that stores the loss, say) had read it.
    zt = tl.load(base + tl.where(valid & in_range, target, 0)).to(tl.float32) * logit_scale
    zt, zt_tanh = _capped(zt, softcap, HAS_SOFTCAP)

    # Pass 1: online max and sum of exponentials over the row, block by block, in fp32.
    m = tl.zeros([], dtype=tl.float32) - float("inf")  # typed scalars: loop-carried values keep a type
    s = tl.zeros([], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32) * logit_scale
        z, z_tanh = _capped(z, softcap, HAS_SOFTCAP)
        z = tl.where(mask, z, -float("inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)

    loss = tl.where(in_range, lse - zt, float("nan"))
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))

    if WRITE_GRAD:
        tl.debug_barrier()  # every warp's reads of the row (zt, pass 1) before any store
        # Pass 2: d loss / d raw logit = (softmax - onehot) * d(capped)/d(scaled) * logit_scale.
        keep = tl.where(valid, 1.0, 0.0)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32) * logit_scale
            z, t = _capped(z, softcap, HAS_SOFTCAP)
            g = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            g = g * (logit_scale * keep)
            tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Per-chunk steps: (logits [C, V], targets [C], loss out [C]) -> loss rows, grad over logits in place

ChunkStep = Callable[..., None]  # (logits, targets, loss, *, ignore_index, logit_scale, softcap, write_grad)

# 4,096 fp32 values per block iteration, 16 per thread with 8 warps: 8 KB of bf16 in flight per
# program, and a 128,256-wide row in 32 iterations per pass.
_CE_BLOCK = 4096
_CE_WARPS = 8


def _chunk_step_triton(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss: torch.Tensor,
    *,
    ignore_index: int,
    logit_scale: float,
    softcap: float | None,
    write_grad: bool,
) -> None:
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    assert logits.stride(1) == 1 and loss.is_contiguous() and targets.is_contiguous()
    block = min(_CE_BLOCK, next_power_of_2(n_cols))
    _ce_chunk_kernel[(n_rows,)](
        logits,
        targets,
        loss,
        n_cols,
        logits.stride(0),
        ignore_index,
        float(logit_scale),
        float(softcap or 1.0),
        HAS_SOFTCAP=softcap is not None,
        WRITE_GRAD=write_grad,
        BLOCK=block,
        num_warps=_CE_WARPS,
        enable_fp_fusion=FP_FUSION,
    )


def _chunk_step_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss: torch.Tensor,
    *,
    ignore_index: int,
    logit_scale: float,
    softcap: float | None,
    write_grad: bool,
) -> None:
    n_cols = logits.shape[1]
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) * logit_scale  # fp64 stays fp64
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = softcap * t
    lse = torch.logsumexp(z, dim=1)
    valid = targets != ignore_index
    in_range = (targets >= 0) & (targets < n_cols)
    index = torch.where(valid & in_range, targets, torch.zeros_like(targets)).long()
    zt = z.gather(1, index[:, None])[:, 0]
    row_loss = torch.where(in_range, lse - zt, torch.full_like(lse, float("nan")))
    loss.copy_(torch.where(valid, row_loss, torch.zeros_like(lse)))
    if write_grad:
        g = torch.exp(z - lse[:, None])
        g.scatter_add_(1, index[:, None], -(valid & in_range).to(g.dtype)[:, None])
        if softcap is not None:
            g *= 1.0 - t * t
        g *= logit_scale
        g *= valid.to(g.dtype)[:, None]
        logits.copy_(g)


# ---------------------------------------------------------------------------------------------
# Chunk size

_CHUNK_BYTES = {"cuda": 256 * 2**20, "cpu": 64 * 2**20}
_ROW_MULTIPLE = 64


def default_chunk_size(n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device | str) -> int:
    """Rows per chunk: one [C, V] logits buffer in the inputs' dtype within a byte budget.

    On CUDA the budget is 256 MiB: at V = 128,256 in bf16 that is 1,046 rows, rounded down to 1,024
    (a multiple of 64 keeps the products on whole tensor-core tiles). The Triton path allocates
    nothing else per chunk. Fewer rows would make the [C, H] x [H, V] product re-read the 788 MB
    weight for too little work: C rows give C flops per weight byte, and below the H100's ridge of
    about 263 (790 TFLOP/s / 3.0 TB/s) the product turns memory-bound. On CPU the reference path adds
    about four fp32 [C, V] temporaries, so its budget is 64 MiB (for SmolLM2's V = 49,152 in fp32:
    341 -> 320 rows, about 0.3 GB in all). The rows are then spread evenly over the chunks, so the
    last chunk is not a sliver: N = 12,000 at most 1,024 per chunk gives 12 chunks of 1,024 or less.

    Args:
        n_rows: N, the number of rows (trained tokens).
        vocab: V.
        dtype: the logits' dtype (the inputs' dtype).
        device: where the chunks are computed.

    Returns:
        The chunk size, between 1 and max(n_rows, 1).
    """
    device_type = torch.device(device).type
    budget = _CHUNK_BYTES.get(device_type, _CHUNK_BYTES["cpu"])
    itemsize = torch.empty((), dtype=dtype).element_size()
    most = max(_ROW_MULTIPLE, budget // max(1, vocab * itemsize) // _ROW_MULTIPLE * _ROW_MULTIPLE)
    if n_rows <= most:
        return max(1, n_rows)
    n_chunks = math.ceil(n_rows / most)
    even = math.ceil(n_rows / n_chunks)
    return min(most, math.ceil(even / _ROW_MULTIPLE) * _ROW_MULTIPLE)


# ---------------------------------------------------------------------------------------------
# autograd (shared by the Triton and reference steps)


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
        chunk_size: int,
        reduction: str,
        logit_scale: float,
        softcap: float | None,
        need_hidden_grad: bool,
        need_weight_grad: bool,
        step: ChunkStep,
    ) -> torch.Tensor:
        n_rows = hidden.shape[0]
        targets = targets.contiguous()
        # fp32 per-row losses (fp64 for fp64 inputs, so the reference can be checked to 1e-12)
        row_loss = torch.empty(n_rows, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        # Accumulated in the weight's dtype by addmm (fp32 accumulation inside each product), as
        # Liger does: an fp32 copy would cost 1.6 GB at V = 128,256, H = 3,072.
        grad_weight = torch.zeros_like(weight) if need_weight_grad else None
        write_grad = need_hidden_grad or need_weight_grad
        for start in range(0, n_rows, chunk_size):
            end = min(start + chunk_size, n_rows)
            h = hidden[start:end]
            logits = h @ weight.t()
            step(
                logits,
                targets[start:end],
                row_loss[start:end],
                ignore_index=ignore_index,
                logit_scale=logit_scale,
                softcap=softcap,
                write_grad=write_grad,
            )
            if grad_hidden is not None:
                torch.mm(logits, weight, out=grad_hidden[start:end])
            if grad_weight is not None:
                grad_weight.addmm_(logits.t(), h)
        loss = row_loss.sum()
        count = None
        if reduction == "mean":
            # A device tensor, never .item(): no host sync inside the step.
            count = (targets != ignore_index).sum().clamp_(min=1).to(loss.dtype)
            loss = loss / count
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_output
        if count is not None:
            scale = scale / count
        # Always multiply (a 74 MB pass at the recipe) rather than test grad_output == 1 on the host.
        dh = grad_hidden * scale.to(grad_hidden.dtype) if grad_hidden is not None else None
        dw = grad_weight * scale.to(grad_weight.dtype) if grad_weight is not None else None
        return dh, dw, None, None, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Reference and public op


def _prepare(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int | None,
    reduction: str,
    softcap: float | None,
) -> int:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"fused_linear_cross_entropy: hidden must be [N, H] and weight [V, H], got "
            f"{tuple(hidden.shape)} and {tuple(weight.shape)}; flatten the batch first "
            "(hidden.reshape(-1, H)) and keep only the rows you train"
        )
    if targets.shape != (hidden.shape[0],) or targets.dtype.is_floating_point:
        raise ValueError(
            f"fused_linear_cross_entropy: targets must be integer [N] = [{hidden.shape[0]}], "
            f"got {targets.dtype} {tuple(targets.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"fused_linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}: "
            "cast hidden to the head's dtype"
        )
    if reduction not in ("sum", "mean"):
        raise ValueError(
            f"fused_linear_cross_entropy: reduction={reduction!r}: use 'sum' (then divide by "
            "the step's trained-token count) or 'mean'; per-row losses are not kept"
        )
    if softcap is not None and not softcap > 0:
        raise ValueError(f"fused_linear_cross_entropy: softcap={softcap}: use a positive cap or None")
    if chunk_size is None:
        return default_chunk_size(hidden.shape[0], weight.shape[0], hidden.dtype, hidden.device)
    if chunk_size < 1:
        raise ValueError(f"fused_linear_cross_entropy: chunk_size={chunk_size}: use a positive row count or None")
    return int(chunk_size)


def _run(
    step: ChunkStep,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int,
    chunk_size: int | None,
    reduction: str,
    logit_scale: float,
    softcap: float | None,
) -> torch.Tensor:
    chunk = _prepare(hidden, weight, targets, chunk_size, reduction, softcap)
    grad_on = torch.is_grad_enabled()
    # The products write into preallocated buffers of the inputs' dtype; under an autocast region
    # (the trainer's bf16/fp16) they would be recast, so the op runs in the dtype it was given.
    with torch.autocast(hidden.device.type, enabled=False):
        return _FusedLinearCE.apply(
            hidden,
            weight,
            targets,
            int(ignore_index),
            chunk,
            reduction,
            float(logit_scale),
            None if softcap is None else float(softcap),
            grad_on and hidden.requires_grad,
            grad_on and weight.requires_grad,
            step,
        )


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    reduction: str = "sum",
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """The same chunked algorithm with the per-row pass in plain torch (the CPU path).

    Arguments and result as :func:`fused_linear_cross_entropy`.
    """
    return _run(
        _chunk_step_reference,
        hidden,
        weight,
        targets,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        reduction=reduction,
        logit_scale=logit_scale,
        softcap=softcap,
    )


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    reduction: str = "sum",
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets``, chunk by chunk, logits never whole.

    Equal (up to rounding) to ``F.cross_entropy((hidden @ weight.T).float() * logit_scale, targets,
    ignore_index=ignore_index, reduction=reduction)`` (with the softcap applied to the scaled logits).
    The gradients wrt ``hidden`` (and ``weight`` when it requires grad) are computed in the forward
    and kept: budget one ``[N, H]`` tensor, plus ``[V, H]`` for a trained head.

    Args:
        hidden: ``[N, H]`` final hidden states (after the final norm), only the rows to train.
        weight: ``[V, H]`` language-model head, same dtype as ``hidden``.
        targets: ``[N]`` integer token ids; ``ignore_index`` rows add nothing.
        ignore_index: target value of rows to skip.
        chunk_size: rows per chunk; ``None`` picks one from N, V and memory (:func:`default_chunk_size`).
        reduction: ``"sum"`` (divide by the optimizer step's trained-token count yourself, which makes
            gradient accumulation exact) or ``"mean"`` over the non-ignored rows.
        logit_scale: multiplies the logits before the softmax.
        softcap: if set, logits become ``softcap * tanh(logits / softcap)`` (after the scale).

    Returns:
        A 0-d fp32 tensor (fp64 for fp64 inputs).
    """
    step = (
        _chunk_step_triton
        if use_triton("fused_linear_cross_entropy", hidden, weight, targets)
        else _chunk_step_reference
    )
    return _run(
        step,
        hidden,
        weight,
        targets,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        reduction=reduction,
        logit_scale=logit_scale,
        softcap=softcap,
    )
