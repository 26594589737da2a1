"""RoPE: the reference against transformers' apply_rotary_pos_emb (CPU), the Triton kernel against float64."""

from __future__ import annotations

import pytest
import torch

from hizli.kernels.rope import apply_rotary_pos_emb, rope, rope_in_place, rope_reference

# Relative error against a float64 evaluation of the same inputs.
# fp32: two products and a sum per element in fp32, ~1e-7; 1e-5 is generous but stays far under
#   anything a wrong index would give (~1).
# bf16 on CUDA: the kernel computes in fp32 and rounds once (~1.1e-3 RMS for one round-to-nearest):
#   4e-3.
# bf16 in the interpreter: its fp32 -> bf16 conversion truncates (Triton 3.6), about twice the error
#   (measured 3.1e-3 to 3.6e-3): 1e-2.
TOL = {
    ("cuda", torch.float32): 1e-5,
    ("cuda", torch.bfloat16): 4e-3,
    ("cpu", torch.float32): 1e-5,
    ("cpu", torch.bfloat16): 1e-2,
}
# (batch, tokens, q heads, kv heads, head dim): odd token counts, heads that are not powers of two,
# a head dim whose half (12) is not a power of two either.
SHAPES = [(1, 13, 6, 2, 24), (2, 5, 3, 3, 16), (1, 7, 24, 8, 128)]


def _rotary(dim: int, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin [B, T, D] from transformers' own rotary module at these positions."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=dim * 4, num_attention_heads=4, head_dim=dim, rope_theta=500000.0, max_position_embeddings=4096
    )
    module = LlamaRotaryEmbedding(config)
    probe = torch.empty(1, dtype=dtype, device=positions.device)
    return module.to(positions.device)(probe, positions)


def _restarting_positions(lengths: list[int], device="cpu") -> torch.Tensor:
    """position_ids of a padding-free row: 0..L-1 for each sequence, end to end, as [1, T]."""
    return torch.cat([torch.arange(n, device=device) for n in lengths])[None]


