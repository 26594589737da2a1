"""standardize_sharegpt: role mapping, the unknown-role policy and its report, Dataset and list inputs."""

from __future__ import annotations

import logging

import pytest

from hizli.data.sharegpt import standardize_sharegpt

ROWS = [
    {
        "id": "a",
        "score": 4.5,
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
        ],
    },
    {
        "id": "b",
        "score": 3.0,
        "conversations": [
            {"from": "user", "value": "Q"},
            {"from": "chatgpt", "value": "A"},
            {"from": "human", "value": "Q2"},
            {"from": "bing", "value": "A2"},
            {"from": "human", "value": "Q3"},
            {"from": "chatgpt", "value": "A3"},
        ],
    },
]
EXPECTED = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ],
    [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
        {"role": "user", "content": "Q3"},
        {"role": "assistant", "content": "A3"},
    ],
]


@pytest.fixture()
def log(caplog):
    """hizli's messages (its logger does not propagate to the root logger caplog watches)."""
    logger = logging.getLogger("hizli")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="hizli")
    yield caplog
    logger.removeHandler(caplog.handler)


def test_list_rows_are_converted_and_other_columns_kept(log):
    out = standardize_sharegpt(ROWS)
    assert [r["conversations"] for r in out] == EXPECTED
    assert [(r["id"], r["score"]) for r in out] == [("a", 4.5), ("b", 3.0)]
    assert ROWS[1]["conversations"][1]["from"] == "chatgpt"  # the input is not modified
    assert "3 messages with unknown roles mapped to assistant (chatgpt: 2, bing: 1)" in log.text


def test_dataset_rows_are_converted_with_the_same_report(log):
    from datasets import Dataset

    out = standardize_sharegpt(Dataset.from_list(ROWS))
    assert out["conversations"] == EXPECTED and out.column_names == ["id", "score", "conversations"]
    assert "(chatgpt: 2, bing: 1)" in log.text


def test_unknown_role_policies():
    user = standardize_sharegpt(ROWS, unknown_roles="user")[1]["conversations"]
    assert [m["role"] for m in user] == ["user"] * 6
    dropped = standardize_sharegpt(ROWS, unknown_roles="drop")[1]["conversations"]
    assert [m["content"] for m in dropped] == ["Q", "Q2", "Q3"]
    with pytest.raises(ValueError, match=r"row 1: message 1 has the unknown role 'chatgpt'"):
        standardize_sharegpt(ROWS, unknown_roles="error")
    with pytest.raises(ValueError, match="unknown_roles='robot'"):
        standardize_sharegpt(ROWS, unknown_roles="robot")
    aliased = standardize_sharegpt(ROWS, aliases={"chatgpt": "user", "bing": "user"}, unknown_roles="error")
    assert [m["role"] for m in aliased[1]["conversations"]] == ["user"] * 6


def test_messages_column_and_rows_already_standard():
    odd_case = [{"role": "USER ", "content": "x"}, {"role": "model", "content": "y"}]
    rows = [{"messages": EXPECTED[0]}, {"messages": odd_case}]
    out = standardize_sharegpt(rows)
    assert out[0]["messages"] == EXPECTED[0]
    assert [m["role"] for m in out[1]["messages"]] == ["user", "assistant"]


def test_dataset_dict_and_bad_inputs():
    from datasets import Dataset, DatasetDict

    out = standardize_sharegpt(DatasetDict(train=Dataset.from_list(ROWS), test=Dataset.from_list(ROWS[:1])))
    assert out["train"]["conversations"] == EXPECTED and out["test"]["conversations"] == EXPECTED[:1]
    with pytest.raises(ValueError, match="'conversations' or 'messages' column"):
        standardize_sharegpt([{"text": "hello"}])
    with pytest.raises(ValueError, match="row 0: message 0 has no role"):
        standardize_sharegpt([{"conversations": [{"value": "hi"}]}])


def test_the_packaged_odd_rows(log):
    """Real ShareGPT oddities: chatgpt/bing/bard answers, null-free but empty conversations."""
    import json

    from hizli.data.sample import sample_path

    with open(sample_path("sharegpt-odd"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    counts: dict[str, int] = {}
    for r in rows:
        for m in r["conversations"]:
            if m["from"] not in ("human", "gpt", "system", "user"):
                counts[m["from"]] = counts.get(m["from"], 0) + 1
    out = standardize_sharegpt(rows)
    assert len(out) == len(rows)
    assert {m["role"] for r in out for m in r["conversations"]} <= {"user", "assistant", "system"}
    assert f"{sum(counts.values())} messages with unknown roles mapped to assistant" in log.text
    for name, n in counts.items():
        assert f"{name}: {n}" in log.text
