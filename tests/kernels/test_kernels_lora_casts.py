"""Compute-dtype copies of the LoRA weights (``hizli.kernels.lora_casts``): reused between uses within a
training run, made again whenever the weight can have changed, counted by the memory plan, and kept
only while hizli's trainer runs."""

from __future__ import annotations

import pytest
import torch

from hizli.kernels.lora_casts import ComputeCopies, compute_copy


def _fresh(copies, p):
    return torch.equal(compute_copy(p, torch.bfloat16, copies), p.detach().to(torch.bfloat16))


def test_a_copy_is_reused_until_the_weight_can_have_changed():
    torch.manual_seed(0)
    copies = ComputeCopies()
    p = torch.nn.Parameter(torch.randn(16, 64))
    first = compute_copy(p, torch.bfloat16, copies)
    assert first.dtype == torch.bfloat16 and torch.equal(first, p.detach().to(torch.bfloat16))
    assert compute_copy(p, torch.bfloat16, copies) is first  # reused
    assert compute_copy(p, torch.float16, copies) is not first and compute_copy(p, torch.float32, copies) is p

    p.grad = torch.ones_like(p)
    optimizer = torch.optim.SGD([p], lr=0.5)
    optimizer.register_step_post_hook(copies.step_taken)  # as hizli's trainer does with its optimizer
    address = compute_copy(p, torch.bfloat16, copies).data_ptr()  # one kept copy per weight: bf16 again
    optimizer.step()
    assert _fresh(copies, p)
    # refreshed where it was: a CUDA graph of an offloaded layer reads it at the captured address
    assert compute_copy(p, torch.bfloat16, copies).data_ptr() == address

    with torch.no_grad():
        p.mul_(3)  # an in-place edit
    assert _fresh(copies, p)

    p.data = torch.randn(16, 64)  # new storage, same version counter
    assert _fresh(copies, p)
    p.data = torch.randn(8, 64)  # another shape: a new copy
    assert _fresh(copies, p) and compute_copy(p, torch.bfloat16, copies).shape == (8, 64)


def test_bitsandbytes_8bit_adamw_steps_refresh_the_copies():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    copies = ComputeCopies()
    p = torch.nn.Parameter(torch.randn(64, 128))  # >= 4096 elements: 8-bit optimizer state
    optimizer = bnb.optim.AdamW8bit([p], lr=0.1)
    optimizer.register_step_post_hook(copies.step_taken)
    before = compute_copy(p, torch.bfloat16, copies).clone()
    p.grad = torch.randn_like(p)
    version = p._version
    optimizer.step()  # writes p through bitsandbytes' own kernel: no version counter sees it
    assert p._version == version  # why the optimizer hook is needed at all
    assert not torch.equal(compute_copy(p, torch.bfloat16, copies), before) and _fresh(copies, p)


def test_without_copies_and_for_tensors_that_are_not_parameters_every_use_casts():
    t = torch.randn(4, 8)
    copies = ComputeCopies()
    assert compute_copy(t, torch.bfloat16, copies) is not compute_copy(t, torch.bfloat16, copies)
    p = torch.nn.Parameter(torch.randn(4, 8))
    assert compute_copy(p, torch.bfloat16, None) is not compute_copy(p, torch.bfloat16, None)


def test_the_memory_plan_is_told_what_the_copies_will_take():
    copies = ComputeCopies()
    model = torch.nn.ModuleDict(
        {
            "lora_A": torch.nn.Linear(64, 16, bias=False),
            "lora_B": torch.nn.Linear(16, 64, bias=False),
            "head": torch.nn.Linear(64, 8),
        }
    )  # trainable, but never copied
    model.lora_B.weight.requires_grad_(False)
    assert copies.pending_bytes(model, 2) == 64 * 16 * 2  # lora_A only: B is frozen, head not LoRA
    compute_copy(model.lora_A.weight, torch.bfloat16, copies)
    assert copies.pending_bytes(model, 2) == 0  # made: now part of what is allocated
    assert copies.pending_bytes(model, 4) == 0  # nothing wider than float32


def test_the_trainer_keeps_copies_for_its_run_only(tmp_path):
    from helpers import FakeTokenizer, tiny_lora_model, token_rows

    from hizli.models.record import find_state
    from hizli.train.args import TrainingArguments
    from hizli.train.trainer import SFTTrainer

    model = tiny_lora_model()
    seen = []
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        optim="adamw_torch",
        save_strategy="no",
        disable_tqdm=True,
        report_to="none",
    )
    trainer = SFTTrainer(
        model=model,
        tokenizer=FakeTokenizer(),
        train_dataset=token_rows(8),
        args=args,
        max_seq_length=64,
        callbacks=[lambda e: seen.append(find_state(model).compute_copies)],
    )
    trainer.train()
    assert len(seen) == 2 and isinstance(seen[0], ComputeCopies) and seen[0] is seen[1]
    assert seen[0].steps == 2  # told of each optimizer step
    assert find_state(model).compute_copies is None  # another trainer's optimizer could change the weights


def test_an_optimizer_step_refreshes_every_copy_in_place_without_a_use():
    """What a CUDA graph of an offloaded layer reads: the copy at its address, current after each
    step although no code asks for it in between."""
    torch.manual_seed(0)
    copies = ComputeCopies()
    params = [torch.nn.Parameter(torch.randn(16, 64)) for _ in range(3)]
    held = [compute_copy(p, torch.bfloat16, copies) for p in params]  # as a capture would hold them
    optimizer = torch.optim.SGD(params, lr=0.5)
    optimizer.register_step_post_hook(copies.step_taken)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    for p, copy in zip(params, held):
        assert torch.equal(copy, p.detach().to(torch.bfloat16))
        assert compute_copy(p, torch.bfloat16, copies) is copy  # and the next use takes it as it is


def test_a_copy_first_asked_for_inside_a_graph_capture_is_not_kept(monkeypatch):
    """A capture records the cast without running it: a kept copy made there would hold garbage until
    the graph first replays, and for good if the capture fails and the layer runs eagerly. Copies
    made before the capture are read at their address, as the graph will at every replay."""
    from hizli.kernels import lora_casts

    torch.manual_seed(0)
    copies = ComputeCopies()
    before, during = torch.nn.Parameter(torch.randn(16, 64)), torch.nn.Parameter(torch.randn(16, 64))
    kept = compute_copy(before, torch.bfloat16, copies)
    monkeypatch.setattr(lora_casts, "_capturing", lambda weight: True)
    assert compute_copy(before, torch.bfloat16, copies) is kept
    cast = compute_copy(during, torch.bfloat16, copies)
    assert torch.equal(cast, during.detach().to(torch.bfloat16))
    assert compute_copy(during, torch.bfloat16, copies) is not cast  # cast again by every capture
    monkeypatch.setattr(lora_casts, "_capturing", lambda weight: False)
    eager = compute_copy(during, torch.bfloat16, copies)
    assert eager is not cast and compute_copy(during, torch.bfloat16, copies) is eager  # kept from here on
