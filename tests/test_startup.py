"""The garbage-collector pause around imports and model loading (``hizli._startup``): it covers
what it should and always gives the collector back, errors included."""

from __future__ import annotations

import gc

import pytest

from hizli._startup import gc_paused


def test_the_pause_restores_the_callers_setting_nested_and_on_errors():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner block gives back what it found: still paused
    assert gc.isenabled()
    with pytest.raises(KeyError):
        with gc_paused():
            raise KeyError("x")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # a caller who had it off keeps it off
    finally:
        gc.enable()


def test_model_loading_runs_paused_and_resumes_even_when_it_fails(monkeypatch):
    from hizli.models import loader

    seen = []

    def resolve(name):
        seen.append(gc.isenabled())
        raise ValueError(f"no model called {name!r}")

    monkeypatch.setattr(loader, "resolve_source", resolve)
    with pytest.raises(ValueError, match="no model called"):
        loader.load("nowhere/none")
    assert seen == [False]
    assert gc.isenabled()


def test_adding_lora_runs_paused(monkeypatch, tiny_config):
    import torch
    from transformers import LlamaForCausalLM

    from hizli.models import lora

    seen = []
    check = lora._check_lora_args

    def spy(*args):
        seen.append(gc.isenabled())
        return check(*args)

    monkeypatch.setattr(lora, "_check_lora_args", spy)
    peft_model = lora.add_lora(LlamaForCausalLM(tiny_config).to(torch.float32), r=4)
    assert hasattr(peft_model, "peft_config")
    assert seen == [False] and gc.isenabled()


def test_deferred_torch_compile_compiles_on_first_call_and_gives_torch_compile_back(monkeypatch):
    import torch

    from hizli._startup import deferred_torch_compile

    compiled = []

    def fake_compile(fn, **options):
        compiled.append((getattr(fn, "__name__", type(fn).__name__), options))
        return lambda *a, **k: ("compiled", fn(*a, **k))

    monkeypatch.setattr(torch, "compile", fake_compile)

    def double(x):
        return 2 * x

    with deferred_torch_compile():
        plain = torch.compile(double, dynamic=False)

        @torch.compile(mode="max-autotune")
        def triple(x):
            return 3 * x

        torch.compile(torch.nn.Identity())
        assert compiled == [("Identity", {})]  # a module goes straight to the real torch.compile
    assert torch.compile is fake_compile
    compiled.clear()
    assert plain.__name__ == "double" and compiled == []  # nothing compiled before the first call
    assert plain(4) == ("compiled", 8) and triple(2) == ("compiled", 6)
    assert plain(5) == ("compiled", 10)
    assert compiled == [("double", {"dynamic": False}), ("triple", {"mode": "max-autotune"})]

    with pytest.raises(RuntimeError):
        with deferred_torch_compile():
            raise RuntimeError("import failed")
    assert torch.compile is fake_compile


def test_bitsandbytes_imports_without_pulling_in_inductor():
    """The point of the deferral: TorchInductor stays unimported (about 2 s of a 3B model's start-up)."""
    import subprocess
    import sys

    code = (
        "import sys, torch; real = torch.compile\n"
        "from hizli._startup import import_bitsandbytes\n"
        "bnb = import_bitsandbytes()\n"
        "assert torch.compile is real and bnb.__name__ == 'bitsandbytes'\n"
        "print('inductor' if 'torch._inductor.compile_fx' in sys.modules else 'no inductor')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "no inductor"
