"""The LoRA SwiGLU MLP: the reference against PEFT's LoRA layers in a Llama MLP (CPU), the fused autograd
function and the reference against a float64 evaluation, forward and every gradient.

The fused function runs on a CPU too (the ``fused`` path forces it; its NF4 dequantization and SwiGLU
then take their PyTorch references), on the GPU with ``-m gpu``, and through Triton's interpreter
with ``TRITON_INTERPRET=1 -m interpret``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers import random_lora_part
from hizli.kernels import lora_mlp as lora_mlp_module
from hizli.kernels._lora import weight_reference
from hizli.kernels.lora_mlp import lora_mlp, lora_mlp_reference
from hizli.kernels.lora_qkv import LoraPart

# Relative error (‖out - truth‖ / ‖truth‖) allowed against float64 on the same (rounded) inputs and
# the same dequantized weights.
# fp32: two chained matmuls over at most 100 terms round near 1e-7; 1e-5 leaves room for another
#   summation order.
# bf16: as for lora_qkv (x and adapters rounded to bf16, each matmul output rounded) plus the SwiGLU
#   product and a second projection: measured up to 7.7e-3 on these shapes; 2e-2 is ~2.5x margin.
TOL = {
    ("cpu", torch.float32): 1e-5,
    ("cpu", torch.bfloat16): 2e-2,
    ("cuda", torch.float32): 1e-5,
    ("cuda", torch.bfloat16): 2e-2,
}
HIDDEN, INTER = 72, 100  # odd sizes: neither a power of two, 100 not a multiple of 16
LEADS = [(1, 37), (2, 19)]  # a padding-free row of 37 tokens; a batch of 2 x 19


def _parts(nf4: bool, device) -> list[LoraPart]:
    """gate, up (ranks 8 and 4, different scalings) and down (scaling 1, lora_alpha == r: no multiply)."""
    return [
        random_lora_part(INTER, HIDDEN, nf4=nf4, device=device, seed=1),
        random_lora_part(INTER, HIDDEN, nf4=nf4, device=device, seed=2, rank=4, scaling=0.5),
        random_lora_part(HIDDEN, INTER, nf4=nf4, device=device, seed=3, scaling=1.0),
    ]


def _run(fn, x, parts, seed=11):
    """Output, and the gradients of x and of every lora_A / lora_B, under a fixed upstream gradient."""
    x = x.detach().clone().requires_grad_()
    for _base, a, b, _s in parts:
        a.grad = b.grad = None
    out = fn(x, parts)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype))
    return out.detach(), x.grad.detach(), [t.grad.detach().clone() for _base, a, b, _s in parts for t in (a, b)]


def _float64_parts(parts):
    """The same projections in float64: the dequantized weight as a plain one, fresh adapter leaves."""
    return [
        LoraPart(
            SimpleNamespace(weight=weight_reference(base, torch.float32).double(), in_features=base.in_features),
            a.detach().double().requires_grad_(),
            b.detach().double().requires_grad_(),
            s,
        )
        for base, a, b, s in parts
    ]


def _check_against_float64(fn, x, parts, tol, rel):
    out, dx, grads = _run(fn, x, parts)
    out64, dx64, grads64 = _run(lora_mlp_reference, x.double(), _float64_parts(parts))
    assert out.dtype == x.dtype and dx.dtype == x.dtype
    assert all(g.dtype == torch.float32 for g in grads)  # the adapters' own dtype
    for what, got, truth in [("out", out, out64), ("dx", dx, dx64)] + [
        (f"grad{i}", g, t) for i, (g, t) in enumerate(zip(grads, grads64))
    ]:
        assert rel(got, truth) < tol, f"{what}: {rel(got, truth):.2e} >= {tol:.0e}"


@pytest.fixture
def fused_on_cpu(monkeypatch):
    monkeypatch.setattr(lora_mlp_module, "use_triton", lambda op, *tensors: True)


# ---------------------------------------------------------------------------------------------
# CPU: reference == the Llama MLP over PEFT's LoRA layers and bitsandbytes NF4


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_reference_matches_peft_mlp(tmp_path, rel, autocast):
    """fp32: the same operations in the same order, equal up to summation order. Under bf16 autocast
    PEFT casts to bf16 at each matmul, the reference before them: both round the same values."""
    pytest.importorskip("bitsandbytes")
    from helpers import one_layer_lora_model
    from hizli.models.fused_lora import group_parts

    dtype = torch.bfloat16 if autocast else torch.float32
    model = one_layer_lora_model(
        tmp_path,
        hidden=HIDDEN,
        inter=INTER + 28,  # down_proj reads rows of 128: see tiny_llama_config on bitsandbytes' AVX512 rows
        heads=3,
        kv_heads=1,
        head_dim=24,
        dtype=dtype,
        device="cpu",
        use_rslora=autocast,
    )
    mlp = model.get_base_model().model.layers[0].mlp
    parts = group_parts(mlp, ("gate_proj", "up_proj", "down_proj"))
    x = torch.randn(2, 13, HIDDEN, generator=torch.Generator().manual_seed(5)).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ours = _run(lora_mlp_reference, x, parts)
        theirs = _run(lambda x_, _parts: mlp(x_), x, parts)  # transformers' LlamaMLP.forward
    for got, want in zip([ours[0], ours[1], *ours[2]], [theirs[0], theirs[1], *theirs[2]]):
        assert got.dtype == want.dtype
        if autocast:  # the same roundings to bf16; inside a bf16 matmul the order may differ
            assert rel(got, want) < 1e-2
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_auto_on_cpu_is_the_reference(monkeypatch):
    monkeypatch.setenv("HIZLI_KERNELS", "auto")
    parts = _parts(nf4=False, device="cpu")
    x = torch.randn(1, 5, HIDDEN)
    with torch.no_grad():
        assert torch.equal(lora_mlp(x, parts), lora_mlp_reference(x, parts))


def test_bad_parts_are_value_errors():
    parts = _parts(nf4=False, device="cpu")
    with pytest.raises(ValueError, match="three"):
        lora_mlp(torch.randn(1, 3, HIDDEN), parts[:2])
    with pytest.raises(ValueError, match="features"):
        lora_mlp(torch.randn(1, 3, HIDDEN + 1), parts)
    with pytest.raises(ValueError, match="must match"):
        lora_mlp(torch.randn(1, 3, HIDDEN), [parts[0], random_lora_part(INTER + 1, HIDDEN, nf4=False), parts[2]])
    with pytest.raises(ValueError, match=r"\(down\)"):
        lora_mlp(torch.randn(1, 3, HIDDEN), [parts[0], parts[1], random_lora_part(HIDDEN, INTER - 1, nf4=False)])


# ---------------------------------------------------------------------------------------------
# Fused function and reference against float64, odd shapes, fp32 and bf16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("nf4", [True, False], ids=["nf4", "16-bit"])
@pytest.mark.parametrize("lead", LEADS, ids=["1x37", "2x19"])
@pytest.mark.parametrize("path", ["fused", "reference"])
def test_cpu_forward_and_grads(request, rel, dtype, nf4, lead, path):
    if nf4:
        pytest.importorskip("bitsandbytes")
    if path == "fused":
        request.getfixturevalue("fused_on_cpu")
    fn = lora_mlp if path == "fused" else lora_mlp_reference
    x = torch.randn(*lead, HIDDEN, generator=torch.Generator().manual_seed(7)).to(dtype)
    _check_against_float64(fn, x, _parts(nf4, "cpu"), TOL[("cpu", dtype)], rel)


def _unread(x, parts):
    return lora_mlp(x, parts, output_unread=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("nf4", [True, False], ids=["nf4", "16-bit"])
def test_cpu_unread_output_gives_the_same_gradients(fused_on_cpu, rel, dtype, nf4):
    """The recomputed layer's MLP: zeros out, and every gradient as the full function's against float64.
    INTER = 100 in pieces of 32 rows (NF4 rows of 72 values start on a 64-value block every 8 rows):
    three whole pieces and a ragged one."""
    if nf4:
        pytest.importorskip("bitsandbytes")
    parts = _parts(nf4, "cpu")
    for lead in LEADS:
        x = torch.randn(*lead, HIDDEN, generator=torch.Generator().manual_seed(7)).to(dtype)
        out, dx, grads = _run(_unread, x, parts)
        _out64, dx64, grads64 = _run(lora_mlp_reference, x.double(), _float64_parts(parts))
        assert out.shape == (*lead, HIDDEN) and out.dtype == dtype and not out.any()
        assert dx.dtype == dtype and all(g.dtype == torch.float32 for g in grads)
        tol = TOL[("cpu", dtype)]
        for what, got, truth in [("dx", dx, dx64)] + [
            (f"grad{i}", g, t) for i, (g, t) in enumerate(zip(grads, grads64))
        ]:
            assert rel(got, truth) < tol, f"{what}: {rel(got, truth):.2e} >= {tol:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("nf4", [True, False], ids=["nf4", "16-bit"])
def test_cpu_no_grad_output_in_pieces(fused_on_cpu, rel, dtype, nf4):
    """Without autograd (an offloaded layer's first pass) the output is summed over two pieces of the
    intermediate features: the same values as the full function, against float64."""
    if nf4:
        pytest.importorskip("bitsandbytes")
    parts = _parts(nf4, "cpu")
    for lead in LEADS:
        x = torch.randn(*lead, HIDDEN, generator=torch.Generator().manual_seed(7)).to(dtype)
        with torch.no_grad():
            out = lora_mlp(x, parts, in_pieces=True)
        truth = _run(lora_mlp_reference, x.double(), _float64_parts(parts))[0]
        assert out.shape == (*lead, HIDDEN) and out.dtype == dtype and not out.requires_grad
        assert rel(out, truth) < TOL[("cpu", dtype)]


def test_row_chunks_start_on_quantization_blocks():
    from hizli.kernels._lora import row_chunk

    pytest.importorskip("bitsandbytes")
    nf4_part, plain_part = _parts(nf4=True, device="cpu")[0], _parts(nf4=False, device="cpu")[0]
    assert row_chunk([plain_part.base], 100, 4) == 25
    assert row_chunk([nf4_part.base], 100, 4) == 32  # 72 features: a block boundary every 8 rows
    assert row_chunk([nf4_part.base], 8, 4) == 8  # never more than the rows


def test_cpu_fused_under_autocast_runs_in_bf16(fused_on_cpu, rel):
    """fp32 activations under bf16 autocast (the training step): bf16 out, as PEFT's layers give."""
    parts = _parts(nf4=False, device="cpu")
    x = torch.randn(1, 11, HIDDEN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = lora_mlp(x, parts), lora_mlp_reference(x, parts)
    assert out.dtype == torch.bfloat16 and rel(out, ref) < TOL[("cpu", torch.bfloat16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("nf4", [True, False], ids=["nf4", "16-bit"])
def test_kernel_forward_and_grads(kernel_device, rel, dtype, nf4):
    pytest.importorskip("bitsandbytes")
    for lead in LEADS:
        x = torch.randn(*lead, HIDDEN, generator=torch.Generator().manual_seed(7)).to(kernel_device, dtype)
        _check_against_float64(lora_mlp, x, _parts(nf4, kernel_device), TOL[(kernel_device.type, dtype)], rel)


@pytest.mark.parametrize("nf4", [True, False], ids=["nf4", "16-bit"])
def test_kernel_unread_output_gradients(kernel_device, rel, nf4):
    pytest.importorskip("bitsandbytes")
    parts = _parts(nf4, kernel_device)
    x = torch.randn(1, 37, HIDDEN, generator=torch.Generator().manual_seed(7)).to(kernel_device, torch.bfloat16)
    out, dx, grads = _run(_unread, x, parts)
    out64, dx64, grads64 = _run(lora_mlp_reference, x.double(), _float64_parts(parts))
    assert not out.any()
    for got, truth in [(dx, dx64), *zip(grads, grads64)]:
        assert rel(got, truth) < TOL[(kernel_device.type, torch.bfloat16)]
    with torch.no_grad():
        assert rel(lora_mlp(x, parts, in_pieces=True), out64) < TOL[(kernel_device.type, torch.bfloat16)]
