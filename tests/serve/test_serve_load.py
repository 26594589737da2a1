"""``hizli bench serve``: concurrent streaming clients against a running server, and the records it
appends to ``benchmarks/results/serve.jsonl`` (the schema every results file follows)."""

from __future__ import annotations

import json

from hizli.bench import results
from hizli.cli import main


def test_bench_serve_measures_every_level_and_writes_schema_records(server, tmp_path, capsys):
    argv = ["bench", "serve", "--url", server.url, "--clients", "1,2", "--requests", "1", "--max-tokens", "4"]
    assert main([*argv, "--label", "hizli", "--results", str(tmp_path)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [row["clients"] for row in lines] == [1, 2]
    records = results.read(tmp_path / "serve.jsonl")
    assert [r["settings"]["clients"] for r in records] == [1, 2]
    for record in records:
        assert results.validate_record(record) == [] and record["system"] == "hizli"
        assert record["command"].startswith("hizli bench serve") and "--label hizli" in record["command"]
        metrics = record["metrics"]
        # every request completed, each at most max_tokens long, and the rate follows from them
        assert metrics["completed"] == record["settings"]["clients"] and metrics["errors"] == 0
        assert 0 < metrics["completion_tokens"] <= 4 * metrics["completed"]
        assert metrics["aggregate_tok_s"] > 0 and 0 < metrics["ttft_p50_s"] <= metrics["wall_s"]
    assert len({r["call"] for r in records}) == 1  # one command, one call: figures compare within it
