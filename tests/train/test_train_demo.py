"""The README's main job, end to end, as a user runs it (about 5 minutes on a 2-core CPU: marked
``slow``; run with ``pytest -m slow tests/train/test_train_demo.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Continue the fibonnaci sequence: 1, 1, 2, 3, 5, 8,"


def _answer(path: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "hizli.cli", "chat", path, "--prompt", PROMPT, "--max-new-tokens", "48"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


@pytest.mark.slow
def test_cpu_demo_learns_saves_and_answers(tmp_path):
    out, adapter = tmp_path / "out", tmp_path / "lora_model"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "hizli.cli",
            "train",
            str(ROOT / "configs" / "demo-cpu.yaml"),
            "--set",
            f"train.output_dir={out}",
            "--set",
            f"output.adapter_dir={adapter}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "where the time went:" in run.stdout and "Peak resident memory (RSS)" in run.stdout
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    assert (out / "loss.png").is_file() and (out / "recipe.yaml").is_file()
    # the adapter reloads on its base and changes the model's (greedy) answer
    assert _answer(str(adapter)) != _answer("smollm2-135m-instruct")
