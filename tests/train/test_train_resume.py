"""Checkpoints and resume: a resumed run logs the same losses and ends with the same adapter as an
uninterrupted one; Ctrl-C saves a checkpoint; kill -9 during a checkpoint write loses nothing else."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from hizli.train import checkpoint
from hizli.train.args import TrainingArguments
from hizli.train.trainer import SFTTrainer, TrainingInterrupted

from helpers import FakeTokenizer, tiny_lora_model, token_rows

ROWS = token_rows(40, seed=3)


def _args(out, **kw):
    base = dict(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=6,
        learning_rate=5e-3,
        warmup_steps=2,
        lr_scheduler_type="linear",
        optim="adamw_8bit",
        weight_decay=0.01,
        seed=3407,
        save_steps=3,
        output_dir=str(out),
        disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _adapter(model):
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def test_resume_continues_with_the_same_losses_and_weights(tmp_path):
    straight_model = tiny_lora_model()
    straight = SFTTrainer(
        model=straight_model,
        tokenizer=FakeTokenizer(),
        train_dataset=ROWS,
        args=_args(tmp_path / "straight", save_strategy="no"),
    ).train()
    expected = [e["loss"] for e in straight.log_history]
    assert len(expected) == 6

    # Ctrl-C during step 3: the step finishes, a checkpoint is saved, training stops with a message
    def interrupt(entry):
        if entry["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    first = SFTTrainer(
        model=tiny_lora_model(),
        tokenizer=FakeTokenizer(),
        train_dataset=ROWS,
        args=_args(tmp_path / "run", save_steps=100),
        callbacks=[interrupt],
    )
    with pytest.raises(TrainingInterrupted, match="resume") as stopped:
        first.train()
    assert stopped.value.checkpoint == tmp_path / "run" / "checkpoint-3"
    # fp32 on the CPU: the same run to the last bit in principle; 1e-6 (~8 ulp of a loss near 6) leaves room
    # for a different summation order after a reload, and is far below what a wrong resume moves
    assert [e["loss"] for e in first.state["log_history"]] == pytest.approx(expected[:3], abs=1e-6)

    # a fresh process builds a fresh model: same base, LoRA values that the checkpoint must replace
    resumed_model = tiny_lora_model(lora_seed=99)
    resumed = SFTTrainer(
        model=resumed_model, tokenizer=FakeTokenizer(), train_dataset=ROWS, args=_args(tmp_path / "run", save_steps=100)
    ).train(resume_from_checkpoint=True)
    losses = [e["loss"] for e in resumed.log_history]
    assert losses == pytest.approx(expected, abs=1e-6)
    a, b = _adapter(straight_model), _adapter(resumed_model)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)  # fp32 adapters, as the losses above
    # metrics.jsonl reads as one run: steps 1..6 once each
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_save_total_limit_rotates_and_checkpoints_verify(tmp_path):
    trainer = SFTTrainer(
        model=tiny_lora_model(),
        tokenizer=FakeTokenizer(),
        train_dataset=ROWS,
        args=_args(tmp_path, save_steps=1, save_total_limit=2),
    )
    trainer.train()
    kept = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert kept == ["checkpoint-5", "checkpoint-6"]
    checkpoint.verify(tmp_path / "checkpoint-6")
    assert not list(tmp_path.glob(".checkpoint-*"))
    # the adapter inside a checkpoint is a plain PEFT adapter
    assert (tmp_path / "checkpoint-6" / "adapter_config.json").is_file()


def test_corrupted_checkpoint_is_refused(tmp_path):
    SFTTrainer(
        model=tiny_lora_model(), tokenizer=FakeTokenizer(), train_dataset=ROWS, args=_args(tmp_path, max_steps=3)
    ).train()
    weights = tmp_path / "checkpoint-3" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    trainer = SFTTrainer(
        model=tiny_lora_model(), tokenizer=FakeTokenizer(), train_dataset=ROWS, args=_args(tmp_path, max_steps=6)
    )
    with pytest.raises(checkpoint.CheckpointError, match="corrupted: adapter_model.safetensors"):
        trainer.train(resume_from_checkpoint=True)


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from helpers import FakeTokenizer, tiny_lora_model, token_rows
    from hizli.train import checkpoint
    from hizli.train.args import TrainingArguments
    from hizli.train.trainer import SFTTrainer
    real_save = checkpoint.save
    def slow_save(out, step, *a, **k):
        if step == 4:  # make step 4's write slow so the parent can kill us in the middle of it
            orig = checkpoint.rng_state
            def stalled():
                print("WRITING", flush=True)
                time.sleep(30)
                return orig()
            checkpoint.rng_state = stalled
        return real_save(out, step, *a, **k)
    checkpoint.save = slow_save
    import hizli.train.trainer as t
    t.checkpoint.save = slow_save
    args = TrainingArguments(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=6,
                             learning_rate=5e-3, warmup_steps=2, optim="adamw_8bit", weight_decay=0.01, seed=3407,
                             save_steps=1, output_dir={out!r}, disable_tqdm=True)  # _args' recipe: resumable
    SFTTrainer(model=tiny_lora_model(), tokenizer=FakeTokenizer(), train_dataset=token_rows(40, seed=3),
               args=args).train()
""")


def test_kill_9_during_a_checkpoint_write_keeps_the_last_complete_one(tmp_path):
    out = tmp_path / "run"
    script = _KILL_SCRIPT.format(tests=str(Path(__file__).parent.parent), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            if "WRITING" in line:
                break
        else:
            pytest.fail("the training subprocess never reached step 4's checkpoint")
        assert list(out.glob(".checkpoint-4.tmp-*")), "step 4's checkpoint should be half-written now"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert checkpoint.latest(out).name == "checkpoint-3"
    checkpoint.verify(out / "checkpoint-3")
    # and it resumes: steps 4..6 run
    args = _args(out, save_steps=100)
    stats = SFTTrainer(model=tiny_lora_model(), tokenizer=FakeTokenizer(), train_dataset=ROWS, args=args).train(
        resume_from_checkpoint=True
    )
    assert [e["step"] for e in stats.log_history] == [1, 2, 3, 4, 5, 6]
