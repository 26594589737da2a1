"""A checkpoint belongs to one run: resume never continues another run's or another recipe's
checkpoint, the last step is always saved, a fresh run does not leave an earlier run where resume
would find it, and resuming with nothing left to train changes nothing (issue 16, point 1)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from hizli.train import checkpoint, runs
from hizli.train.args import TrainingArguments
from hizli.train.trainer import SFTTrainer

from helpers import FakeTokenizer, tiny_lora_model, token_rows

ROOT = Path(__file__).resolve().parents[2]
ROWS = token_rows(24, seed=5)


def _train(out, resume=None, **kw):
    args = dict(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=5e-3,
        warmup_steps=1,
        seed=3407,
        save_steps=100,
        output_dir=str(out),
        disable_tqdm=True,
    )
    args.update(kw)
    trainer = SFTTrainer(
        model=tiny_lora_model(), tokenizer=FakeTokenizer(), train_dataset=ROWS, args=TrainingArguments(**args)
    )
    return trainer.train(resume_from_checkpoint=resume)


def _metric_steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_the_last_step_is_saved_with_the_run_it_belongs_to(tmp_path):
    _train(tmp_path, max_steps=3, save_steps=100)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-3"]
    run = runs.run_of(tmp_path / "checkpoint-3")
    assert run["started"] and len(run["recipe_hash"]) == 12 and run["recipe"]["train"]["learning_rate"] == 5e-3
    _train(tmp_path / "off", save_strategy="no")
    assert checkpoint.list_checkpoints(tmp_path / "off") == []


def test_a_fresh_run_sets_the_earlier_one_aside_and_resume_continues_only_its_own(tmp_path, capsys):
    _train(tmp_path, max_steps=4, save_steps=2, learning_rate=2e-2)  # checkpoints 2 and 4
    short = _train(tmp_path, max_steps=1)  # a fresh, shorter run of the same recipe
    (aside,) = (tmp_path / runs.EARLIER_RUNS).iterdir()
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-2", "checkpoint-4", "loss.png", "metrics.jsonl"]
    assert "of an earlier run" in capsys.readouterr().err
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert _metric_steps(tmp_path) == [1]

    done = _train(tmp_path, resume=True, max_steps=1)  # nothing left: no step, no new line
    assert done.global_step == done.start_step == 1 and _metric_steps(tmp_path) == [1]
    assert "nothing left to train" in capsys.readouterr().err

    extended = _train(tmp_path, resume=True, max_steps=3)  # raise max_steps to extend it
    err = capsys.readouterr().err
    assert f"resuming {tmp_path / 'checkpoint-1'} (step 1) of the run started" in err and "steps 2-3" in err
    assert [e["step"] for e in extended.log_history] == [1, 2, 3] == _metric_steps(tmp_path)
    straight = _train(tmp_path / "straight", max_steps=3)  # the short run's recipe, uninterrupted
    # resume restores the state exactly (the same tolerance as tests/train/test_train_resume.py)
    assert [e["loss"] for e in extended.log_history] == pytest.approx(
        [e["loss"] for e in straight.log_history], abs=1e-6
    )
    assert extended.log_history[0] == short.log_history[0]
    assert runs.run_of(tmp_path / "checkpoint-3")["started"] == runs.run_of(tmp_path / "checkpoint-1")["started"]


def test_resume_refuses_a_checkpoint_of_another_recipe_or_without_a_run_record(tmp_path):
    _train(tmp_path, max_steps=2)
    with pytest.raises(checkpoint.CheckpointError, match=r"belongs to another recipe .*learning_rate 0\.005 -> 0\.001"):
        _train(tmp_path, resume=True, max_steps=4, learning_rate=1e-3)
    _train(tmp_path, resume=True, max_steps=3, save_steps=1, logging_steps=2)  # only allowed settings changed

    state_file = tmp_path / "checkpoint-3" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["run"]  # as an older hizli wrote it
    state_file.write_text(json.dumps(state))
    sums = json.loads((tmp_path / "checkpoint-3" / "checksums.json").read_text())
    sums["trainer_state.json"] = hashlib.sha256(state_file.read_bytes()).hexdigest()
    (tmp_path / "checkpoint-3" / "checksums.json").write_text(json.dumps(sums))
    with pytest.raises(checkpoint.CheckpointError, match="has no run record"):
        _train(tmp_path, resume=True, max_steps=4)


def _cli(capsys, *args: str) -> tuple[int, str]:
    from hizli.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_issue_sequence_on_the_command_line(tmp_path, monkeypatch, capsys, tiny_model_dir):
    """Issue 16's sequence, scaled down: a demo-like run with checkpoints (here at 2 and 4, the demo's 10
    and 20), a shorter run over it with the recipe's overwrite: true, then --resume."""
    monkeypatch.chdir(tmp_path)
    recipe = str(ROOT / "configs" / "demo-cpu.yaml")
    fast = [
        "--set",
        f"model.name={tiny_model_dir}",
        "--set",
        "model.load_in_4bit=false",
        "--set",
        "data.max_rows=16",
        "--set",
        "model.max_seq_length=64",
        "--set",
        "chat.max_new_tokens=2",
    ]
    out = tmp_path / "outputs" / "demo-cpu"
    adapter = out / "lora_model" / "adapter_model.safetensors"

    code, _ = _cli(capsys, "train", recipe, *fast, "--set", "train.max_steps=4", "--set", "train.save_steps=2")
    assert code == 0 and [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    demo_adapter = _sha(adapter)

    code, text = _cli(capsys, "train", recipe, *fast, "--set", "train.max_steps=1")
    assert code == 0 and "removing the earlier run's checkpoint-2, checkpoint-4" in text
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-1"]  # its last step, resumable
    assert _metric_steps(out) == [1]
    short_adapter = _sha(adapter)
    assert short_adapter != demo_adapter
    for name in ("metrics.jsonl", "loss.png", "recipe.yaml"):
        assert f"  {name}" in text  # the output names the run's files

    code, text = _cli(capsys, "train", recipe, *fast, "--set", "train.max_steps=1", "--resume")
    started = runs.run_of(out / "checkpoint-1")["started"]
    assert (
        code == 0
        and f"nothing left to train: outputs/demo-cpu/checkpoint-1 (step 1) of the run started {started}" in text
        and "outputs/demo-cpu/lora_model/ is left as it was" in text
    )
    assert _sha(adapter) == short_adapter and _metric_steps(out) == [1]

    code, text = _cli(capsys, "train", recipe, *fast, "--set", "train.max_steps=2", "--resume")
    assert code == 0 and f"resuming outputs/demo-cpu/checkpoint-1 (step 1) of the run started {started}" in text
    assert _metric_steps(out) == [1, 2] and _sha(adapter) not in (short_adapter, demo_adapter)
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]

    code, text = _cli(capsys, "train", recipe, *fast, "--set", "train.max_steps=3", "--set", "lora.r=8", "--resume")
    assert code == 2 and "belongs to another recipe" in text and "lora.r 16 -> 8" in text
