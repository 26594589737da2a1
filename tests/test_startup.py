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
