"""SwiGLU: the reference against LlamaMLP's act_fn(gate) * up (CPU), the Triton kernel against float64."""

from __future__ import annotations

import pytest
import torch

from hizli.kernels.swiglu import swiglu, swiglu_reference

# Relative error against a float64 evaluation of the same inputs.
# fp32: a sigmoid and a few products in fp32 (~1e-7; GPU exp is within 2 ulp): 1e-5.
# bf16 on CUDA: fp32 inside, one rounding of each output (~1.1e-3 RMS): 4e-3.
# bf16 in the interpreter: fp32 -> bf16 truncates there (Triton 3.6), about twice the error
#   (measured 3.1e-3 to 3.7e-3): 1e-2.
TOL = {
    ("cuda", torch.float32): 1e-5,
    ("cuda", torch.bfloat16): 4e-3,
    ("cpu", torch.float32): 1e-5,
    ("cpu", torch.bfloat16): 1e-2,
}
SHAPES = [(37, 96), (2, 7, 101), (3, 2049)]  # 2,049 columns: one full 2,048 block and a 1-wide tail


def _llama_act(dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = LlamaConfig(
        hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=2, hidden_act="silu"
    )
    return LlamaMLP(config).to(dtype).act_fn


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_llama_mlp(dtype, shape):
    torch.manual_seed(0)
    act = _llama_act(dtype)
    g0, u0 = torch.randn(shape, dtype=dtype) * 3, torch.randn(shape, dtype=dtype)
    dy = torch.randn(shape, dtype=dtype)
    ga, ua = g0.clone().requires_grad_(), u0.clone().requires_grad_()
    (act(ga) * ua).backward(dy)
    gb, ub = g0.clone().requires_grad_(), u0.clone().requires_grad_()
    y = swiglu_reference(gb, ub)
    y.backward(dy)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, act(g0) * u0, **tol)
    torch.testing.assert_close(gb.grad, ga.grad, **tol)
    torch.testing.assert_close(ub.grad, ua.grad, **tol)


def test_mismatched_inputs_are_a_value_error():
    with pytest.raises(ValueError, match="same shape"):
        swiglu(torch.randn(3, 4), torch.randn(3, 5))


def _truth(g, u, dy):
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    y = swiglu_reference(g64, u64)
    y.backward(dy.double())
    return y, g64.grad, u64.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_forward_and_grads(kernel_device, rel, dtype, shape):
    torch.manual_seed(1)
    g = (torch.randn(shape, device=kernel_device) * 3).to(dtype).requires_grad_()
    u = torch.randn(shape, device=kernel_device).to(dtype).requires_grad_()
    y = swiglu(g, u)
    dy = torch.randn_like(y)
    y.backward(dy)
    tol = TOL[(kernel_device.type, dtype)]
    assert y.dtype == dtype and g.grad.dtype == dtype
    for got, want in zip((y, g.grad, u.grad), _truth(g, u, dy)):
        assert rel(got, want) < tol


def test_kernel_halves_of_a_fused_projection(kernel_device, rel):
    """gate and up as the two halves of one [N, 2I] output: strided rows, no copy needed."""
    torch.manual_seed(2)
    gu = (torch.randn(5, 9, 2 * 37, device=kernel_device) * 2).requires_grad_()
    g, u = gu[..., :37], gu[..., 37:]
    y = swiglu(g, u)
    dy = torch.randn_like(y)
    y.backward(dy)
    want = _truth(g, u, dy)
    assert rel(y, want[0]) < 1e-5
    assert rel(gu.grad[..., :37], want[1]) < 1e-5
    assert rel(gu.grad[..., 37:], want[2]) < 1e-5
