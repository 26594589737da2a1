"""LoRA projections sharing an input (q/k/v, o): the reference against PEFT's LoRA layer (CPU), the fused
autograd function and the reference against a float64 evaluation, forward and every gradient.

The fused function runs on a CPU too (the ``cpu-fused`` cases force it; its NF4 dequantization and
rotation then take their PyTorch references), on the GPU with ``-m gpu``, and through Triton's
interpreter with ``TRITON_INTERPRET=1 -m interpret``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers import random_lora_part
from hizli.kernels import lora_qkv as lora_qkv_module
from hizli.kernels._lora import weight_reference
from hizli.kernels.lora_qkv import LoraPart, lora_qkv, lora_qkv_reference

# Relative error (‖out - truth‖ / ‖truth‖) allowed against float64 on the same (rounded) inputs and
# the same dequantized weights.
# fp32: matmuls over at most 72 terms round near 1e-7; 1e-5 leaves room for another summation order.
# bf16: x and the adapters are rounded to bf16 before the matmuls (the truth sees fp32 adapters) and
#   every matmul output is rounded once more: about four roundings of ~1.1e-3 RMS each compound,
#   measured up to 5.0e-3 on these shapes (CPU); 1.5e-2 is ~3x margin. The gradients of lora_A and lora_B
#   sum over the tokens in bf16, as PEFT under autocast does.
TOL = {
    ("cpu", torch.float32): 1e-5,
    ("cpu", torch.bfloat16): 1.5e-2,
    ("cuda", torch.float32): 1e-5,
    ("cuda", torch.bfloat16): 1.5e-2,
}
HIDDEN, HEAD_DIM, HEADS, KV_HEADS = 72, 24, 3, 1  # odd sizes: 72 features, GQA 3:1, head_dim 24
LEADS = [(1, 37), (2, 19)]  # a padding-free row of 37 tokens; a batch of 2 x 19


def _qkv_parts(nf4: bool, device) -> list[LoraPart]:
    return [
        random_lora_part(HEADS * HEAD_DIM, HIDDEN, nf4=nf4, device=device, seed=1),
        random_lora_part(KV_HEADS * HEAD_DIM, HIDDEN, nf4=nf4, device=device, seed=2, rank=4, scaling=1.0),
        random_lora_part(KV_HEADS * HEAD_DIM, HIDDEN, nf4=nf4, device=device, seed=3, scaling=0.5),
    ]


def _cases(nf4: bool, device) -> dict[str, tuple[list[LoraPart], bool]]:
    """name -> (parts, with rope)."""
    qkv = _qkv_parts(nf4, device)
    o = [random_lora_part(40, HIDDEN, nf4=nf4, device=device, seed=4)]
    return {"qkv": (qkv, False), "qkv_rope": (qkv, True), "o": (o, False)}


def _rope_tables(lead, dtype, device):
    """cos, sin ``[B, T, D]``; positions restart half-way, as in a padding-free row of two sequences."""
    b, t = lead
    positions = torch.cat([torch.arange(t - t // 2), torch.arange(t // 2)]).double()
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2).double() / HEAD_DIM))
    angle = positions[:, None] * inv_freq[None]
    angle = torch.cat([angle, angle], dim=-1)[None].expand(b, t, HEAD_DIM)
    return angle.cos().to(device, dtype), angle.sin().to(device, dtype)


def _run(fn, x, parts, rope, seed=11):
    """Outputs, and the gradients of x and of every lora_A / lora_B, under a fixed upstream gradient."""
    x = x.detach().clone().requires_grad_()
    for _base, a, b, _s in parts:
        a.grad = b.grad = None
    outs = fn(x, parts, rope)
    g = torch.Generator().manual_seed(seed)
    torch.autograd.backward(outs, [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs])
    grads = [t.grad.detach().clone() for _base, a, b, _s in parts for t in (a, b)]
    return [o.detach() for o in outs], x.grad.detach(), grads


def _float64_parts(parts):
    """The same projections in float64: the dequantized weight as a plain one, fresh adapter leaves."""
    out = []
    for base, a, b, s in parts:
        w = weight_reference(base, torch.float32).double()
        out.append(
            LoraPart(
                SimpleNamespace(weight=w, in_features=base.in_features),
                a.detach().double().requires_grad_(),
                b.detach().double().requires_grad_(),
                s,
            )
        )
    return out


def _check_against_float64(fn, x, parts, rope, tol, rel):
    outs, dx, grads = _run(fn, x, parts, rope)
    rope64 = None if rope is None else tuple(t.double() for t in rope)
    outs64, dx64, grads64 = _run(lora_qkv_reference, x.double(), _float64_parts(parts), rope64)
    assert [o.dtype for o in outs] == [x.dtype] * len(outs) and dx.dtype == x.dtype
    assert all(g.dtype == torch.float32 for g in grads)  # the adapters' own dtype
    for what, got, truth in (
        [(f"out{i}", o, t) for i, (o, t) in enumerate(zip(outs, outs64))]
        + [("dx", dx, dx64)]
        + [(f"grad{i}", g, t) for i, (g, t) in enumerate(zip(grads, grads64))]
    ):
        assert rel(got, truth) < tol, f"{what}: {rel(got, truth):.2e} >= {tol:.0e}"


@pytest.fixture
def fused_on_cpu(monkeypatch):
    monkeypatch.setattr(lora_qkv_module, "use_triton", lambda op, *tensors: True)


# ---------------------------------------------------------------------------------------------
# CPU: reference == PEFT's LoRA layer over bitsandbytes NF4


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_reference_matches_peft_layer(tmp_path, rel, autocast):
    """fp32: the same operations in the same order, equal up to summation order. Under bf16 autocast
    PEFT casts to bf16 at each matmul, the reference before them: both round the same values."""
    pytest.importorskip("bitsandbytes")
    from helpers import one_layer_lora_model
    from hizli.models.fused_lora import group_parts

    dtype = torch.bfloat16 if autocast else torch.float32
    model = one_layer_lora_model(
        tmp_path,
        # rows of 192 and 72 (o_proj): see tiny_llama_config on bitsandbytes' AVX512 rows
        hidden=192,
        inter=192,
        heads=HEADS,
        kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        dtype=dtype,
        device="cpu",
        use_rslora=autocast,
    )
    attn = model.get_base_model().model.layers[0].self_attn
    for seed, names in enumerate([("q_proj", "k_proj", "v_proj"), ("o_proj",)]):
        parts = group_parts(attn, names)
        modules = [getattr(attn, n) for n in names]
        x = torch.randn(1, 29, modules[0].in_features, generator=torch.Generator().manual_seed(seed)).to(dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            ours = _run(lora_qkv_reference, x, parts, None)
            theirs = _run(lambda x_, _parts, _rope: tuple(m(x_) for m in modules), x, parts, None)
        for got, want in zip([*ours[0], ours[1], *ours[2]], [*theirs[0], theirs[1], *theirs[2]]):
            assert got.dtype == want.dtype
            if autocast:  # the same roundings to bf16; inside a bf16 matmul the order may differ
                assert rel(got, want) < 1e-2
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_auto_on_cpu_is_the_reference(monkeypatch):
    monkeypatch.setenv("HIZLI_KERNELS", "auto")
    parts = _qkv_parts(nf4=False, device="cpu")
    x = torch.randn(1, 5, HIDDEN)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(lora_qkv(x, parts), lora_qkv_reference(x, parts)))


def test_bad_parts_are_value_errors():
    parts = _qkv_parts(nf4=False, device="cpu")
    with pytest.raises(ValueError, match="features"):
        lora_qkv(torch.randn(1, 3, HIDDEN + 1), parts)
    with pytest.raises(ValueError, match="empty"):
        lora_qkv(torch.randn(1, 3, HIDDEN), [])
    with pytest.raises(ValueError, match="three projections"):
        lora_qkv(torch.randn(1, 3, HIDDEN), parts[:1], rope=_rope_tables((1, 3), torch.float32, "cpu"))


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
    fn = lora_qkv if path == "fused" else lora_qkv_reference
    for name, (parts, with_rope) in _cases(nf4, "cpu").items():
        rope = _rope_tables(lead, dtype, "cpu") if with_rope else None
        x = torch.randn(*lead, HIDDEN, generator=torch.Generator().manual_seed(7)).to(dtype)
        _check_against_float64(fn, x, parts, rope, TOL[("cpu", dtype)], rel)


def test_cpu_fused_under_autocast_runs_in_bf16(fused_on_cpu, rel):
    """fp32 activations under bf16 autocast (the training step): bf16 out, as PEFT's layers give."""
    parts = _qkv_parts(nf4=False, device="cpu")
    x = torch.randn(1, 11, HIDDEN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = lora_qkv(x, parts)
        refs = lora_qkv_reference(x, parts)
    assert all(o.dtype == torch.bfloat16 for o in outs)
    assert all(rel(o, r) < TOL[("cpu", torch.bfloat16)] for o, r in zip(outs, refs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("nf4", [True, False], ids=["nf4", "16-bit"])
def test_kernel_forward_and_grads(kernel_device, rel, dtype, nf4):
    pytest.importorskip("bitsandbytes")
    for lead in LEADS:
        for name, (parts, with_rope) in _cases(nf4, kernel_device).items():
            rope = _rope_tables(lead, dtype, kernel_device) if with_rope else None
            x = torch.randn(*lead, HIDDEN, generator=torch.Generator().manual_seed(7)).to(kernel_device, dtype)
            _check_against_float64(lora_qkv, x, parts, rope, TOL[(kernel_device.type, dtype)], rel)
