"""Evaluation: the trainer's eval and ``hizli eval`` report the same loss (the training loss, fused, no
full logits) and its perplexity; a trained adapter scores better on held-out rows than its base; bad
input is refused before any model loads, naming the setting.

The fast tests train a tiny random Llama (with SmolLM2's real tokenizer and template) on the packaged
sample. The embedded model's version of the same check is marked ``slow``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from hizli.train.eval_run import prompt_and_reference, run_eval
from hizli.train.evaluate import evaluate_loss

from helpers import FakeTokenizer, tiny_lora_model, token_rows

ROOT = Path(__file__).resolve().parents[2]
SEQ = 256
EVAL_ROWS = 8


def _held_out_file(rows, path: Path) -> Path:
    path.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A LoRA on the tiny model trained for 8 steps on 40 sample rows, evaluated on 8 held-out rows."""
    from hizli.api import FastLanguageModel, SFTTrainer, TrainingArguments, get_chat_template
    from hizli.data.load import load_conversations
    from hizli.data.sample import sample_path

    tmp = tmp_path_factory.mktemp("eval")
    rows = load_conversations(sample_path("sharegpt"), max_rows=48)
    train_rows, eval_rows = rows[: len(rows) - EVAL_ROWS], rows[len(rows) - EVAL_ROWS :]
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_model_dir, max_seq_length=SEQ, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3407)
    tokenizer = get_chat_template(tokenizer, chat_template="smollm2")
    args = TrainingArguments(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=8,
        learning_rate=1e-2,
        warmup_steps=0,
        optim="adamw_torch",
        eval_strategy="steps",
        eval_steps=4,
        per_device_eval_batch_size=3,
        save_strategy="no",
        output_dir=str(tmp / "run"),
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        tokenizer=tokenizer,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        max_seq_length=SEQ,
        args=args,
    )
    stats = trainer.train()
    adapter = tmp / "lora_model"
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    return {
        "stats": stats,
        "adapter": str(adapter),
        "run": tmp / "run",
        "trainer": trainer,
        "held_out": _held_out_file(eval_rows, tmp / "held_out.jsonl"),
    }


def test_trainer_eval_reports_loss_and_perplexity_in_log_metrics_and_plot(trained):
    stats = trained["stats"]
    evals = [e for e in stats.log_history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [4, 8]
    for e in evals:
        assert e["eval_perplexity"] == pytest.approx(math.exp(e["eval_loss"]), rel=1e-12)
        assert e["eval_rows"] == EVAL_ROWS and e["eval_tokens"] > 0
    assert stats.metrics["eval_loss"] == evals[-1]["eval_loss"]
    assert stats.metrics["eval_perplexity"] == evals[-1]["eval_perplexity"]
    lines = [json.loads(x) for x in (trained["run"] / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines if "eval_loss" in e] == [4, 8]
    assert [e["step"] for e in lines if "loss" in e] == list(range(1, 9))
    assert (trained["run"] / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_hizli_eval_gives_the_trainers_eval_loss(trained):
    """Acceptance 6, first half: same loss on the held-out file as the trainer's last eval (fp32 CPU)."""
    report = run_eval(trained["adapter"], str(trained["held_out"]), max_seq_length=SEQ)
    last = [e for e in trained["stats"].log_history if "eval_loss" in e][-1]
    # rel 1e-6: the bound for fp32 on a CPU (same rows, same batches, same fused loss)
    assert report.result.loss == pytest.approx(last["eval_loss"], rel=1e-6)
    assert report.result.trained_tokens == last["eval_tokens"]
    assert report.result.rows == EVAL_ROWS


def test_responses_only_scores_only_the_assistant_turns(trained):
    every = run_eval(trained["adapter"], str(trained["held_out"]), max_seq_length=SEQ)
    answers = run_eval(trained["adapter"], str(trained["held_out"]), max_seq_length=SEQ, train_on="assistant")
    assert 0 < answers.result.trained_tokens < every.result.trained_tokens
    assert answers.result.tokens == every.result.tokens  # the same rows, fewer of their tokens scored


def test_a_trained_adapter_has_lower_held_out_perplexity_than_its_base(trained, tiny_model_dir):
    """Acceptance 6, second half, on the tiny model (the embedded model's version is marked slow)."""
    base = run_eval(tiny_model_dir, str(trained["held_out"]), template="smollm2", max_seq_length=SEQ)
    tuned = run_eval(trained["adapter"], str(trained["held_out"]), max_seq_length=SEQ)
    assert base.result.trained_tokens == tuned.result.trained_tokens  # the same tokens scored
    assert tuned.result.perplexity < base.result.perplexity


def test_eval_json_and_samples_are_written(trained, tmp_path, capsys):
    from hizli.cli import main

    out = tmp_path / "eval"
    argv = [
        "eval",
        trained["adapter"],
        "--data",
        str(trained["held_out"]),
        "--max-seq-length",
        str(SEQ),
        "--json",
        "--generate",
        "2",
        "--max-new-tokens",
        "4",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["perplexity"] == pytest.approx(math.exp(printed["loss"]))
    assert json.loads((out / "eval.json").read_text())["loss"] == printed["loss"]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2
    first = json.loads(trained["held_out"].read_text().splitlines()[0])["messages"]
    assert samples[0]["prompt"] == prompt_and_reference(first)[0]
    assert all(isinstance(s["answer"], str) for s in samples)
    assert main(argv) == 2  # the files exist now: refused without --force, before loading anything
    assert "--force" in capsys.readouterr().err


def test_eval_loss_does_not_depend_on_the_batch_size():
    from hizli.data.collate import DataCollatorForSeq2Seq, PaddingFreeCollator

    model, rows = tiny_lora_model(), token_rows(7, seed=3)
    one = evaluate_loss(model, rows, PaddingFreeCollator(FakeTokenizer()), batch_size=1)
    padded = evaluate_loss(model, rows, DataCollatorForSeq2Seq(FakeTokenizer()), batch_size=3)
    assert one.trained_tokens == padded.trained_tokens and one.rows == 7
    assert one.loss == pytest.approx(padded.loss, rel=1e-5)  # fp32 sums in a different order
    assert model.training  # put back as it was


def test_eval_strategy_epoch_evaluates_at_each_epoch_end(tmp_path):
    from hizli.train.args import TrainingArguments
    from hizli.train.trainer import SFTTrainer

    args = TrainingArguments(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        num_train_epochs=2,
        max_steps=-1,
        eval_strategy="epoch",
        save_strategy="no",
        output_dir=str(tmp_path),
        disable_tqdm=True,
        optim="adamw_torch",
    )
    stats = SFTTrainer(
        model=tiny_lora_model(),
        tokenizer=FakeTokenizer(),
        train_dataset=token_rows(6),
        eval_dataset=token_rows(3, seed=5),
        args=args,
    ).train()
    assert [e["step"] for e in stats.log_history if "eval_loss" in e] == [3, 6]


# ---------------------------------------------------------------- bad input, refused before loading
@pytest.fixture()
def good_file(tmp_path):
    return _held_out_file(
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}],
        tmp_path / "good.jsonl",
    )


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "hizli.cli", "eval", *argv], capture_output=True, text=True)


