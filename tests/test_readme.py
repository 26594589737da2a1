"""The README's commands work as written after ``./scripts/demo`` (issue 16, point 2).

Both tests read their code from README.md itself, so they fail when the README drifts:

- the "The recipe on the command line" block runs line by line, in order, in a fresh folder after a
  demo-like run. Speed-only settings are appended to each command (a few short rows, fewer steps,
  shorter answers); the commands themselves are as written. Two lines are skipped: `hizli train
  configs/reference.yaml` (the recipe itself: a GPU and the Hugging Face Hub) and `hizli bench`
  (it measures a GPU); plain `pytest` has neither.
- the "The recipe in Python" block runs verbatim as a script, offline, on the embedded model.

Both are ``slow`` (the first loads and trains the embedded model three times and exports it, the
second trains it for 5 steps of 2 x 4 rows: minutes on a 2-core CPU); run them with
``pytest -m slow tests/test_readme.py``. ``test_the_cli_block_parses_and_uses_the_demo_paths`` is fast
and guards the block's shape in every plain ``pytest`` run.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
NEEDS_A_GPU = ("configs/reference.yaml", "hizli bench")
# appended to every `hizli train` line: a few short rows (speed only; the same for every run, so the
# recipe a checkpoint records matches the one that resumes it)
FAST_TRAIN = ["--set", "data.max_rows=16", "--set", "model.max_seq_length=64", "--set", "chat.max_new_tokens=8"]


def readme_block(heading: str, language: str) -> str:
    """The first ``language`` code block after the README heading ``heading``."""
    start = README.index(f"\n## {heading}\n")
    found = re.compile(rf"```{language}\n(.*?)```", re.S).search(README, start)
    assert found is not None, f"README has no {language} block under '## {heading}'"
    return found.group(1)


def cli_commands() -> list[list[str]]:
    block = readme_block("The recipe on the command line", "bash")
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def _run(args: list[str], cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    assert args[0] == "hizli", args
    out = subprocess.run(
        [sys.executable, "-m", "hizli.cli", *args[1:]],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, f"{shlex.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _repository_copy(tmp_path: Path) -> Path:
    """A fresh folder that looks like the repository root to the README's commands."""
    for name in ("configs", "src"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def test_the_cli_block_parses_and_uses_the_demo_paths():
    commands = cli_commands()
    assert len(commands) >= 8 and all(c[0] == "hizli" for c in commands)
    adapter_users = [c for c in commands if c[1] in ("chat", "export")]
    assert adapter_users and all(c[2] == "outputs/demo-cpu/lora_model" for c in adapter_users)
    assert ["train", "configs/demo-cpu.yaml", "--resume"] in [c[1:] for c in commands]
    assert "/exported/" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.slow
def test_every_cli_command_of_the_readme_runs_after_the_demo(tmp_path):
    root = _repository_copy(tmp_path)
    demo = _run(
        [
            "hizli",
            "train",
            "configs/demo-cpu.yaml",
            *FAST_TRAIN,
            "--set",
            "train.max_steps=2",
            "--set",
            "train.save_steps=1",
        ],
        root,
    )  # as scripts/demo runs it, shorter
    assert (root / "outputs" / "demo-cpu" / "lora_model" / "adapter_model.safetensors").is_file(), demo.stdout
    steps = iter(["2", "3"])  # the README's max_steps=5, then the recipe's 20 when resuming
    ran = []
    for args in cli_commands():
        line = shlex.join(args)
        if any(marker in line for marker in NEEDS_A_GPU):
            continue
        extra: list[str] = []
        if args[1] == "train":
            extra = FAST_TRAIN + ["--set", f"train.max_steps={next(steps)}"]
        elif args[1] == "chat":
            extra = ["--max-new-tokens", "16"]
        out = _run(args + extra, root, stdin="What is 2+2?\n/exit\n" if args[1] == "chat" else None)
        ran.append((args, out))
    text = {shlex.join(a): o.stdout + o.stderr for a, o in ran}
    train_short, resume = [t for line, t in text.items() if line.startswith("hizli train")]
    assert "removing the earlier run's checkpoint-1, checkpoint-2" in train_short
    assert train_short.count("data: 16 rows in") == 1  # the data summary is said once
    assert "resuming outputs/demo-cpu/checkpoint-2 (step 2) of the run started" in resume
    assert "in outputs/demo-cpu/:" in resume and "loss.png" in resume and "recipe.yaml" in resume
    assert any(p.suffix == ".gguf" for p in (root / "exported").iterdir())
    assert len(ran) == len(cli_commands()) - len(NEEDS_A_GPU)


@pytest.mark.slow
def test_the_python_example_runs_as_written_offline(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_block("The recipe in Python", "python"), encoding="utf-8")
    out = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=3600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert (tmp_path / "lora_model" / "adapter_model.safetensors").is_file()
    said = out.stdout + out.stderr
    assert said.count("CPU (no GPU): memory figures") + said.count("Max memory =") == 1  # memory_report() once
    answer = out.stdout.split("for training % of")[-1].split("\n", 1)[-1].strip()
    # the recipe's TextStreamer shows special tokens, so the end-of-turn token may close the answer
    junk = ("Cutting Knowledge", "start_header_id", "<|im_start|>", "<|begin_of_text|>")
    assert answer and not any(j in answer for j in junk), answer
    assert re.search(r"\d", answer) and len(answer.split()) >= 3, answer  # it continues the numbers in words
