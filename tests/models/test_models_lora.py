"""LoRA with the recipe's arguments: PEFT-format adapters that plain PEFT loads back exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hizli.models import loader, lora

RECIPE = dict(
    r=16,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    lora_alpha=16,
    lora_dropout=0,
    bias="none",
    use_gradient_checkpointing="unsloth",
    random_state=3407,
    use_rslora=False,
    loftq_config=None,
)


def _perturb(model, seed=1):
    """LoRA B starts at zero (the adapter is a no-op); give it values so logits really depend on it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _ids(n=2, t=17, vocab=49152):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapter_saves_and_loads_in_plain_peft_with_same_logits(tiny_model_dir, tmp_path, use_rslora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, _ = loader.load(tiny_model_dir, load_in_4bit=False)
    peft_model = lora.add_lora(model, **{**RECIPE, "use_rslora": use_rslora})
    _perturb(peft_model)
    peft_model.eval()
    ids = _ids()
    with torch.no_grad():
        ours = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 16 and config["use_rslora"] is use_rslora
    assert sorted(config["target_modules"]) == sorted(RECIPE["target_modules"])
    assert config["base_model_name_or_path"] == tiny_model_dir  # FastLanguageModel finds the base

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    theirs_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = theirs_model(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    # the adapter matters: the base alone gives different logits
    with theirs_model.disable_adapter(), torch.no_grad():
        assert (theirs_model(input_ids=ids).logits - theirs).abs().max().item() > 1e-3


def test_rslora_scales_by_alpha_over_sqrt_r(tiny_model_dir):
    plain, _ = loader.load(tiny_model_dir, load_in_4bit=False)
    rs, _ = loader.load(tiny_model_dir, load_in_4bit=False)
    plain = lora.add_lora(plain, **{**RECIPE, "r": 4, "lora_alpha": 8})
    rs = lora.add_lora(rs, **{**RECIPE, "r": 4, "lora_alpha": 8, "use_rslora": True})
    layer = lambda m: m.base_model.model.model.layers[0].self_attn.q_proj  # noqa: E731
    assert layer(plain).scaling["default"] == pytest.approx(8 / 4)
    assert layer(rs).scaling["default"] == pytest.approx(8 / math.sqrt(4))


def test_random_state_makes_init_reproducible_and_leaves_user_rng_alone(tiny_model_dir):
    a, _ = loader.load(tiny_model_dir, load_in_4bit=False)
    b, _ = loader.load(tiny_model_dir, load_in_4bit=False)
    c, _ = loader.load(tiny_model_dir, load_in_4bit=False)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = lora.add_lora(a, **RECIPE)
    after = torch.rand(3)
    assert torch.equal(before, after), "get_peft_model must not consume the caller's RNG"
    b = lora.add_lora(b, **RECIPE)
    c = lora.add_lora(c, **{**RECIPE, "random_state": 1})
    sa, sb, sc = (dict((k, v) for k, v in m.named_parameters() if "lora_A" in k) for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loftq_config": {"loftq_bits": 4}}, "loftq_config is not supported"),
        ({"target_modules": ["q_proj", "qkv_proj"]}, "qkv_proj"),
        ({"r": 0}, "r=0"),
        ({"bias": "some"}, "bias='some'"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"use_gradient_checkpointing": "yes"}, "use_gradient_checkpointing='yes'"),
    ],
)
def test_bad_lora_arguments_get_clear_errors(tiny_model_dir, kwargs, message):
    model, _ = loader.load(tiny_model_dir, load_in_4bit=False)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        lora.add_lora(model, **{**RECIPE, **kwargs})


def test_get_peft_model_twice_is_refused(tiny_model_dir):
    model, _ = loader.load(tiny_model_dir, load_in_4bit=False)
    model = lora.add_lora(model, **RECIPE)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.add_lora(model, **RECIPE)


@pytest.mark.parametrize("mode", [True, "unsloth", False])
def test_checkpointing_modes_give_the_same_gradients(tiny_model_dir, mode):
    """Recompute (and offload, which is recompute on a CPU) must not change the math."""

    def grads(m):
        model, _ = loader.load(tiny_model_dir, load_in_4bit=False)
        model = lora.add_lora(model, **{**RECIPE, "use_gradient_checkpointing": m})
        _perturb(model)
        model.train()
        ids = _ids()
        model(input_ids=ids, labels=ids).loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    reference, other = grads(False), grads(mode)
    assert reference.keys() == other.keys() and len(reference) == 2 * 7 * 2
    for k in reference:
        # fp32: recomputed (or offloaded) layers redo the same forward; only the summation order may differ
        torch.testing.assert_close(other[k], reference[k], rtol=1e-5, atol=1e-7)


def test_offloaded_checkpoint_function_matches_plain_backward():
    """The offloading autograd function itself (on a GPU it keeps the input in pinned CPU memory)."""
    from hizli.models.checkpointing import offloaded_checkpoint

    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(3, 8, requires_grad=True)
    fn = lambda h: torch.nn.functional.gelu(lin(h)) * 2  # noqa: E731
    fn(x).sum().backward()
    expected_x, expected_w = x.grad.clone(), lin.weight.grad.clone()
    x.grad = None
    lin.weight.grad = None
    offloaded_checkpoint(fn, x).sum().backward()
    torch.testing.assert_close(x.grad, expected_x)
    torch.testing.assert_close(lin.weight.grad, expected_w)


