"""Loading: .jsonl / .json / .parquet, the three schemas, cut-off files, every row accounted for."""

from __future__ import annotations

import json

import pytest

from hizli.data.load import load_conversations
from hizli.data.problems import DataError

EXPECTED = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ],
]
RECORDS = {
    "sharegpt": [
        {"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4."}], "id": "a"},
        {
            "conversations": [
                {"from": "system", "value": "Be kind."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello!"},
            ],
            "id": "b",
        },
    ],
    "messages": [
        {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]},
        {
            "messages": [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
            ]
        },
    ],
    "alpaca": [
        {"instruction": "What is 2+2?", "input": "", "output": "4.", "system": None},
        {"system": "Be kind.", "instruction": "Hi", "output": "Hello!"},
    ],
}


def write(path, records, fmt):
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
@pytest.mark.parametrize("schema", ["sharegpt", "messages", "alpaca"])
def test_formats_and_schemas_normalise_to_messages(tmp_path, fmt, schema):
    path = write(tmp_path / f"data.{fmt}", RECORDS[schema], fmt)
    for named in ("auto", schema):
        rows = load_conversations(str(path), schema=named)
        assert [r["messages"] for r in rows] == EXPECTED
        assert rows.rows_in == 2 and not rows.problems and rows.schema == schema


def test_json_file_holding_json_lines(tmp_path):
    path = write(tmp_path / "data.json", RECORDS["sharegpt"], "jsonl")
    assert [r["messages"] for r in load_conversations(path)] == EXPECTED


def test_openai_content_parts_are_joined():
    rec = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "you"}]},
            {"role": "assistant", "content": "Hello!"},
        ]
    }
    assert load_conversations([rec])[0]["messages"][0]["content"] == "Hi you"


def test_alpaca_input_follows_the_instruction():
    rows = load_conversations([{"instruction": "Translate.", "input": "Merhaba", "output": "Hello"}])
    assert rows[0]["messages"][0] == {"role": "user", "content": "Translate.\n\nMerhaba"}


def test_json_list_cut_off_mid_record_keeps_the_complete_records(tmp_path):
    text = json.dumps(RECORDS["sharegpt"] * 3, indent=2)
    cut = text[: text.rindex('"value": "Hello!"') + 12]  # inside the last record's last string
    (tmp_path / "cut.json").write_text(cut, encoding="utf-8")
    rows = load_conversations(tmp_path / "cut.json", bad_rows="skip")
    assert len(rows) == 5 and rows.rows_in == 6
    (problem,) = rows.problems
    starts = [n + 1 for n, line in enumerate(cut.split("\n")) if line == "  {"]  # each record's first line
    assert rows.lines == starts[:5]
    assert problem.kind == "truncated-file" and problem.line == starts[5] and problem.row == 5


def test_jsonl_problems_name_their_lines(tmp_path):
    good = json.dumps(RECORDS["sharegpt"][0])
    lines = [
        good,
        "",
        '{"conversations": [}',
        json.dumps([1, 2]),
        json.dumps({"text": "hi"}),
        good,
        json.dumps({"conversations": [{"from": "human", "value": 3}]}),
        good[:25],
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    rows = load_conversations(path, bad_rows="skip")
    assert rows.lines == [1, 6]
    assert [(p.line, p.kind) for p in rows.problems] == [
        (3, "invalid-json"),
        (4, "not-an-object"),
        (5, "no-conversation"),
        (7, "bad-message"),
        (8, "truncated-file"),
    ]
    assert rows.rows_in == 7  # the blank line is not a row
    with pytest.raises(DataError) as e:
        load_conversations(path)
    assert all(f"line {n}:" in str(e.value) for n in (3, 4, 5, 7, 8))


def test_named_schema_must_match(tmp_path):
    path = write(tmp_path / "d.jsonl", RECORDS["messages"], "jsonl")
    rows = load_conversations(path, schema="sharegpt", bad_rows="skip")
    assert len(rows) == 0 and all("schema='auto'" in p.reason for p in rows.problems)
    with pytest.raises(ValueError, match="schema='chatml'"):
        load_conversations(path, schema="chatml")


def test_unknown_role_policies(tmp_path):
    rec = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bing", "value": "Hello"}]}
    assert load_conversations([rec])[0]["messages"][1]["role"] == "assistant"
    assert load_conversations([rec], unknown_roles="user", bad_rows="skip").problems[0].kind == "no-assistant"
    rows = load_conversations([rec], unknown_roles="error", bad_rows="skip")
    assert rows.problems[0].kind == "unknown-role" and "'bing'" in rows.problems[0].reason
    assert load_conversations([rec], aliases={"bing": "assistant"}).warnings == []


def test_slices_partition_rows_and_problems():
    recs = [
        RECORDS["sharegpt"][0],
        {"conversations": []},
        RECORDS["sharegpt"][1],
        {"conversations": []},
        RECORDS["sharegpt"][0],
        "junk",
    ]
    rows = load_conversations(recs, bad_rows="skip")
    assert len(rows) == 3 and rows.rows_in == 6
    for k in range(4):
        a, b = rows[:k], rows[k:]
        assert len(a) + len(b) == 3 and a.rows_in + b.rows_in == 6
        assert sorted(p.row for p in [*a.problems, *b.problems]) == [1, 3, 5]


def test_max_rows_and_missing_files(tmp_path):
    path = write(tmp_path / "d.jsonl", RECORDS["sharegpt"] * 5, "jsonl")
    assert len(load_conversations(path, max_rows=3)) == 3
    with pytest.raises(FileNotFoundError):
        load_conversations(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=".csv"):
        load_conversations(write(tmp_path / "d.csv", [], "jsonl"))


def test_hub_ids_go_through_datasets_load_dataset(monkeypatch):
    import datasets

    seen = {}

    def fake_load_dataset(name, split=None):
        seen.update(name=name, split=split)
        return datasets.Dataset.from_list(RECORDS["sharegpt"])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_conversations("mlabonne/FineTome-100k", split="train[:2]")
    assert seen == {"name": "mlabonne/FineTome-100k", "split": "train[:2]"}
    assert [r["messages"] for r in rows] == EXPECTED


def test_dataset_and_list_inputs():
    from datasets import Dataset

    assert [r["messages"] for r in load_conversations(Dataset.from_list(RECORDS["messages"]))] == EXPECTED
    assert [r["messages"] for r in load_conversations(RECORDS["alpaca"])] == EXPECTED


def test_packaged_samples_load():
    from hizli.data.sample import sample_path

    clean = load_conversations(sample_path("sharegpt"))
    assert len(clean) >= 300 and not clean.problems and not clean.warnings
    odd = load_conversations(sample_path("sharegpt-odd"), bad_rows="skip")
    assert odd.problems and odd.warnings and odd.rows_in == len(odd) + len(odd.problems)
    with pytest.raises(ValueError, match="sharegpt-odd"):
        sample_path("finetome")
