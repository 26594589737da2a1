"""The loop's promises: schedules as transformers defines them, eval loss, what a run writes, and the
CPU's answer to the recipe's fp16 line."""

from __future__ import annotations

import json

import pytest
import torch

from hizli.train import optim
from hizli.train.args import TrainingArguments
from hizli.train.trainer import SFTTrainer

from helpers import FakeTokenizer, tiny_lora_model, token_rows


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "constant_with_warmup"])
def test_schedules_match_transformers(kind):
    from transformers import get_scheduler

    def lrs(make):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=2e-4)
        sched = make(opt)
        out = []
        for _ in range(20):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    args = TrainingArguments(lr_scheduler_type=kind, warmup_steps=5, learning_rate=2e-4, max_steps=20)
    ours = lrs(lambda o: optim.build_scheduler(o, args, 20))
    theirs = lrs(lambda o: get_scheduler(kind, o, num_warmup_steps=5, num_training_steps=20))
    assert ours == pytest.approx(theirs, abs=1e-12)  # float64 schedule arithmetic in both: rounding only


def test_eval_loss_is_the_mean_over_trained_tokens(tmp_path):
    train, held_out = token_rows(24, seed=1), token_rows(6, seed=2)
    args = TrainingArguments(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=4,
        learning_rate=1e-3,
        optim="adamw_torch",
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=4,
        save_strategy="no",
        output_dir=str(tmp_path),
        disable_tqdm=True,
    )
    model = tiny_lora_model()
    trainer = SFTTrainer(model=model, tokenizer=FakeTokenizer(), train_dataset=train, eval_dataset=held_out, args=args)
    stats = trainer.train()
    evals = [e for e in stats.log_history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4]
    # by hand: summed token losses over every held-out row / trained tokens
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for row in held_out:
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor([row["labels"]])
            logits = model(input_ids=ids).logits[0, :-1]
            target = labels[0, 1:]
            total += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum", ignore_index=-100))
            count += int((target != -100).sum())
    # fp32, padded batches against one row at a time: another summation order
    assert evals[-1]["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert stats.metrics["eval_loss"] == evals[-1]["eval_loss"]


def test_a_run_writes_its_metrics_plot_and_recipe(tmp_path):
    args = TrainingArguments(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=3,
        save_strategy="no",
        output_dir=str(tmp_path),
        disable_tqdm=True,
    )
    stats = SFTTrainer(
        model=tiny_lora_model(), tokenizer=FakeTokenizer(), train_dataset=token_rows(8), args=args
    ).train()
    entries = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries] == [1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_reserved_gib"):
        assert all(key in e for e in entries), key
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lora:" in (tmp_path / "recipe.yaml").read_text()
    for key in ("train_runtime", "train_loss", "train_tokens_per_second", "peak_reserved_gib"):
        assert key in stats.metrics


def test_the_recipes_fp16_line_on_a_cpu_says_what_happens_once(tmp_path, capsys, monkeypatch):
    from hizli import _log

    monkeypatch.setattr(_log, "_said", set())
    args = TrainingArguments(max_steps=2, fp16=True, save_strategy="no", output_dir=str(tmp_path), disable_tqdm=True)
    stats = SFTTrainer(
        model=tiny_lora_model(), tokenizer=FakeTokenizer(), train_dataset=token_rows(8), args=args
    ).train()
    assert len(stats.log_history) == 2
    assert capsys.readouterr().err.count("fp16=True was asked for, but there is no GPU") == 1
