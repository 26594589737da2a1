"""Every results file follows the schema, and the schema catches what would make a figure unreadable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hizli.bench import results

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def test_benchmarks_folder_holds_one_results_file_per_suite_and_no_other_data():
    data = sorted(p.name for p in RESULTS.iterdir() if p.name != "README.md")
    assert data and all(name.removesuffix(".jsonl") in results.SUITES for name in data), data
    shells = sorted(p.name for p in (ROOT / "benchmarks").rglob("*.sh"))
    assert len(shells) <= 1, shells


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.jsonl")), ids=lambda p: p.name)
def test_every_record_follows_the_schema(path):
    records = results.read(path)
    assert records, f"{path.name} is empty"
    for number, record in enumerate(records, 1):
        assert results.validate_record(record) == [], f"{path.name} record {number}"
        assert record["suite"] == path.stem, f"{path.name} record {number} belongs to {record['suite']}.jsonl"


def test_every_suite_is_described_in_the_index():
    index = (RESULTS / "README.md").read_text()
    for suite in results.SUITES:
        assert f"`{suite}.jsonl`" in index and f"hizli bench {suite}" in index


def good() -> dict:
    return {
        "schema": 1,
        "suite": "recipe",
        "date": "2026-12-02T17:30Z",
        "commit": "abc1234",
        "device": {"type": "cpu", "name": "AMD EPYC", "memory_gib": None, "cpus": 2},
        "system": "hizli",
        "env": {"torch": "2.13.0"},
        "call": "2026-12-02T17:30Z-amd-epyc",
        "command": "hizli bench recipe --cpu-demo",
        "settings": {"steps": 20},
        "metrics": {"tokens_per_s": 80.5, "losses": [2.1, 2.0], "startup_s": {"a": 1.0}},
    }


@pytest.mark.parametrize(
    "change, says",
    [
        (lambda r: r.pop("commit"), "missing 'commit'"),
        (lambda r: r.update(date="2 Dec 2026"), "date"),
        (lambda r: r.update(suite="speed"), "suite 'speed'"),
        (lambda r: r.update(device={"name": "x"}), "device needs"),
        (lambda r: r.update(command=" "), "command is empty"),
        (lambda r: r.update(metrics={}), "metrics is empty"),
        (lambda r: r.update(metrics={"t": {1, 2}}), "metrics['t']"),
        (lambda r: r.update(extra=1), "unknown key 'extra'"),
        (lambda r: r.update(schema=2), "schema 2"),
    ],
)
def test_the_schema_names_what_is_wrong(change, says):
    record = good()
    assert results.validate_record(record) == []
    change(record)
    problems = results.validate_record(record)
    assert any(says in p for p in problems), problems


def test_records_are_appended_per_suite_and_read_back(tmp_path):
    record = results.make_record(
        "recipe",
        "hizli",
        {"steps": 3},
        {"tokens_per_s": 1.0},
        command="hizli bench recipe",
        device={"type": "cpu", "name": "test cpu", "memory_gib": None, "cpus": 2},
        env={"torch": None},
    )
    assert record["call"].endswith("-test-cpu") and results.validate_record(record) == []
    path = results.append(tmp_path, [record])
    results.append(tmp_path, [record])
    assert path == tmp_path / "recipe.jsonl" and results.read(path) == [record, record]
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match="recipe.jsonl:3"):
        results.read(path)


def test_slug_and_commit_override(monkeypatch):
    assert results.slug("NVIDIA H200") == "h200" and results.slug("AMD EPYC 7B13") == "amd-epyc-7b13"
    monkeypatch.setenv("HIZLI_BENCH_COMMIT", "0123abc")
    assert results.git_commit() == "0123abc"
    assert json.loads(json.dumps(results.env_info()))["python"]
