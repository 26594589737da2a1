"""Gradient accumulation is exact: the loss of an optimizer step is divided by the trained-token
count of the whole step, so how its rows are split into micro-batches does not matter."""

from __future__ import annotations

import pytest
import torch

from hizli.train.args import TrainingArguments
from hizli.train.trainer import SFTTrainer

from helpers import FakeTokenizer, tiny_lora_model, token_rows


def _train(rows, batch, accum, steps=3, padding_free=False, merge=False, tmp_path=None, buckets=None):
    model = tiny_lora_model(torch.float64)
    args = TrainingArguments(
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        max_steps=steps,
        learning_rate=1e-2,
        optim="adamw_torch",
        warmup_steps=0,
        lr_scheduler_type="constant",
        save_strategy="no",
        seed=0,
        max_grad_norm=0.0,
        output_dir=str(tmp_path),
        padding_free=padding_free,
        merge_micro_batches=merge,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, tokenizer=FakeTokenizer(), train_dataset=rows, args=args)
    trainer.token_buckets = buckets
    stats = trainer.train()
    weights = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    return [e["loss"] for e in stats.log_history], weights


def _close(a, b, rel=1e-9):
    la, wa = a
    lb, wb = b
    assert la == pytest.approx(lb, rel=rel)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=rel, atol=1e-12), k


def test_two_by_four_equals_eight_by_one_and_one_by_eight(tmp_path):
    rows = token_rows(24)
    eight_by_one = _train(rows, 8, 1, tmp_path=tmp_path)
    _close(_train(rows, 2, 4, tmp_path=tmp_path), eight_by_one)
    _close(_train(rows, 1, 8, tmp_path=tmp_path), eight_by_one)
    # layouts: padding-free, and padding-free with the step's micro-batches run as one
    _close(_train(rows, 2, 4, padding_free=True, tmp_path=tmp_path), eight_by_one)
    _close(_train(rows, 2, 4, padding_free=True, merge=True, tmp_path=tmp_path), eight_by_one)
    # micro-batches padded to a bucket length by an untrained filler sequence (the GPU default)
    _close(_train(rows, 2, 4, padding_free=True, tmp_path=tmp_path, buckets=True), eight_by_one)


def test_per_micro_batch_averaging_would_differ(tmp_path):
    """The usual mistake (mean per micro-batch, then / accumulation steps) changes the update when
    micro-batches carry different token counts: this check proves the test above can fail."""
    from hizli.data.collate import DataCollatorForSeq2Seq
    from hizli.train import step as step_mod
    from hizli.train.batches import BatchPlan, Position

    rows = token_rows(24)
    exact = _train(rows, 8, 1, tmp_path=tmp_path)
    model = tiny_lora_model(torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    plan = BatchPlan([len(r["input_ids"]) for r in rows], 2, 4, seed=0)
    collate = DataCollatorForSeq2Seq(FakeTokenizer())
    losses = []
    for i, (micro, _, _) in enumerate(plan.steps(Position())):
        if i == 3:
            break
        total = 0.0
        for m in micro:
            b = step_mod.to_device(collate([rows[j] for j in m]), torch.device("cpu"))
            mean = step_mod.loss_sum(model, b) / b.n_trained
            (mean / len(micro)).backward()
            total += float(mean.detach()) / len(micro)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    wrong_weights = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    assert losses[0] != pytest.approx(exact[0][0], rel=1e-6)
    assert any(not torch.allclose(wrong_weights[k], exact[1][k], rtol=1e-6) for k in wrong_weights)
