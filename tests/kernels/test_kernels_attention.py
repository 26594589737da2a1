"""Varlen causal attention: the per-sequence reference against one SDPA call with a block-diagonal causal
mask (CPU), every GPU candidate against the reference (GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hizli.kernels.attention import (
    attention_candidates,
    document_block_mask,
    varlen_attention,
    varlen_attention_reference,
)

# Relative error of each GPU candidate against the reference evaluated in fp32 on the same inputs.
# bf16: the fused kernels round the softmax probabilities to bf16 before the PV product and the output
#   once more; flash-attention's own tests allow ~2x the error of a bf16 PyTorch reference. Output
#   1e-2, grads (longer chains: dS, dQ, dK, dV) 2e-2.
# fp32 (flex and sdpa_loop only): products may run in TF32 inside compiled kernels (~3e-4): 1e-3.
TOL = {torch.bfloat16: (1e-2, 2e-2), torch.float32: (1e-3, 1e-3)}
LENGTHS = [5, 1, 9, 0, 3]  # a 1-token sequence and an empty one (repeated boundary)


def _cu(lengths, device="cpu"):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def _qkv(lengths, hq, hkv, d, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    return [torch.randn(t, h, d, generator=g).to(device=device, dtype=dtype).requires_grad_() for h in (hq, hkv, hkv)]


def _block_diagonal_sdpa(q, k, v, lengths, scale=None):
    """One SDPA call over the whole row with an explicit [T, T] block-diagonal causal mask."""
    t = q.shape[0]
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(t)
    mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.transpose(0, 1)


def _forward_backward(fn, q, k, v, do, *args, **kwargs):
    for x in (q, k, v):
        x.grad = None
    out = fn(q, k, v, *args, **kwargs)
    out.backward(do)
    return out.detach().clone(), q.grad.clone(), k.grad.clone(), v.grad.clone()


# ---------------------------------------------------------------------------------------------
# CPU


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_reference_equals_block_diagonal_sdpa(rel, dtype, heads, scale):
    q, k, v = _qkv(LENGTHS, *heads, 16, dtype)
    do = torch.randn_like(q)
    got = _forward_backward(varlen_attention_reference, q, k, v, do, _cu(LENGTHS), max(LENGTHS), scale)
    want = _forward_backward(_block_diagonal_sdpa, q, k, v, do, LENGTHS, scale)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for g, w in zip(got, want):
        assert rel(g, w) < tol


def test_sequences_do_not_see_each_other():
    """Changing one sequence's tokens changes no other sequence's output."""
    q, k, v = (x.detach() for x in _qkv([4, 6], 2, 1, 8, torch.float64))
    before = varlen_attention_reference(q, k, v, _cu([4, 6]), 6)
    k2, v2 = k.clone(), v.clone()
    k2[4:] += 1.0
    v2[4:] -= 2.0
    after = varlen_attention_reference(q, k2, v2, _cu([4, 6]), 6)
    assert torch.equal(before[:4], after[:4]) and not torch.equal(before[4:], after[4:])


def test_dispatch_on_cpu(monkeypatch):
    assert list(attention_candidates("cpu")) == ["sdpa_loop"]
    q, k, v = (x.detach() for x in _qkv([3, 2], 2, 2, 8, torch.float32))
    monkeypatch.delenv("HIZLI_ATTENTION", raising=False)
    torch.testing.assert_close(
        varlen_attention(q, k, v, _cu([3, 2]), 3), varlen_attention_reference(q, k, v, _cu([3, 2]), 3), rtol=0, atol=0
    )
    torch.testing.assert_close(
        varlen_attention(q, k, v, _cu([3, 2]), 0),  # max_seqlen computed
        varlen_attention_reference(q, k, v, _cu([3, 2]), 3),
        rtol=0,
        atol=0,
    )
    with pytest.raises(ValueError, match="unknown implementation"):
        varlen_attention(q, k, v, _cu([3, 2]), 3, impl="nope")
    with pytest.raises(ValueError, match="cannot run here"):
        varlen_attention(q, k, v, _cu([3, 2]), 3, impl="torch_varlen")
    monkeypatch.setenv("HIZLI_ATTENTION", "sdpa_loop")
    varlen_attention(q, k, v, _cu([3, 2]), 3)


def test_user_errors():
    q, k, v = (x.detach() for x in _qkv([3, 2], 3, 2, 8, torch.float32))
    with pytest.raises(ValueError, match="divisible"):
        varlen_attention(q, k, v, _cu([3, 2]), 3)
    q, k, v = (x.detach() for x in _qkv([3, 2], 2, 2, 8, torch.float32))
    with pytest.raises(ValueError, match="int32"):
        varlen_attention(q, k, v, _cu([3, 2]).long(), 3)
    with pytest.raises(ValueError, match="rise from 0"):
        varlen_attention(q, k, v, _cu([3, 1]), 3)


# ---------------------------------------------------------------------------------------------
# GPU: every candidate vs the reference


GPU_LENGTHS = [300, 1, 77, 512, 129, 1000]  # the collator never emits an empty sequence


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)])
def test_gpu_candidates_match_reference(rel, dtype, heads):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    candidates = attention_candidates("cuda", dtype)
    assert "sdpa_loop" in candidates
    cu = _cu(GPU_LENGTHS, "cuda")
    q, k, v = _qkv(GPU_LENGTHS, *heads, 128, dtype, "cuda", seed=1)
    do = torch.randn_like(q)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    want = _forward_backward(varlen_attention_reference, q32, k32, v32, do.float(), cu, max(GPU_LENGTHS))
    tol_out, tol_grad = TOL[dtype]
    failures = []
    for name, fn in candidates.items():
        got = _forward_backward(fn, q, k, v, do, cu, max(GPU_LENGTHS), None)
        errors = [rel(g, w) for g, w in zip(got, want)]
        if not (errors[0] < tol_out and all(e < tol_grad for e in errors[1:])):
            failures.append(f"{name}: out, dq, dk, dv errors {errors}")
        for x in got:
            assert x.dtype == dtype
    assert not failures, failures


@pytest.mark.gpu
def test_gpu_default_choice_and_scale(rel):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cu = _cu(GPU_LENGTHS, "cuda")
    q, k, v = (x.detach() for x in _qkv(GPU_LENGTHS, 6, 2, 64, torch.bfloat16, "cuda", seed=2))
    want = varlen_attention_reference(q.float(), k.float(), v.float(), cu, max(GPU_LENGTHS), 0.05)
    for name in attention_candidates("cuda", torch.bfloat16):
        assert rel(varlen_attention(q, k, v, cu, max(GPU_LENGTHS), 0.05, impl=name), want) < 1e-2, name
    assert rel(varlen_attention(q, k, v, cu, max(GPU_LENGTHS), 0.05), want) < 1e-2


@pytest.mark.gpu
def test_gpu_flex_block_mask_is_cached_per_cu_seqlens():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("torch.nn.attention.flex_attention")
    cu = _cu(GPU_LENGTHS, "cuda")
    total = sum(GPU_LENGTHS)
    first = document_block_mask(cu, total)
    assert document_block_mask(cu, total) is first
    assert document_block_mask(cu.clone(), total) is not first


@pytest.mark.gpu
def test_gpu_torch_varlen_keeps_kv_heads_unrepeated():
    """GQA goes to the flash kernel as it is: what backward keeps holds k and v with their own heads,
    not copies repeated to the query heads (12 kB a token at the 3B shape, in every recomputed layer)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if "torch_varlen" not in attention_candidates("cuda", torch.bfloat16):
        pytest.skip("this PyTorch has no varlen_attn")
    cu = _cu(GPU_LENGTHS, "cuda")
    q, k, v = _qkv(GPU_LENGTHS, 8, 2, 128, torch.bfloat16, "cuda", seed=3)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = varlen_attention(q, k, v, cu, max(GPU_LENGTHS), impl="torch_varlen")
    out.sum().backward()
    assert saved.count(tuple(k.shape)) == 2, saved  # k and v, unrepeated
    assert saved.count(tuple(q.shape)) == 2, saved  # q and the output
    assert k.grad.shape == k.shape and v.grad.shape == v.shape
