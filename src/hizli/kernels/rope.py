"""Rotary position embedding on q and k, as one fused Triton kernel (forward + backward) and a reference.

Signature and semantics of transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``:
``x_embed = x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)``. ``cos``/``sin``
are ``[B, T, D]`` rows gathered by ``position_ids``, as the model's rotary module produces them, so
per-sequence positions (``position_ids`` restarting at 0 for each sequence of a padding-free row) need
nothing special here: every token brings its own angle. ``cos``/``sin`` are constants (the rotary
module computes them under ``no_grad``); they get no gradient.

Out of place: the outputs are new tensors (the inputs are left as they were, which is safe under
autograd, activation checkpointing and views of a fused QKV projection). They are laid out
token-major, ``[B, T, H, D]`` in memory, whatever the input's layout: with ``unsqueeze_dim=1`` the
returned ``[B, H, T, D]`` tensors are the same transposed views transformers' own code produces from
``q_proj(x).view(B, T, H, D).transpose(1, 2)``, and ``out.transpose(1, 2)[0]`` is the ``[T, H, D]``
layout varlen attention takes, for free. Only the inputs' last dimension must be contiguous.

In place, outside autograd: ``rope_in_place`` rotates q and k where they lie (or, with
``backward=True``, applies the transpose to their gradients). The fused q/k/v projection uses it on
its own output buffer, so attention keeps views of that buffer instead of new rotated tensors.

Bytes at the recipe shape (N = 12,000 tokens, 24 q + 8 kv heads of 128, bf16): the forward reads and
writes q and k (2 x 98 MB) plus cos and sin (6 MB); the backward the same: about 0.41 GB, 136 us at
3.0 TB/s; 3 flops per element.

Kernel design: one program per token handles every q and k head of it, so each token's cos/sin row is
loaded once and reused by all 32 heads (Unsloth's and Liger's RoPE kernels taught the shape of the
problem; this code is written from the formula). The backward is the forward with ``sin`` halves
swapped and negated, so both directions share the kernel.
"""

from __future__ import annotations

import torch

from hizli.kernels._triton_utils import FP_FUSION, lazy_jit, next_power_of_2, tl
from hizli.kernels.dispatch import use_triton

# ---------------------------------------------------------------------------------------------
# Triton kernel


