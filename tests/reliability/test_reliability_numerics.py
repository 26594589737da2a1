"""Numerical faults: a NaN/inf loss or gradient never reaches the weights.

Faults are injected into the trainer's loss (``step.loss_sum``) at a chosen optimizer step: a NaN
or inf loss, or a finite loss whose backward yields NaN gradients. The weights and the optimizer
state (8-bit AdamW, the recipe's) are snapshotted after the step before, and compared bit for bit
with what is there after the faulty step.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

from hizli.train import optim, step as step_mod
from hizli.train.args import TrainingArguments
from hizli.train.batches import BatchPlan, Position
from hizli.train.trainer import NonFiniteLossError, SFTTrainer

from helpers import FakeTokenizer, tiny_lora_model, token_rows

pytestmark = pytest.mark.reliability("numerics")

ROWS = token_rows(24, seed=5, hi=16)
BAD_STEP = 3


class NaNGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


FAULTS = {
    "nan-loss": lambda loss: loss * float("nan"),
    "inf-loss": lambda loss: loss + float("inf"),
    "nan-grad": lambda loss: NaNGrad.apply(loss),
}


def _args(tmp_path, **kw):
    base = dict(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=6,
        learning_rate=5e-3,
        warmup_steps=1,
        optim="adamw_8bit",
        seed=3407,
        save_strategy="no",
        output_dir=str(tmp_path),
        disable_tqdm=True,
        padding_free=False,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _snapshot(model, optimizer):
    weights = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    return weights, copy.deepcopy(optimizer.state_dict())


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture
def rig(monkeypatch):
    """Builds a trainer whose loss is faulty at BAD_STEP and which keeps what the test needs."""
    made = {}
    real_build = optim.build_optimizer

    def build(params, args):
        made["optimizer"] = real_build(params, args)
        return made["optimizer"]

    monkeypatch.setattr(optim, "build_optimizer", build)
    real_loss = step_mod.loss_sum

    def make(tmp_path, fault: str, **kw):
        trainer = SFTTrainer(
            model=tiny_lora_model(),
            tokenizer=FakeTokenizer(),
            train_dataset=ROWS,
            args=_args(tmp_path, **kw),
            callbacks=[],
        )
        snapshots = {}

        def faulty_loss(model, batch, **kw):
            loss = real_loss(model, batch, **kw)
            return FAULTS[fault](loss) if trainer.state["global_step"] + 1 == BAD_STEP else loss

        def after_step(entry):
            snapshots[entry["step"]] = _snapshot(trainer.model, made["optimizer"])

        monkeypatch.setattr(step_mod, "loss_sum", faulty_loss)
        trainer.callbacks.append(after_step)
        return trainer, snapshots

    made["make"] = make
    return made


def _rows_of_step(n: int, args) -> list[int]:
    plan = BatchPlan(
        [len(r["input_ids"]) for r in ROWS],
        args.per_device_train_batch_size,
        args.gradient_accumulation_steps,
        args.seed,
    )
    for k, (micro, _, _) in enumerate(plan.steps(Position()), start=1):
        if k == n:
            return sorted(sum(micro, []))
    raise AssertionError


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("layout", ["padded", "padding-free"])
def test_a_fault_stops_the_step_before_the_weights_change(tmp_path, rig, fault, layout, figures):
    trainer, snapshots = rig["make"](tmp_path, fault, padding_free=layout == "padding-free")
    with pytest.raises(NonFiniteLossError) as e:
        trainer.train()
    message = str(e.value)
    what = "gradient norm" if fault == "nan-grad" else "loss"
    assert f"step {BAD_STEP}: the {what} is " in message and "the weights were not changed" in message
    rows = _rows_of_step(BAD_STEP, trainer.args)
    assert f"rows {rows} of the training set" in message, message
    assert "nan_policy='skip'" in message
    # nothing moved since the end of the step before
    weights, opt_state = snapshots[BAD_STEP - 1]
    now_weights, now_state = _snapshot(trainer.model, rig["optimizer"])
    assert weights.keys() == now_weights.keys()
    assert all(torch.equal(weights[k], now_weights[k]) for k in weights), "weights changed"
    assert _same(opt_state, now_state), "optimizer state changed"
    assert all(p.grad is None for p in trainer.model.parameters()), "the faulty gradients were kept"
    assert trainer.state["global_step"] == BAD_STEP - 1
    figures.add(faults=1, stopped_unchanged=1)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_nan_policy_skip_skips_the_step_and_goes_on(tmp_path, rig, fault, figures, caplog):
    trainer, snapshots = rig["make"](tmp_path, fault, nan_policy="skip")
    seen = {}
    real = step_mod.loss_sum

    def spy(model, batch, **kw):  # the weights at the start of the step after the skipped one
        if trainer.state["global_step"] + 1 == BAD_STEP + 1 and "after" not in seen:
            seen["after"] = _snapshot(trainer.model, rig["optimizer"])
        return real(model, batch, **kw)

    step_mod.loss_sum = spy  # monkeypatch (from the rig) restores the original after the test
    out = trainer.train()
    assert out.global_step == 6
    assert [e["step"] for e in out.log_history] == [1, 2, 4, 5, 6]
    weights, opt_state = snapshots[BAD_STEP - 1]
    assert all(torch.equal(weights[k], seen["after"][0][k]) for k in weights), "the skipped step changed weights"
    # the schedule moves on (a skipped step still counts), the optimizer's moments and step count do not
    assert _same(opt_state["state"], seen["after"][1]["state"]), "the skipped step changed the optimizer state"
    # and training went on: the steps after it did change the weights, with finite losses
    final, _ = snapshots[6]
    assert any(not torch.equal(weights[k], final[k]) for k in weights)
    assert all(e["loss"] == e["loss"] for e in out.log_history)
    figures.add(faults=1, skipped_continued=1)


def test_a_run_whose_every_label_is_masked_refuses_to_start(tmp_path, figures, smol_tokenizer):
    masked = [{"input_ids": r["input_ids"], "labels": [-100] * len(r["input_ids"])} for r in ROWS]
    with pytest.raises(ValueError, match=r"none of the 24 rows has a trained token .*Every label is -100"):
        SFTTrainer(
            model=tiny_lora_model(), tokenizer=FakeTokenizer(), train_dataset=masked, args=_args(tmp_path)
        ).train()
    # rendered text trained on assistant turns only, with a template whose markers never occur
    from hizli.data.templates import get_chat_template

    tok = get_chat_template(copy.copy(smol_tokenizer), "smollm2", map_eos_token=False, warn=False)
    texts = [{"text": f"User: question {i}\nBot: answer {i}"} for i in range(8)]
    trainer = SFTTrainer(
        model=tiny_lora_model(), tokenizer=tok, train_dataset=texts, args=_args(tmp_path), train_on="assistant"
    )
    with pytest.raises(ValueError, match=r"none of the 8 rows has a trained token") as e:
        trainer.train()
    assert re.search(r"8 skipped \(8 no-trained-token\)", str(e.value))
    figures.add(all_masked_refused=2)
