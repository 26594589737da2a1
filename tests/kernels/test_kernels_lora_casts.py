"""Compute-dtype copies of the LoRA weights (``hizli.kernels.lora_casts``): reused between uses, made
again whenever the weight can have changed, and counted by the memory plan."""

from __future__ import annotations

import pytest
import torch

from hizli.kernels import lora_casts
from hizli.kernels.lora_casts import compute_copy


@pytest.fixture(autouse=True)
def cache_on(monkeypatch):
    monkeypatch.setattr(lora_casts, "CACHE", True)


def _fresh(p):
    return torch.equal(compute_copy(p, torch.bfloat16), p.detach().to(torch.bfloat16))


def test_a_copy_is_reused_until_the_weight_can_have_changed():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16, 64))
    first = compute_copy(p, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and torch.equal(first, p.detach().to(torch.bfloat16))
    assert compute_copy(p, torch.bfloat16) is first  # reused
    assert compute_copy(p, torch.float16) is not first and compute_copy(p, torch.float32) is p

    p.grad = torch.ones_like(p)
    torch.optim.SGD([p], lr=0.5).step()  # any optimizer's step
    assert compute_copy(p, torch.bfloat16) is not first and _fresh(p)

    kept = compute_copy(p, torch.bfloat16)
    with torch.no_grad():
        p.mul_(3)  # an in-place edit
    assert compute_copy(p, torch.bfloat16) is not kept and _fresh(p)

    kept = compute_copy(p, torch.bfloat16)
    p.data = torch.randn(16, 64)  # new storage, same version counter
    assert compute_copy(p, torch.bfloat16) is not kept and _fresh(p)


def test_bitsandbytes_8bit_adamw_steps_refresh_the_copies():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 128))  # >= 4096 elements: 8-bit optimizer state
    optimizer = bnb.optim.AdamW8bit([p], lr=0.1)
    before = compute_copy(p, torch.bfloat16).clone()
    p.grad = torch.randn_like(p)
    optimizer.step()  # writes p through bitsandbytes' own kernel
    assert not torch.equal(compute_copy(p, torch.bfloat16), before) and _fresh(p)


def test_tensors_that_are_not_parameters_and_a_switched_off_cache_cast_every_time(monkeypatch):
    t = torch.randn(4, 8)
    assert compute_copy(t, torch.bfloat16) is not compute_copy(t, torch.bfloat16)
    p = torch.nn.Parameter(torch.randn(4, 8))
    monkeypatch.setattr(lora_casts, "CACHE", False)
    assert compute_copy(p, torch.bfloat16) is not compute_copy(p, torch.bfloat16)
    assert lora_casts.pending_bytes(torch.nn.Linear(8, 4), 2) == 0


def test_the_memory_plan_is_told_what_the_copies_will_take():
    model = torch.nn.ModuleDict({"lora_A": torch.nn.Linear(64, 16, bias=False),
                                 "lora_B": torch.nn.Linear(16, 64, bias=False),
                                 "head": torch.nn.Linear(64, 8)})  # trainable, but never copied
    model.lora_B.weight.requires_grad_(False)
    assert lora_casts.pending_bytes(model, 2) == 64 * 16 * 2  # lora_A only: B is frozen, head not LoRA
    compute_copy(model.lora_A.weight, torch.bfloat16)
    assert lora_casts.pending_bytes(model, 2) == 0  # made: now part of what is allocated
    assert lora_casts.pending_bytes(model, 4) == 0  # nothing wider than float32
