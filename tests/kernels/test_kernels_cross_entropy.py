"""Fused linear cross-entropy: the chunked reference against F.cross_entropy over full logits (CPU), the
Triton per-row pass against float64 (GPU, interpreter)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hizli.kernels.cross_entropy import (
    default_chunk_size,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)

# Relative error against F.cross_entropy in float64 over full logits made from the same inputs.
# fp32: products and log-sum-exp in fp32 (cuBLAS fp32 without TF32, torch's default): ~1e-7 for the
#   loss, ~3e-7 for the grads: 1e-5.
# bf16 on CUDA: the logits are rounded to bf16 by the product (as lm_head does in transformers), the
#   logit gradient is rounded to bf16 before the second product, which rounds again: the grads carry
#   ~3 roundings (measured 2.7e-3 to 3.0e-3 for the reference on CPU): 1e-2. The loss is a sum of
#   per-row terms whose rounding errors average out (measured 2e-5 to 4e-5): 1e-3.
# bf16 in the interpreter: its fp32 -> bf16 conversion truncates (Triton 3.6): grads measured 3.8e-3 to
#   4.5e-3, same 1e-2 bound.
TOL = {  # (device, dtype) -> (loss, grads)
    ("cuda", torch.float32): (1e-5, 1e-5),
    ("cuda", torch.bfloat16): (1e-3, 1e-2),
    ("cpu", torch.float32): (1e-5, 1e-5),
    ("cpu", torch.bfloat16): (1e-3, 1e-2),
}
OPTIONS = [  # keyword arguments beyond the defaults
    {},
    {"reduction": "mean"},
    {"logit_scale": 0.7, "softcap": 3.0},
    {"reduction": "mean", "softcap": 30.0, "chunk_size": 1000},
]


def _data(n, h, v, dtype, device, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(v, h, generator=g) * (2.0 / math.sqrt(h))).to(device=device, dtype=dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        targets[::ignore_every] = -100
    return hidden, weight, targets.to(device)


def _truth(hidden, weight, targets, weight_grad=True, scale=1.0, **kw):
    """F.cross_entropy over full float64 logits; returns loss, grad hidden, grad weight (or None)."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_(weight_grad)
    z = (h @ w.t()) * kw.get("logit_scale", 1.0)
    if kw.get("softcap") is not None:
        z = kw["softcap"] * torch.tanh(z / kw["softcap"])
    loss = F.cross_entropy(z, targets, ignore_index=-100, reduction=kw.get("reduction", "sum"))
    (loss * scale).backward()
    return loss, h.grad, w.grad


def _run(fn, hidden, weight, targets, weight_grad=True, scale=1.0, **kw):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_(weight_grad)
    loss = fn(h, w, targets, **kw)
    (loss * scale).backward()
    return loss, h.grad, w.grad


# ---------------------------------------------------------------------------------------------
# CPU: chunked reference == F.cross_entropy over full logits


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_reference_matches_full_cross_entropy(rel, dtype, options, chunk_size):
    hidden, weight, targets = _data(37, 72, 1001, dtype, "cpu")
    kw = {"chunk_size": chunk_size, **options}
    got = _run(fused_linear_cross_entropy_reference, hidden, weight, targets, scale=1.7, **kw)
    want = _truth(hidden, weight, targets, scale=1.7, **kw)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert got[0].dtype == dtype
    for g, w in zip(got, want):
        assert rel(g, w) < tol


def test_reference_frozen_head_and_no_grad(rel):
    hidden, weight, targets = _data(37, 72, 1001, torch.float64, "cpu")
    loss, gh, gw = _run(fused_linear_cross_entropy_reference, hidden, weight, targets, weight_grad=False, chunk_size=10)
    want = _truth(hidden, weight, targets, weight_grad=False)
    assert gw is None and rel(loss, want[0]) < 1e-12 and rel(gh, want[1]) < 1e-12
    with torch.no_grad():
        assert rel(fused_linear_cross_entropy_reference(hidden, weight, targets), want[0]) < 1e-12


def test_ignored_rows_and_bad_targets():
    hidden, weight, targets = _data(6, 8, 11, torch.float32, "cpu")
    h = hidden.clone().requires_grad_()
    all_ignored = torch.full((6,), -100)
    loss = fused_linear_cross_entropy_reference(h, weight, all_ignored, reduction="mean")
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(h.grad) == 0
    custom = _data(6, 8, 11, torch.float32, "cpu", ignore_every=0)[2]
    custom[0] = 7
    a = fused_linear_cross_entropy_reference(hidden, weight, custom, ignore_index=7)
    b = fused_linear_cross_entropy_reference(hidden[1:], weight, custom[1:], ignore_index=7)
    torch.testing.assert_close(a, b)
    out_of_range = targets.clone()
    out_of_range[2] = 11
    assert torch.isnan(fused_linear_cross_entropy_reference(hidden, weight, out_of_range))