@pytest.mark.gpu
def test_gpu_offloaded_layers_match_plain_backward(monkeypatch):
    """A chain of offloaded layers on a GPU (inputs in pinned CPU memory, fetched back one layer ahead,
    each recomputed output freed before its backward) gives the gradients of plain backward."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from hizli.models import checkpointing

    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 64).cuda() for _ in range(3)]
    x = torch.randn(5, 64, device="cuda", requires_grad=True)

    def block(lin):
        return lambda h: h + torch.nn.functional.gelu(lin(h))  # ends in a residual add, like a decoder layer

    def grads(offload):
        for lin in layers:
            lin.zero_grad()
        x.grad = None
        checkpointing.new_forward_pass()
        h = x
        for lin in layers:
            h = checkpointing.offloaded_checkpoint(block(lin), h) if offload else block(lin)(h)
        (h * h).sum().backward()
        return [x.grad.clone()] + [lin.weight.grad.clone() for lin in layers]

    freed = []
    release = checkpointing._release_output

    def recording(out):
        release(out)
        freed.append(out.untyped_storage().nbytes() == 0)

    monkeypatch.setattr(checkpointing, "_release_output", recording)
    want = grads(False)
    got = grads(True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert freed == [True] * 3
    for g, w in zip(grads(True), want):  # again: the pinned buffers of the first pass are reused
        torch.testing.assert_close(g, w)


@pytest.mark.gpu
def test_gpu_two_offloaded_forward_passes_before_one_backward_keep_both_inputs():
    """Pinned buffers are reused only once their input has been fetched back: two forward passes
    whose losses are summed before one backward get the gradients of plain backward."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from hizli.models import checkpointing

    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 64).cuda() for _ in range(2)]
    xs = [torch.randn(5, 64, device="cuda") for _ in range(2)]

    def grads(offload):
        for lin in layers:
            lin.zero_grad()
        total = 0
        for x in xs:
            checkpointing.new_forward_pass()
            h = x
            for lin in layers:
                fn = lambda h_, lin=lin: h_ + torch.nn.functional.gelu(lin(h_))  # noqa: E731
                h = checkpointing.offloaded_checkpoint(fn, h) if offload else fn(h)
            total = total + (h * h).sum()
        total.backward()
        return [lin.weight.grad.clone() for lin in layers]

    for g, w in zip(grads(True), grads(False)):
        torch.testing.assert_close(g, w)


@pytest.mark.gpu
def test_gpu_offloaded_4bit_layers_defer_the_mlp_and_match_kept_layers(tmp_path, monkeypatch):
    """Offloaded layers on a GPU recompute their MLP only in backward (its output unread): LoRA
    gradients as with every activation kept, within bf16 rounding (the deferred MLP sums its pieces)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("bitsandbytes")
    from helpers import one_layer_lora_model
    from hizli.kernels import lora_mlp as lora_mlp_module
    from hizli.models.checkpointing import set_checkpointing
    from hizli.models.patch import use_fused_ops
    from hizli.models.record import state_of

    unread_calls = []
    unread = lora_mlp_module._LoraMLPUnreadFunction

    class Counting(unread):
        @staticmethod
        def forward(ctx, *args):
            unread_calls.append(1)
            return unread.forward(ctx, *args)

    monkeypatch.setattr(lora_mlp_module, "_LoraMLPUnreadFunction", Counting)
    model = one_layer_lora_model(
        tmp_path, hidden=128, inter=320, heads=4, kv_heads=2, head_dim=32, dtype=torch.bfloat16, device="cuda"
    )
    assert use_fused_ops(model)["swiglu"] == 1
    state_of(model).defer_offloaded_mlp = True
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(7)).cuda()

    def grads(mode):
        set_checkpointing(model, mode)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return {k: p.grad.float().clone() for k, p in model.named_parameters() if p.requires_grad}

    kept = grads(False)
    assert not unread_calls
    offloaded = grads("unsloth")
    assert len(unread_calls) == 1  # the one layer's MLP, in backward
    assert len(kept) == 14
    for k in kept:
        err = ((offloaded[k] - kept[k]).norm() / kept[k].norm()).item()
        assert err < 2e-2, f"{k}: {err:.2e}"


def test_offloaded_layers_defer_their_mlp_only_when_the_record_asks(tiny_model_dir):
    """The deferred MLP is off by default; the model's record switches it on for offloaded layers
    (Llama's decoder layer ends in the residual add it needs), and never for recomputed ones."""
    import functools

    from hizli.models.checkpointing import apply_layer_modes, decoder_layers
    from hizli.models.record import state_of

    model, _ = loader.load(tiny_model_dir, load_in_4bit=False)
    model = lora.add_lora(model, **RECIPE)

    def unread(modes):
        apply_layer_modes(model, modes)
        funcs = [layer._gradient_checkpointing_func for layer in decoder_layers(model)]
        return [isinstance(f, functools.partial) and f.keywords["options"].mlp_unread for f in funcs]

    assert unread(["offload", "offload"]) == [False, False]
    state_of(model).defer_offloaded_mlp = True
    assert unread(["offload", "recompute"]) == [True, False]


def test_four_bit_lora_trains_on_cpu(tiny_model_dir):
    """NF4 base (bitsandbytes runs it on this CPU): forward and LoRA gradients work."""
    model, _ = loader.load(tiny_model_dir, load_in_4bit=True)
    assert model.hizli.info.quantization == "nf4"
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    model = lora.add_lora(model, **RECIPE)
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
