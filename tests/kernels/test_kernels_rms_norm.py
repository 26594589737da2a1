"""RMSNorm: the reference against transformers' LlamaRMSNorm (CPU), the Triton kernel against float64."""

from __future__ import annotations

import pytest
import torch

from hizli.kernels.rms_norm import rms_norm, rms_norm_reference

# Relative error (‖out - truth‖ / ‖truth‖) allowed against a float64 evaluation of the same inputs.
# fp32: fp32 arithmetic with a reduction over the row; rounding lands near 1e-7, 1e-5 leaves room for
#   GPU rsqrt.approx (2 ulp) and a different summation order.
# bf16 on CUDA: the forward rounds twice (the normalised row to bf16, as Llama does, then the
#   product), the backward once; one round-to-nearest to bf16 is ~1.1e-3 RMS, so 6e-3 is ~3x margin.
# bf16 in the interpreter: its fp32 -> bf16 conversion truncates instead of rounding (seen with Triton
#   3.6: 497 of 1,024 random values differ from torch's rounding), twice the error and biased: 1.5e-2
#   (measured 6.5e-3 forward, 4.0e-3 dx, 4.6e-3 dw at 21 x 72).
TOL = {
    ("cuda", torch.float32): 1e-5,
    ("cuda", torch.bfloat16): 6e-3,
    ("cpu", torch.float32): 1e-5,
    ("cpu", torch.bfloat16): 1.5e-2,
}
SHAPES = [(37, 72), (2, 19, 100), (5, 1, 3)]


def _truth(x: torch.Tensor, w: torch.Tensor, eps: float, dy: torch.Tensor):
    """Forward and grads of the reference in float64 on the same (rounded) inputs."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y = rms_norm_reference(x64, w64, eps)
    y.backward(dy.double())
    return y, x64.grad, w64.grad


# ---------------------------------------------------------------------------------------------
# CPU: reference == transformers


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_llama_rmsnorm(dtype, shape):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    hidden = shape[-1]
    module = LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        module.weight.copy_(1 + 0.3 * torch.randn(hidden, dtype=dtype))
    x = torch.randn(shape, dtype=dtype) * 3
    dy = torch.randn(shape, dtype=dtype)

    xa = x.clone().requires_grad_()
    ya = module(xa)
    ya.backward(dy)
    w = module.weight.detach().clone().requires_grad_()
    xb = x.clone().requires_grad_()
    yb = rms_norm_reference(xb, w, 1e-5)
    yb.backward(dy)
    # Same operations in the same order: equal to the last bit in fp32 and fp64.
    torch.testing.assert_close(yb, ya, rtol=0, atol=0)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)
    torch.testing.assert_close(w.grad, module.weight.grad, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)


def test_reference_keeps_llama_dtype_promotion():
    """fp32 weight on bf16 input gives fp32, as LlamaRMSNorm does."""
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert rms_norm_reference(x, torch.ones(8), 1e-6).dtype == torch.float32
    assert rms_norm_reference(x, torch.ones(8, dtype=torch.bfloat16), 1e-6).dtype == torch.bfloat16


def test_auto_on_cpu_is_the_reference(monkeypatch):
    monkeypatch.setenv("HIZLI_KERNELS", "auto")
    x, w = torch.randn(3, 8), torch.rand(8)
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))


def test_bad_weight_is_a_value_error():
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(3, 8), torch.ones(7))


# ---------------------------------------------------------------------------------------------
# Triton kernel vs float64 (GPU, or CPU through the interpreter)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weight_grad", [True, False])
def test_kernel_forward_and_grads(kernel_device, rel, dtype, shape, weight_grad):
    torch.manual_seed(1)
    tol = TOL[(kernel_device.type, dtype)]
    hidden = shape[-1]
    x = (torch.randn(shape, device=kernel_device) * 2).to(dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(hidden, device=kernel_device)).to(dtype).requires_grad_(weight_grad)
    dy = torch.randn(shape, device=kernel_device).to(dtype)
    y = rms_norm(x, w, 1e-5)
    y.backward(dy)
    y64, dx64, dw64 = _truth(x, w, 1e-5, dy)
    assert y.dtype == dtype and x.grad.dtype == dtype
    assert rel(y, y64) < tol
    assert rel(x.grad, dx64) < tol
    if weight_grad:
        assert w.grad.dtype == dtype and rel(w.grad, dw64) < tol
    else:
        assert w.grad is None


def test_kernel_mixed_dtypes_and_strided_rows(kernel_device, rel):
    """fp32 weight on bf16 rows (output fp32, as Llama), rows taken with a stride (a view)."""
    torch.manual_seed(2)
    base = torch.randn(9, 2, 40, device=kernel_device).to(torch.bfloat16)
    x = base[:, 1, :].requires_grad_()  # row stride 80, not contiguous
    w = (1 + 0.3 * torch.randn(40, device=kernel_device)).requires_grad_()
    y = rms_norm(x, w, 1e-6)
    assert y.dtype == torch.float32
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, dx64, dw64 = _truth(x, w, 1e-6, dy)
    tol = TOL[(kernel_device.type, torch.bfloat16)]
    assert rel(y, y64) < tol and rel(x.grad, dx64) < tol and rel(w.grad, dw64) < tol


@pytest.mark.gpu
def test_kernel_recipe_shape(rel, monkeypatch):
    """Llama-3.2-3B width, enough rows for many programs per SM in the backward's row loop."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setenv("HIZLI_KERNELS", "triton")
    torch.manual_seed(3)
    x = torch.randn(3001, 3072, device="cuda").to(torch.bfloat16).requires_grad_()
    w = (1 + 0.1 * torch.randn(3072, device="cuda")).to(torch.bfloat16).requires_grad_()
    dy = torch.randn_like(x)
    y = rms_norm(x, w, 1e-5)
    y.backward(dy)
    y64, dx64, dw64 = _truth(x, w, 1e-5, dy)
    tol = TOL[("cuda", torch.bfloat16)]
    assert rel(y, y64) < tol and rel(x.grad, dx64) < tol and rel(w.grad, dw64) < tol