def test_user_errors():
    hidden, weight, targets = _data(6, 8, 11, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"\[N, H\]"):
        fused_linear_cross_entropy(hidden[None], weight, targets)
    with pytest.raises(ValueError, match="targets"):
        fused_linear_cross_entropy(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="dtype|cast"):
        fused_linear_cross_entropy(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hidden, weight, targets, reduction="none")
    with pytest.raises(ValueError, match="softcap"):
        fused_linear_cross_entropy(hidden, weight, targets, softcap=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(hidden, weight, targets, chunk_size=0)


def test_default_chunk_size():
    # Recipe: V = 128,256 in bf16 on CUDA -> 1,024 rows at most; 12,000 rows in 12 chunks of <= 1,024.
    c = default_chunk_size(12_000, 128_256, torch.bfloat16, "cuda")
    assert c == 1_024 and math.ceil(12_000 / c) == 12
    assert default_chunk_size(2_500, 128_256, torch.bfloat16, "cuda") == 896  # 3 even chunks, not 1024+1024+452
    assert default_chunk_size(300, 128_256, torch.bfloat16, "cuda") == 300  # one chunk
    assert default_chunk_size(5_000, 49_152, torch.float32, "cpu") == 320  # SmolLM2 on CPU
    assert default_chunk_size(0, 1_001, torch.float32, "cpu") == 1
    assert default_chunk_size(10**6, 10**7, torch.float32, "cuda") == 64  # never below one tile


def test_empty_input():
    hidden, weight, _ = _data(0, 8, 11, torch.float32, "cpu")
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and h.grad.shape == (0, 8)


# ---------------------------------------------------------------------------------------------
# Triton per-row pass vs float64 (GPU, or CPU through the interpreter)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("shape", [(37, 72, 1001), (21, 40, 4099)])  # 4,099: one full block and a tail
def test_kernel_forward_and_grads(kernel_device, rel, dtype, options, shape):
    hidden, weight, targets = _data(*shape, dtype, kernel_device, seed=1)
    kw = {"chunk_size": 16, **options}
    loss, gh, gw = _run(fused_linear_cross_entropy, hidden, weight, targets, scale=0.5, **kw)
    want = _truth(hidden, weight, targets, scale=0.5, **kw)
    tol_loss, tol_grad = TOL[(kernel_device.type, dtype)]
    assert gh.dtype == dtype and gw.dtype == dtype
    assert rel(loss, want[0]) < tol_loss
    assert rel(gh, want[1]) < tol_grad
    assert rel(gw, want[2]) < tol_grad


def test_kernel_frozen_head_and_bad_target(kernel_device, rel):
    hidden, weight, targets = _data(19, 24, 300, torch.float32, kernel_device, seed=2)
    loss, gh, gw = _run(fused_linear_cross_entropy, hidden, weight, targets, weight_grad=False)
    want = _truth(hidden, weight, targets, weight_grad=False)
    assert gw is None and rel(loss, want[0]) < 1e-5 and rel(gh, want[1]) < 1e-5
    bad = targets.clone()
    bad[3] = 300
    assert torch.isnan(fused_linear_cross_entropy(hidden, weight, bad))


@pytest.mark.gpu
def test_kernel_recipe_shape(rel, monkeypatch):
    """Llama-3.2-3B head (V = 128,256, H = 3,072) in bf16 over 2,500 rows: 3 chunks of the default size.
    Truth: the same chunked algorithm in fp32 on the bf16 inputs (full fp64 logits would be 2.6 GB)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setenv("HIZLI_KERNELS", "triton")
    hidden, weight, targets = _data(2500, 3072, 128_256, torch.bfloat16, "cuda", seed=3, ignore_every=0)
    loss, gh, _ = _run(fused_linear_cross_entropy, hidden, weight, targets, weight_grad=False)
    want = _run(fused_linear_cross_entropy_reference, hidden.float(), weight.float(), targets, weight_grad=False)
    assert rel(loss, want[0]) < 1e-3
    assert rel(gh, want[1]) < 1e-2
