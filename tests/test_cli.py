"""The command line as a user meets it: help for every subcommand, and a streamed chat answer."""

from __future__ import annotations

import subprocess
import sys

import pytest

SUBCOMMANDS = ["train", "chat", "export", "bench", "data", "templates", "eval"]


def _hizli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hizli.cli", *args], capture_output=True, text=True, check=check)


def test_help_lists_every_subcommand():
    out = _hizli("--help").stdout
    for name in SUBCOMMANDS:
        assert f"    {name}" in out


@pytest.mark.parametrize("name", SUBCOMMANDS + ["data check"])
def test_each_subcommand_explains_its_arguments(name):
    out = _hizli(*name.split(), "--help").stdout
    assert out.startswith("usage: hizli " + name)
    assert len(out.splitlines()) > 4
    assert "not implemented" not in out.lower()


def test_chat_answers_the_fibonacci_prompt_through_the_template(smol_folder):
    run = _hizli(
        "chat",
        "smollm2-135m-instruct",
        "--prompt",
        "Continue the Fibonacci sequence: 1, 1, 2, 3, 5, 8,",
        "--max-new-tokens",
        "40",
    )
    answer = run.stdout.strip()
    assert len(answer.split()) >= 10
    assert "fibonacci" in answer.lower() or "13" in answer
    assert "<|im_start|>" not in answer and "<|im_end|>" not in answer  # the template's tokens are not shown


def test_errors_are_one_line_not_a_traceback(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("train:\n  learnig_rate: 1\n")
    run = _hizli("train", str(bad), check=False)
    assert run.returncode == 2
    assert "did you mean 'learning_rate'" in run.stderr and "Traceback" not in run.stderr
