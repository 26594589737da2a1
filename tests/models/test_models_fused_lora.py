"""The fused LoRA ops inside a real PEFT + bitsandbytes layer compute what PEFT computes, forward and backward.

Each test builds a one-layer Llama in NF4 (double quantization, as the loader does) with LoRA on all
seven projections and random ``B`` (so the adapters matter), then runs the layer's q/k/v group, its
o projection and its MLP twice: through ``hizli.kernels.lora_qkv`` / ``lora_mlp`` and through the PEFT
modules. Outputs, input gradients and every ``lora_A`` / ``lora_B`` gradient must agree. In bf16/fp16
both sides round differently, so there the check is against a float64 evaluation built from the same
dequantized weights: the fused error must be no worse than PEFT's (times 1.25).

On a CPU the ops would take their references; the ``fused`` fixture sends them through their
autograd functions (whose dequantization and SwiGLU then run their PyTorch references), so the
functions' backward is tested here too. ``-m gpu`` runs the Triton path at the recipe's shapes.
"""

from __future__ import annotations

import pytest
import torch

from helpers import one_layer_lora_model
from hizli.kernels import lora_mlp as lora_mlp_module
from hizli.kernels import lora_qkv as lora_qkv_module
from hizli.kernels.lora_mlp import lora_mlp
from hizli.kernels.lora_qkv import lora_qkv
from hizli.models import fused_lora


@pytest.fixture
def fused(monkeypatch):
    """The ops take their fused autograd functions here, also on a CPU."""
    for module in (lora_qkv_module, lora_mlp_module):
        monkeypatch.setattr(module, "use_triton", lambda op, *tensors: True)


def _layer(model):
    return model.get_base_model().model.layers[0]


def _lora_params(module):
    """LoRA parameters of ``module``: a list of projection layers (one fused group)."""
    return {f"{i}.{n}": p for i, layer in enumerate(module) for n, p in layer.named_parameters() if "lora_" in n}


def _run(module, fn, x):
    """Output, input gradient and LoRA gradients of ``fn(x)`` under a fixed random upstream gradient."""
    for p in _lora_params(module).values():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator(device="cpu").manual_seed(11)
    ups = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
    torch.autograd.backward(outs, ups)
    grads = {n: p.grad.detach().clone() for n, p in _lora_params(module).items()}
    assert len(grads) == len(_lora_params(module)) and all(v is not None for v in grads.values())
    return [o.detach() for o in outs], x.grad.detach(), grads


def _cases(layer, copies=None):
    """(module, fused fn, unfused fn) for the q/k/v group, the o projection and the MLP (the fused ones
    with the run's kept weight copies ``copies``, or casting at every use)."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = fused_lora.group_parts(attn, ("q_proj", "k_proj", "v_proj"), base_bias=True)
    o = fused_lora.group_parts(attn, ("o_proj",))
    gud = fused_lora.group_parts(mlp, ("gate_proj", "up_proj", "down_proj"))
    assert qkv is not None and o is not None and gud is not None, "recipe LoRA layers must take the fused path"
    act = torch.nn.functional.silu
    d = attn.head_dim

    def plain_qkv_rope(x):
        from hizli.kernels.rope import rope_reference

        q, k = (p(x).view(*x.shape[:-1], -1, d) for p in (attn.q_proj, attn.k_proj))
        q, k = rope_reference(q, k, *_rope_tables(x, d), unsqueeze_dim=2)
        return q.flatten(-2), k.flatten(-2), attn.v_proj(x)

    def fused_qkv_rope(x):
        return lora_qkv(x, qkv, rope=_rope_tables(x, d), copies=copies)

    fused_qkv_rope.head_dim = d  # for the float64 reference

    return {
        "qkv": (
            [attn.q_proj, attn.k_proj, attn.v_proj],
            lambda x: lora_qkv(x, qkv, copies=copies),
            lambda x: (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)),
        ),
        "qkv_rope": ([attn.q_proj, attn.k_proj, attn.v_proj], fused_qkv_rope, plain_qkv_rope),
        "o": ([attn.o_proj], lambda x: lora_qkv(x, o, copies=copies), lambda x: attn.o_proj(x)),
        "mlp": (
            [mlp.gate_proj, mlp.up_proj, mlp.down_proj],
            lambda x: lora_mlp(x, gud, copies),
            lambda x: mlp.down_proj(act(mlp.gate_proj(x)) * mlp.up_proj(x)),
        ),
    }


def _rope_tables(x, head_dim):
    """cos, sin ``[1, T, D]`` of a padding-free row of two sequences (positions restart), in x's dtype."""
    t = x.shape[1]
    positions = torch.cat([torch.arange(t - t // 2), torch.arange(t // 2)]).double()
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).double() / head_dim))
    angle = positions[:, None] * inv_freq[None]
    angle = torch.cat([angle, angle], dim=-1)[None]
    return angle.cos().to(x.device, x.dtype), angle.sin().to(x.device, x.dtype)