@lazy_jit
def _rope_heads(
    x_ptr,
    o_ptr,
    x_base,
    o_base,
    x_sh,
    o_sh,
    n_heads,
    c1,
    c2,
    s1,
    s2,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < n_heads) & (d < HALF)
    xp = x_ptr + x_base + h * x_sh + d
    op = o_ptr + o_base + h * o_sh + d
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, one half at a time
    tl.store(op, (x1 * c1 - x2 * s1).to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(op + HALF, (x2 * c2 + x1 * s2).to(o_ptr.dtype.element_ty), mask=mask)


@lazy_jit(do_not_specialize=("seq_len",))  # follows the batch's token count
def _rope_kernel(
    q_ptr,
    k_ptr,
    qo_ptr,
    ko_ptr,
    cos_ptr,
    sin_ptr,
    seq_len,
    n_qh,
    n_kh,
    q_sb,
    q_st,
    q_sh,
    k_sb,
    k_st,
    k_sh,
    qo_sb,
    qo_st,
    qo_sh,
    ko_sb,
    ko_st,
    ko_sh,
    c_sb,
    c_st,
    s_sb,
    s_st,
    HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    t = pid % seq_len
    d = tl.arange(0, BLOCK_D)[None, :]
    dm = d < HALF
    c_row = cos_ptr + b * c_sb + t * c_st
    s_row = sin_ptr + b * s_sb + t * s_st
    c1 = tl.load(c_row + d, mask=dm, other=0.0).to(tl.float32)
    c2 = tl.load(c_row + HALF + d, mask=dm, other=0.0).to(tl.float32)
    s1 = tl.load(s_row + d, mask=dm, other=0.0).to(tl.float32)
    s2 = tl.load(s_row + HALF + d, mask=dm, other=0.0).to(tl.float32)
    if BACKWARD:
        # The transpose of [[c1, -s1], [s2, c2]] is [[c1, s2], [-s1, c2]]: the forward with
        # (s1, s2) -> (-s2, -s1).
        s1, s2 = -s2, -s1
    _rope_heads(
        q_ptr,
        qo_ptr,
        b * q_sb + t * q_st,
        b * qo_sb + t * qo_st,
        q_sh,
        qo_sh,
        n_qh,
        c1,
        c2,
        s1,
        s2,
        HALF,
        BLOCK_QH,
        BLOCK_D,
    )
    _rope_heads(
        k_ptr,
        ko_ptr,
        b * k_sb + t * k_st,
        b * ko_sb + t * ko_st,
        k_sh,
        ko_sh,
        n_kh,
        c1,
        c2,
        s1,
        s2,
        HALF,
        BLOCK_KH,
        BLOCK_D,
    )


# ---------------------------------------------------------------------------------------------
# Launcher (canonical layout: q, k as [B, H, T, D] views; cos, sin as [B or 1, T, D])


def _token_major_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised [B, H, T, D] tensor stored as [B, T, H, D]."""
    b, h, t, d = x.shape
    return torch.empty((b, t, h, d), dtype=x.dtype, device=x.device).transpose(1, 2)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _rope_launch(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool, in_place: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, cos, sin = _unit_last(q), _unit_last(k), _unit_last(cos), _unit_last(sin)
    batch, n_qh, seq_len, dim = q.shape
    n_kh = k.shape[1]
    # In place is safe: each program reads both halves of its token's heads before writing them.
    qo, ko = (q, k) if in_place else (_token_major_like(q), _token_major_like(k))
    if batch * seq_len == 0:
        return qo, ko
    half = dim // 2
    # A [1, T, D] cos broadcast over the batch reads the same row for every b (stride 0).
    c_sb = cos.stride(0) if cos.shape[0] == batch else 0
    s_sb = sin.stride(0) if sin.shape[0] == batch else 0
    block_qh, block_kh, block_d = next_power_of_2(n_qh), next_power_of_2(n_kh), next_power_of_2(half)
    # ~4 elements per thread per half for the q heads (24 x 64 -> 2,048 -> 4 warps at the recipe).
    warps = max(1, min(8, block_qh * block_d // 512))
    _rope_kernel[(batch * seq_len,)](
        q,
        k,
        qo,
        ko,
        cos,
        sin,
        seq_len,
        n_qh,
        n_kh,
        q.stride(0),
        q.stride(2),
        q.stride(1),
        k.stride(0),
        k.stride(2),
        k.stride(1),
        qo.stride(0),
        qo.stride(2),
        qo.stride(1),
        ko.stride(0),
        ko.stride(2),
        ko.stride(1),
        c_sb,
        cos.stride(1),
        s_sb,
        sin.stride(1),
        HALF=half,
        BLOCK_QH=block_qh,
        BLOCK_KH=block_kh,
        BLOCK_D=block_d,
        BACKWARD=backward,
        num_warps=warps,
        enable_fp_fusion=FP_FUSION,
    )
    return qo, ko


# ---------------------------------------------------------------------------------------------
# autograd


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        return _rope_launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        # autograd materialises a missing grad (only q_embed or only k_embed used) as zeros.
        gq, gk = _rope_launch(dq, dk, cos, sin, backward=True)
        return gq, gk, None, None


# ---------------------------------------------------------------------------------------------
# Reference and public op


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int) -> None:
    if unsqueeze_dim not in (1, 2):
        raise ValueError(
            f"rope: unsqueeze_dim={unsqueeze_dim}: use 1 for q, k laid out [B, H, T, D] or 2 for [B, T, H, D]"
        )
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"rope: q and k must be 4-d ([B, H, T, D] or [B, T, H, D]), got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    t_dim = 2 if unsqueeze_dim == 1 else 1
    b, t, d = q.shape[0], q.shape[t_dim], q.shape[-1]
    if d % 2:
        raise ValueError(f"rope: head dim {d} is odd; rotary embedding needs an even head dim")
    if k.shape[0] != b or k.shape[t_dim] != t or k.shape[-1] != d:
        raise ValueError(f"rope: k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, tokens or head dim")
    for name, c in (("cos", cos), ("sin", sin)):
        if c.dim() != 3 or c.shape[0] not in (1, b) or c.shape[1] != t or c.shape[2] != d:
            raise ValueError(
                f"rope: {name} must be [B, T, D] = [{b} (or 1), {t}, {d}] as the rotary "
                f"module returns it, got {tuple(c.shape)}"
            )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch rotary embedding, the same arithmetic as transformers' ``apply_rotary_pos_emb``;
    arguments and result as for :func:`rope`."""
    _check(q, k, cos, sin, unsqueeze_dim)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q and k: one fused Triton kernel on CUDA, the reference elsewhere.

    A drop-in for transformers' ``apply_rotary_pos_emb`` (same arguments, same result up to
    rounding: the kernel computes in fp32 and rounds once). Out of place; see the module docstring
    for the output layout.

    Args:
        q: ``[B, Hq, T, D]`` (``unsqueeze_dim=1``) or ``[B, T, Hq, D]`` (``unsqueeze_dim=2``).
        k: like ``q`` with ``Hkv`` heads.
        cos: ``[B, T, D]`` (or ``[1, T, D]``), the rotary module's cosines at each token's position.
        sin: like ``cos``.
        unsqueeze_dim: where the head dimension of ``q``/``k`` is (1 or 2).

    Returns:
        ``(q_embed, k_embed)``, shaped and typed like ``q`` and ``k``.
    """
    _check(q, k, cos, sin, unsqueeze_dim)
    if (cos.requires_grad or sin.requires_grad) and torch.is_grad_enabled():
        # Only the reference differentiates through cos/sin (no model needs it).
        return rope_reference(q, k, cos, sin, unsqueeze_dim)
    if not use_triton("rope", q, k, cos, sin):
        return rope_reference(q, k, cos, sin, unsqueeze_dim)
    if unsqueeze_dim == 2:
        qe, ke = _RopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return qe.transpose(1, 2), ke.transpose(1, 2)
    return _RopeFunction.apply(q, k, cos, sin)


apply_rotary_pos_emb = rope


def rope_in_place(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backward: bool = False
) -> None:
    """Rotate q and k where they are, outside autograd (for a fused projection that owns its output).

    ``backward=True`` applies the transpose of the rotation: the gradient with respect to the
    unrotated q and k, given the gradient with respect to the rotated ones. Layout ``[B, T, H, D]``
    (``unsqueeze_dim=2``) with a unit-stride last dimension, as views of a projection's output rows.
    """
    _check(q, k, cos, sin, 2)
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rope_in_place: q and k need a unit-stride last dimension")
    if use_triton("rope", q, k, cos, sin):
        _rope_launch(q.transpose(1, 2), k.transpose(1, 2), cos, sin, backward=backward, in_place=True)
        return
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    for x in (q, k):
        if backward:  # the transpose of x c + rotate_half(x) s is g c - rotate_half(g s)
            x.copy_(x * c - _rotate_half(x * s))
        else:
            x.copy_(x * c + _rotate_half(x) * s)