def _inputs(shape, dtype, device, unsqueeze_dim=1, generator_seed=0):
    torch.manual_seed(generator_seed)
    b, t, hq, hk, d = shape
    q = torch.randn(b, t, hq, d, device=device).to(dtype)
    k = torch.randn(b, t, hk, d, device=device).to(dtype)
    if unsqueeze_dim == 1:  # [B, H, T, D] views, the layout transformers passes
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    lengths = [t - t // 3, t // 3] if t > 2 else [t]
    positions = _restarting_positions([n for n in lengths if n], device).expand(b, -1)
    cos, sin = _rotary(d, positions, dtype)
    return q, k, cos, sin


# ---------------------------------------------------------------------------------------------
# CPU: reference == transformers


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_reference_matches_transformers(dtype, shape, unsqueeze_dim):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_rope

    q, k, cos, sin = _inputs(shape, dtype, "cpu", unsqueeze_dim)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    qa, ka = q.clone().requires_grad_(), k.clone().requires_grad_()
    ya = hf_rope(qa, ka, cos, sin, unsqueeze_dim=unsqueeze_dim)
    ((ya[0] * gq).sum() + (ya[1] * gk).sum()).backward()
    qb, kb = q.clone().requires_grad_(), k.clone().requires_grad_()
    yb = rope_reference(qb, kb, cos, sin, unsqueeze_dim)
    ((yb[0] * gq).sum() + (yb[1] * gk).sum()).backward()
    for got, want in ((yb[0], ya[0]), (yb[1], ya[1]), (qb.grad, qa.grad), (kb.grad, ka.grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_restarting_positions_equal_separate_sequences():
    """A padding-free row with per-sequence positions rotates each sequence as if it were alone."""
    lengths = [5, 9, 3]
    hq, hk, d = 4, 2, 16
    q = torch.randn(1, hq, sum(lengths), d, dtype=torch.float64)
    k = torch.randn(1, hk, sum(lengths), d, dtype=torch.float64)
    cos, sin = _rotary(d, _restarting_positions(lengths), torch.float64)
    row_q, row_k = rope_reference(q, k, cos, sin)
    start = 0
    for n in lengths:
        c, s = _rotary(d, torch.arange(n)[None], torch.float64)
        sq, sk = rope_reference(q[:, :, start : start + n], k[:, :, start : start + n], c, s)
        torch.testing.assert_close(row_q[:, :, start : start + n], sq, rtol=0, atol=0)
        torch.testing.assert_close(row_k[:, :, start : start + n], sk, rtol=0, atol=0)
        start += n


def test_alias_and_bad_shapes():
    assert apply_rotary_pos_emb is rope
    q, k, cos, sin = _inputs(SHAPES[0], torch.float32, "cpu")
    with pytest.raises(ValueError, match="cos"):
        rope(q, k, cos[:, :-1], sin)
    with pytest.raises(ValueError, match="unsqueeze_dim"):
        rope(q, k, cos, sin, unsqueeze_dim=3)
    with pytest.raises(ValueError, match="odd"):
        rope(q[..., :-1], k[..., :-1], cos[..., :-1], sin[..., :-1])


# ---------------------------------------------------------------------------------------------
# Triton kernel vs float64 (GPU, or CPU through the interpreter)


def _truth(q, k, cos, sin, gq, gk, unsqueeze_dim):
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    y = rope_reference(q64, k64, cos.double(), sin.double(), unsqueeze_dim)
    ((y[0] * gq.double()).sum() + (y[1] * gk.double()).sum()).backward()
    return y[0], y[1], q64.grad, k64.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_kernel_forward_and_grads(kernel_device, rel, dtype, shape, unsqueeze_dim):
    q, k, cos, sin = _inputs(shape, dtype, kernel_device, unsqueeze_dim, generator_seed=1)
    q.requires_grad_()
    k.requires_grad_()
    qe, ke = rope(q, k, cos, sin, unsqueeze_dim)
    assert qe.shape == q.shape and ke.shape == k.shape and qe.dtype == dtype
    gq, gk = torch.randn_like(qe), torch.randn_like(ke)
    ((qe * gq).sum() + (ke * gk).sum()).backward()
    tol = TOL[(kernel_device.type, dtype)]
    for got, want in zip((qe, ke, q.grad, k.grad), _truth(q, k, cos, sin, gq, gk, unsqueeze_dim)):
        assert rel(got, want) < tol


def test_kernel_strided_inputs_and_broadcast_cos(kernel_device, rel):
    """q and k as slices of one fused QKV output (not dense), cos/sin [1, T, D] broadcast over B."""
    torch.manual_seed(2)
    b, t, hq, hk, d = 2, 11, 6, 2, 32
    qkv = torch.randn(b, t, (hq + 2 * hk) * d, device=kernel_device)
    q = qkv[..., : hq * d].view(b, t, hq, d).transpose(1, 2).requires_grad_()
    k = qkv[..., hq * d : (hq + hk) * d].view(b, t, hk, d).transpose(1, 2).requires_grad_()
    cos, sin = _rotary(d, torch.arange(t, device=kernel_device)[None], torch.float32)
    qe, ke = rope(q, k, cos, sin)
    gq, gk = torch.randn_like(qe), torch.randn_like(ke)
    ((qe * gq).sum() + (ke * gk).sum()).backward()
    for got, want in zip((qe, ke, q.grad, k.grad), _truth(q, k, cos, sin, gq, gk, 1)):
        assert rel(got, want) < TOL[(kernel_device.type, torch.float32)]


def test_kernel_only_q_used(kernel_device, rel):
    """A missing grad for k_embed is taken as zeros."""
    q, k, cos, sin = _inputs(SHAPES[0], torch.float32, kernel_device, generator_seed=3)
    q.requires_grad_()
    k.requires_grad_()
    qe, _ = rope(q, k, cos, sin)
    gq = torch.randn_like(qe)
    (qe * gq).sum().backward()
    want = _truth(q, k, cos, sin, gq, torch.zeros_like(k), 1)
    assert rel(q.grad, want[2]) < 1e-5
    assert torch.count_nonzero(k.grad) == 0


# ---------------------------------------------------------------------------------------------
# In place (the fused q/k/v projection rotates its own output buffer)


def _qkv_slices(b, t, hq, hk, d, device, dtype, seed):
    torch.manual_seed(seed)
    qkv = torch.randn(b * t, (hq + 2 * hk) * d, device=device).to(dtype)
    q = qkv[:, : hq * d].view(b, t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(b, t, hk, d)
    return qkv, q, k


def _check_in_place(device, dtype, tol, rel):
    b, t, hq, hk, d = 2, 9, 6, 2, 32
    qkv, q, k = _qkv_slices(b, t, hq, hk, d, device, dtype, seed=4)
    before = qkv.clone()
    positions = _restarting_positions([6, 3], device).expand(b, -1)
    cos, sin = _rotary(d, positions, dtype)
    want_q, want_k = rope_reference(q.double(), k.double(), cos.double(), sin.double(), unsqueeze_dim=2)
    rope_in_place(q, k, cos, sin)
    assert rel(q, want_q) < tol and rel(k, want_k) < tol
    assert torch.equal(qkv[:, (hq + hk) * d :], before[:, (hq + hk) * d :])  # v untouched
    # backward=True is the transpose: <rope(x), g> == <x, rope^T(g)> for any x, g
    x_q, x_k = torch.randn(b, t, hq, d, dtype=torch.float64), torch.randn(b, t, hk, d, dtype=torch.float64)
    rx_q, rx_k = rope_reference(x_q, x_k, cos.double().cpu(), sin.double().cpu(), unsqueeze_dim=2)
    _, gq, gk = _qkv_slices(b, t, hq, hk, d, device, dtype, seed=5)
    g64 = (gq.double().cpu(), gk.double().cpu())
    rope_in_place(gq, gk, cos, sin, backward=True)
    lhs = (rx_q * g64[0]).sum() + (rx_k * g64[1]).sum()
    rhs = (x_q * gq.double().cpu()).sum() + (x_k * gk.double().cpu()).sum()
    assert abs(lhs - rhs) <= 20 * tol * (x_q.norm() * g64[0].norm() + x_k.norm() * g64[1].norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_reference(rel, dtype):
    _check_in_place(torch.device("cpu"), dtype, TOL[("cpu", dtype)], rel)


def test_in_place_kernel(kernel_device, rel):
    for dtype in (torch.float32, torch.bfloat16):
        _check_in_place(kernel_device, dtype, TOL[(kernel_device.type, dtype)], rel)


def test_in_place_needs_unit_stride():
    q = torch.randn(1, 4, 2, 16).transpose(-1, -2).contiguous().transpose(-1, -2)
    cos, sin = torch.ones(1, 4, 16), torch.zeros(1, 4, 16)
    with pytest.raises(ValueError, match="unit-stride"):
        rope_in_place(q, q.clone(), cos, sin)