def _input(name, layer, tokens, dtype, device):
    width = layer.self_attn.o_proj.in_features if name == "o" else layer.self_attn.q_proj.in_features
    g = torch.Generator(device="cpu").manual_seed(5)
    return torch.randn((1, tokens, width), generator=g).to(device, dtype)


def _float64_reference(module, name, x, head_dim=None):
    """The same maths in float64 from the dequantized weights (PEFT's definition of the layer)."""
    from hizli.export.merge import dense_weight

    by_name = dict(zip(names_of(name), module))

    def proj(layer_name, inp):
        layer = by_name[layer_name]
        base, a, b, s = fused_lora.lora_parts(layer)
        w = dense_weight(base.weight).double()
        return inp @ w.t() + s * (inp @ a.double().t()) @ b.double().t()

    names = {"qkv": ("q_proj", "k_proj", "v_proj"), "qkv_rope": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",)}.get(
        name
    )
    params = _lora_params(module)
    saved = {n: p.data for n, p in params.items()}

    def fn(x64):
        if not names:
            return proj("down_proj", torch.nn.functional.silu(proj("gate_proj", x64)) * proj("up_proj", x64))
        outs = tuple(proj(n, x64) for n in names)
        if name != "qkv_rope":
            return outs
        from hizli.kernels.rope import rope_reference

        q, k = (o.view(*x64.shape[:-1], -1, head_dim) for o in outs[:2])
        q, k = rope_reference(q, k, *_rope_tables(x64, head_dim), unsqueeze_dim=2)
        return q.flatten(-2), k.flatten(-2), outs[2]

    try:
        for p in params.values():
            p.data = p.data.double()
        res = _run(module, fn, x.double())
    finally:
        for n, p in params.items():
            p.data = saved[n]
            p.grad = None
    return res


