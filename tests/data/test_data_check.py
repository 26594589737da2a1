"""``hizli data check`` as a user runs it, check_rows as the trainer calls it, and the sample script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hizli.data.check import check_rows

GOOD = {"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4."}]}


def hizli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hizli.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_check_lists_every_problem_with_its_line_and_exits_1(tmp_path):
    lines = [
        json.dumps(GOOD),  # 1 fine
        json.dumps({"conversations": []}),  # 2 empty conversation
        '{"conversations": [{"from": "human", "value": "Hi"} {"from": "gpt"}]}',  # 3 invalid JSON
        json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bing", "value": "Hey"}]}),  # 4
        json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]}),  # 5 empty
        json.dumps({"conversations": [{"from": "human", "value": "Only a question"}]}),  # 6 no answer
        json.dumps(GOOD)[:30],  # 7 cut off
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    out = hizli("data", "check", path)
    assert out.returncode == 1, out.stderr
    text = out.stdout
    expect = {
        2: "no conversation",
        3: "invalid JSON",
        4: "unknown role 'bing'",
        5: "is empty",
        6: "no assistant turn",
        7: "ends in the middle of this record",
    }
    for line, words in expect.items():
        (hit,) = [x for x in text.splitlines() if x.startswith(f"{path}:{line}: ")]
        assert words in hit, text
    assert not any(x.startswith(f"{path}:1: ") for x in text.splitlines())
    assert "6 of 7 rows are unusable" in text and "--map-role" in text  # unknown roles are unusable unless mapped
    assert "count 1, min" in text and "median" in text and "p95" in text and "total" in text


def test_check_flags_empty_files_missing_turns_and_conversations_in_the_wrong_order(tmp_path):
    def turns(*pairs):
        return json.dumps({"conversations": [{"from": f, "value": v} for f, v in pairs]})

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    out = hizli("data", "check", empty)
    assert out.returncode == 1 and "holds no rows" in out.stdout and "OK" not in out.stdout

    lines = [
        turns(("human", "What is 2+2?"), ("gpt", "4.")),  # 1 fine
        turns(("humn", "What is 2+2?"), ("robot", "4.")),  # 2 typos: unknown roles
        turns(("gpt", "Hello! How can I help?"), ("human", "2+2?"), ("gpt", "4.")),  # 3 starts with the assistant
        turns(("human", "2+2?"), ("gpt", "4."), ("human", "And 3+3?")),  # 4 ends with the user
        turns(("system", "Be brief."), ("gpt", "4.")),  # 5 no user turn
    ]
    path = tmp_path / "order.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def problems(*flags):
        out = hizli("data", "check", path, *flags)
        lines = [x[len(f"{path}:") :] for x in out.stdout.splitlines() if x.startswith(f"{path}:")]
        found = {int(x.split(":")[0]): x for x in lines if x.split(":")[0].isdigit()}
        return out.returncode, found

    code, found = problems()
    assert code == 1 and sorted(found) == [2, 3, 4, 5], found
    assert "unknown role 'humn'" in found[2] and "starts with the assistant" in found[3]
    assert "ends with a user turn" in found[4] and "no user turn" in found[5]
    code, found = problems("--unknown-roles", "assistant")  # as training maps them by default: no user turn left
    assert code == 1 and "no user turn" in found[2]
    code, found = problems("--map-role", "humn=user", "--map-role", "robot=assistant")
    assert code == 1 and sorted(found) == [3, 4, 5]


def test_training_keeps_those_rows_with_a_warning_and_check_refuses_them(tmp_path):
    """Real ShareGPT rows often open with the assistant: training still learns from their answers (a
    third of a 600-row ShareGPT file would be lost otherwise); the checker lists them as unusable."""
    from hizli.data.load import load_conversations

    rows = [
        {
            "messages": [
                {"role": "assistant", "content": "Hi!"},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4."},
                {"role": "user", "content": "Thanks"},
            ]
        },
    ]
    loaded = load_conversations(rows, bad_rows="error")
    assert len(loaded) == 2 and not loaded.problems
    assert [p.kind for p in loaded.warnings] == ["assistant-first", "ends-with-user"]
    strict = load_conversations(rows, bad_rows="skip", turn_order="error")
    assert [p.kind for p in strict.problems] == ["assistant-first", "ends-with-user"] and len(strict) == 0


def test_check_exits_0_on_a_clean_file(tmp_path):
    from hizli.data.sample import sample_path

    out = hizli("data", "check", sample_path("sharegpt"), "--template", "smollm2", "--max-seq-length", "4096")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK: all" in out.stdout and "count " in out.stdout


def test_check_rows_reports_truncation_and_rows_left_without_trained_tokens(smol_tok, tmp_path):
    long_question = {"messages": [{"role": "user", "content": "why " * 200}, {"role": "assistant", "content": "No."}]}
    long_answer = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "yes " * 200}]}
    rows = [json.dumps(r) for r in (GOOD, long_question, long_answer)]
    data = json.dumps([json.loads(r) for r in rows], indent=1)
    path = tmp_path / "rows.json"
    cut = data[: data.rindex("yes")]  # and the file is cut off
    path.write_text(cut, encoding="utf-8")
    starts = [n + 1 for n, line in enumerate(cut.split("\n")) if line == " {"]  # each record's first line
    before = smol_tok.chat_template
    report = check_rows(path, smol_tok, template="chatml", max_seq_length=64, train_on="assistant")
    assert smol_tok.chat_template == before  # the caller's tokenizer is left alone
    assert [(p.kind, p.line) for p in report.skipped] == [
        ("no-trained-token", starts[1]),
        ("truncated-file", starts[2]),
    ]
    assert [p.kind for p in report.warnings] == ["over-long"] and report.truncated == 1
    assert report.rows_in == 3 == report.rows_used + len(report.skipped) and not report.ok
    whole = check_rows(path, smol_tok, template="chatml", max_seq_length=64)  # everything trained: usable
    assert [p.kind for p in whole.skipped] == ["truncated-file"]


def test_extract_sample_script_reproduces_the_packaged_files(tmp_path):
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, str(root / "scripts" / "extract_sample.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    packaged = root / "src" / "hizli" / "data" / "sample"
    for name in ("sharegpt_sample.jsonl", "sharegpt_odd.jsonl"):
        assert (tmp_path / name).read_bytes() == (packaged / name).read_bytes()
    assert sum((packaged / n).stat().st_size for n in ("sharegpt_sample.jsonl", "sharegpt_odd.jsonl")) < 2 * 2**20