@pytest.mark.parametrize(
    "content, needle", [("", "no conversations"), ("{not json\n", "unusable"), ('{"conversations": []}\n', "unusable")]
)
def test_bad_data_files_are_refused_naming_data(tmp_path, content, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(ValueError, match=f"--data {bad}.*{needle}"):
        run_eval("smollm2-135m-instruct", str(bad))


def test_missing_paths_and_unknown_template_are_named(tmp_path, good_file):
    with pytest.raises(FileNotFoundError, match="--data .*no such file"):
        run_eval("smollm2-135m-instruct", str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="PATH .*lora_nope.*no such"):
        run_eval(str(tmp_path / "lora_nope"), str(good_file))
    with pytest.raises(ValueError, match="--template 'smollm3'.*did you mean"):
        run_eval("smollm2-135m-instruct", str(good_file), template="smollm3")
    with pytest.raises(ValueError, match="--max-seq-length"):
        run_eval("smollm2-135m-instruct", str(good_file), max_seq_length=0)


def test_cli_bad_input_exits_2_with_one_line(tmp_path, good_file, capsys):
    from hizli.cli import main

    assert main(["eval", str(tmp_path / "missing_adapter"), "--data", str(good_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hizli: error: PATH") and "missing_adapter" in err


# ---------------------------------------------------------------- the embedded model (slow)
@pytest.mark.slow
def test_embedded_model_trained_on_the_sample_beats_its_base_on_held_out_rows(tmp_path):
    """Acceptance 6 on the real model: `hizli train` the CPU demo briefly (fp32 base, short rows, a
    higher learning rate without warmup) with held-out rows and eval, then `hizli eval` the adapter
    (same loss as the trainer's eval) and the base (higher perplexity)."""
    from hizli.data.load import load_conversations
    from hizli.data.sample import sample_path

    out, adapter, held = tmp_path / "out", tmp_path / "lora_model", tmp_path / "held_out.jsonl"
    steps, eval_rows, seq = 4, 12, 256
    settings = {
        "train.output_dir": out,
        "output.adapter_dir": adapter,
        "train.max_steps": steps,
        "data.eval_rows": eval_rows,
        "train.eval_strategy": "steps",
        "train.eval_steps": steps,
        "train.save_strategy": "'no'",
        "chat.prompt": "",
        "model.load_in_4bit": "false",
        "model.max_seq_length": seq,
        "train.gradient_accumulation_steps": 2,
        "train.warmup_steps": 0,
        "train.learning_rate": "1.0e-3",  # YAML reads a bare 1e-3 as text
    }
    overrides = [x for k, v in settings.items() for x in ("--set", f"{k}={v}")]
    train = subprocess.run(
        [sys.executable, "-m", "hizli.cli", "train", str(ROOT / "configs" / "demo-cpu.yaml"), *overrides],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert [e["step"] for e in evals] == [steps]
    assert f"step {steps}: eval_loss" in train.stdout + train.stderr
    rows = load_conversations(sample_path("sharegpt"))
    _held_out_file(rows[len(rows) - eval_rows :], held)

    def ev(*argv):
        run = _cli(*argv, "--data", str(held), "--max-seq-length", str(seq), "--json")
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(run.stdout)

    tuned = ev(str(adapter))
    base = ev("smollm2-135m-instruct", "--template", "smollm2")
    assert tuned["loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-6)  # the bound, fp32 CPU
    assert tuned["trained_tokens"] == base["trained_tokens"] == evals[-1]["eval_tokens"]
    print(
        f"held-out perplexity: base {base['perplexity']:.4f}, trained {tuned['perplexity']:.4f} "
        f"({eval_rows} rows, {tuned['trained_tokens']} tokens, {steps} steps)"
    )
    assert tuned["perplexity"] < base["perplexity"]