def names_of(case):
    qkv = ("q_proj", "k_proj", "v_proj")
    return {"qkv": qkv, "qkv_rope": qkv, "o": ("o_proj",)}.get(case, ("gate_proj", "up_proj", "down_proj"))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _compare(module, fused_fn, plain_fn, x, name, exact):
    fo, fdx, fg = _run(module, fused_fn, x)
    po, pdx, pg = _run(module, plain_fn, x)
    assert [o.shape for o in fo] == [o.shape for o in po] and fg.keys() == pg.keys()
    assert all(o.dtype == p.dtype for o, p in zip(fo, po)) and fdx.dtype == pdx.dtype
    if exact:  # fp32: the same maths up to summation order
        for a, b in zip(fo, po):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(fdx, pdx, rtol=2e-5, atol=2e-5)
        for k in pg:
            torch.testing.assert_close(fg[k], pg[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {k}: {m}")
        return
    ro, rdx, rg = _float64_reference(module, name, x, getattr(fused_fn, "head_dim", None))
    pairs = [(f"out{i}", a, b, r) for i, (a, b, r) in enumerate(zip(fo, po, ro))] + [("dx", fdx, pdx, rdx)]
    pairs += [(k, fg[k], pg[k], rg[k]) for k in pg]
    for what, fused, plain, ref in pairs:
        err_f, err_p = _rel(fused, ref), _rel(plain, ref)
        assert err_f <= 1.25 * err_p + 1e-4, f"{name} {what}: fused error {err_f:.2e} vs PEFT's {err_p:.2e}"


# A layer with GQA and an MLP width that is no multiple of the hidden size, in fp32 on the CPU.
FP32_LAYER = dict(hidden=128, inter=320, heads=4, kv_heads=2, head_dim=32, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("tokens", [1, 37])
def test_fused_matches_peft_fp32_cpu(tmp_path, tokens, fused):
    model = one_layer_lora_model(tmp_path, **FP32_LAYER)
    layer = _layer(model)
    for name, (module, fused_fn, plain_fn) in _cases(layer).items():
        _compare(module, fused_fn, plain_fn, _input(name, layer, tokens, torch.float32, "cpu"), name, exact=True)


def test_fused_matches_peft_bf16_cpu_with_rslora(tmp_path, fused):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model = one_layer_lora_model(
            tmp_path,
            hidden=128,
            inter=256,
            heads=2,
            kv_heads=1,
            head_dim=64,
            dtype=torch.bfloat16,
            device="cpu",
            use_rslora=True,
        )
        layer = _layer(model)
        for name, (module, fused_fn, plain_fn) in _cases(layer).items():
            _compare(module, fused_fn, plain_fn, _input(name, layer, 29, torch.bfloat16, "cpu"), name, exact=False)


def test_layers_fused_maths_cannot_reproduce_take_peft_path(tmp_path):
    model = one_layer_lora_model(
        tmp_path,
        hidden=64,
        inter=128,
        heads=2,
        kv_heads=1,
        head_dim=32,
        dtype=torch.float32,
        device="cpu",
        lora_dropout=0.1,
    )
    attn = _layer(model).self_attn
    assert fused_lora.group_parts(attn, ("q_proj", "k_proj", "v_proj")) is None  # dropout > 0
    model2 = one_layer_lora_model(
        tmp_path / "b", hidden=64, inter=128, heads=2, kv_heads=1, head_dim=32, dtype=torch.float32, device="cpu"
    )
    attn2 = _layer(model2).self_attn
    assert fused_lora.lora_parts(attn2.q_proj) is not None
    with model2.disable_adapter():
        assert fused_lora.lora_parts(attn2.q_proj) is None
    assert fused_lora.lora_parts(attn2.q_proj) is not None
    assert fused_lora.lora_parts(attn2.q_proj.base_layer) is None  # not a LoRA layer


@pytest.mark.parametrize("path", ["fused", "reference"])
def test_patched_model_trains_like_peft(tmp_path, request, path):
    """Through the patched decoder (``use_fused_ops``), loss and every LoRA gradient match PEFT's, on
    the ops' fused functions and on their references (the CPU path)."""
    if path == "fused":
        request.getfixturevalue("fused")
    from hizli.models.patch import use_fused_ops, use_hizli_attention
    from hizli.train import step as step_mod
    from hizli.data.collate import PaddingFreeCollator
    from helpers import token_rows

    kw = dict(hidden=128, inter=256, heads=4, kv_heads=2, head_dim=32, dtype=torch.float32, device="cpu")
    plain = one_layer_lora_model(tmp_path / "p", **kw)
    fused = one_layer_lora_model(tmp_path / "f", **kw)
    for m in (plain, fused):
        use_hizli_attention(m)
    counts = use_fused_ops(fused)
    assert counts["swiglu"] == 1 and counts["rope"] == 1
    from hizli.models.patch import model_uses_fused_lora

    assert model_uses_fused_lora(fused) and not model_uses_fused_lora(plain)  # the memory plan reads this
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HIZLI_KERNELS", "reference")  # the ops then run their (unfused) references
        assert not model_uses_fused_lora(fused)
    batch = step_mod.to_device(PaddingFreeCollator()(token_rows(4, seed=3, vocab=256)), torch.device("cpu"))
    results = []
    for m in (plain, fused):
        m.zero_grad()
        loss = step_mod.loss_sum(m, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    # fp32, fused against PEFT's layers: the same maths summed in another order
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) == 14
    for k in g0:
        # summation order moves each entry by a few ulp of the largest one (cancellation leaves small
        # entries with that absolute error), so the absolute tolerance follows the tensor's scale
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-5 * float(g0[k].abs().max()))


# ------------------------------------------------------------------------------------------------
# GPU: the Triton dequantization and SwiGLU inside, recipe shapes, bf16 and fp16


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "shape,tokens",
    [
        ((3072, 8192, 24, 8, 128), 1),
        ((3072, 8192, 24, 8, 128), 1000),
        ((2048, 5632, 16, 4, 128), 333),
        ((1024, 2816, 8, 8, 128), 4096),
    ],
    ids=["3b-1tok", "3b-1000tok", "mid-333tok", "small-4096tok"],
)
def test_fused_matches_peft_gpu(tmp_path, dtype, shape, tokens):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    hidden, inter, heads, kv_heads, head_dim = shape
    model = one_layer_lora_model(
        tmp_path,
        hidden=hidden,
        inter=inter,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        device="cuda",
    )
    layer = _layer(model)
    with torch.autocast("cuda", dtype=dtype):
        for name, (module, fused_fn, plain_fn) in _cases(layer).items():
            _compare(module, fused_fn, plain_fn, _input(name, layer, tokens, dtype, "cuda"), name, exact=False)


def test_training_with_kept_lora_copies_matches_casting_at_every_use(tmp_path, fused):
    """bf16 compute with float32 adapters, bitsandbytes' 8-bit AdamW: three steps reusing the adapters'
    bf16 copies end bit-identical to casting at every use (a copy kept past a step would not)."""
    from hizli.kernels.lora_casts import ComputeCopies

    bnb = pytest.importorskip("bitsandbytes")
    results = []
    for keep in (True, False):
        copies = ComputeCopies() if keep else None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model = one_layer_lora_model(
                tmp_path / str(keep),
                hidden=128,
                inter=256,
                heads=2,
                kv_heads=1,
                head_dim=64,
                dtype=torch.bfloat16,
                device="cpu",
            )
            layer = _layer(model)
            params = [p for n, p in model.named_parameters() if "lora_" in n]
            assert params and all(p.dtype == torch.float32 for p in params)
            optimizer = bnb.optim.AdamW8bit(params, lr=1e-2)
            if copies is not None:
                optimizer.register_step_post_hook(copies.step_taken)  # as hizli's trainer does
            losses = []
            for step in range(3):
                loss = 0
                for name, (_module, fused_fn, _plain) in _cases(layer, copies).items():
                    x = _input(name, layer, 29, torch.bfloat16, "cpu")
                    outs = fused_fn(x)
                    for o in outs if isinstance(outs, tuple) else (outs,):
                        loss = loss + o.float().pow(2).mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
            if keep:
                assert copies.pending_bytes(model, 2) == 0  # every adapter weight's copy was made and used
        results.append((losses, [p.detach().clone() for p in params]))
    (kept_losses, kept_params), (cast_losses, cast_params) = results
    assert kept_losses == cast_losses and len(set(kept_losses)) == 3  # the adapters did change
    assert all(torch.equal(a, b) for a, b in zip(kept_params, cast_params))


def _qwen2_like(model):
    """Qwen2's attention: a bias on q, k and v (random: transformers initialises them to zero), none on o."""
    attn = _layer(model).self_attn
    attn.o_proj.base_layer.bias = None
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            bias = getattr(attn, name).base_layer.bias
            bias.copy_(torch.randn(bias.shape, generator=g).to(bias.dtype))
    return model


def test_frozen_qkv_biases_take_the_fused_path_and_match_peft(tmp_path, fused):
    """Qwen2's q/k/v biases (frozen, as PEFT leaves them with bias="none"): the fused group adds them,
    forward and every gradient as PEFT's layers compute them."""
    model = _qwen2_like(one_layer_lora_model(tmp_path, attention_bias=True, **FP32_LAYER))
    layer = _layer(model)
    assert all(getattr(layer.self_attn, n).base_layer.bias is not None for n in ("q_proj", "k_proj", "v_proj"))
    for name, (module, fused_fn, plain_fn) in _cases(layer).items():
        if name.startswith("qkv"):
            _compare(module, fused_fn, plain_fn, _input(name, layer, 37, torch.float32, "cpu"), name, exact=True)


def test_the_memory_plan_counts_fused_layers_only_where_every_group_is_fused(tmp_path):
    """Frozen q/k/v biases (Qwen2) are fused; a bias that trains (PEFT's bias="all") or a bias on o
    keeps PEFT's layers, which hold more per token: such a model is planned as unfused."""
    from hizli.models.patch import model_uses_fused_lora, use_fused_ops, use_hizli_attention

    kw = dict(hidden=128, inter=256, heads=4, kv_heads=2, head_dim=32, dtype=torch.float32, device="cpu")
    plain = one_layer_lora_model(tmp_path / "a", **kw)
    qwen2_like = _qwen2_like(one_layer_lora_model(tmp_path / "b", attention_bias=True, **kw))
    biased_o = one_layer_lora_model(tmp_path / "c", attention_bias=True, **kw)
    trained_bias = _qwen2_like(one_layer_lora_model(tmp_path / "d", attention_bias=True, **kw))
    _layer(trained_bias).self_attn.q_proj.base_layer.bias.requires_grad_(True)
    for m in (plain, qwen2_like, biased_o, trained_bias):
        use_hizli_attention(m)
        use_fused_ops(m)
    assert model_uses_fused_lora(plain) and model_uses_fused_lora(qwen2_like)
    assert not model_uses_fused_lora(biased_o) and not model_uses_fused_lora(trained_bias)
