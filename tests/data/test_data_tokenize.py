"""tokenize_dataset and train_on_responses_only: the label rule, BOS, truncation, row accounting."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from hizli.data.problems import DataError
from hizli.data.tokenize import IGNORE, TokenizedDataset, tokenize_dataset, train_on_responses_only

LLAMA_USER = "<|start_header_id|>user<|end_header_id|>\n\n"
LLAMA_ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>\n\n"


def trained_runs(tokenizer, row) -> list[str]:
    """The decoded runs of consecutive trained tokens of one row."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.mark.parametrize("which", ["llama31", "smol"])
def test_labels_train_exactly_the_assistant_contents_and_their_end_tokens(which, request, sample_rows):
    tok = request.getfixturevalue(which)
    eot, trim = ("<|eot_id|>", True) if which == "llama31" else ("<|im_end|>", False)
    ds = tokenize_dataset(
        sample_rows, tok, max_seq_length=8192, messages_field="messages", train_on="assistant", show_progress=False
    )
    assert len(ds) == len(sample_rows) and ds.report.truncated == 0
    for i in range(len(ds)):
        row, messages = ds[i], sample_rows[i]["messages"]
        # the ids are the tokenizer's own reading of the rendered conversation (one BOS, no extras)
        text = tok.apply_chat_template(messages, tokenize=False)
        assert row["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
        assert all(label in (IGNORE, token) for token, label in zip(row["input_ids"], row["labels"]))
        expected = [
            (m["content"].strip() if trim else m["content"]) + eot for m in messages if m["role"] == "assistant"
        ]
        assert trained_runs(tok, row) == expected


def test_train_on_all_labels_every_token(smol, sample_rows):
    ds = tokenize_dataset(sample_rows[:20], smol, max_seq_length=4096, messages_field="messages", show_progress=False)
    for row in ds:
        assert row["labels"] == row["input_ids"]


def test_no_double_bos(llama31, sample_rows):
    bos = llama31.bos_token_id
    assert llama31("Hello")["input_ids"][0] == bos  # this tokenizer adds BOS by itself
    rendered = [{"text": llama31.apply_chat_template(r["messages"], tokenize=False)} for r in sample_rows[:30]]
    assert rendered[0]["text"].startswith("<|begin_of_text|>")
    plain = [{"text": "Hello there, how are you?"}]
    for rows in (rendered, plain):
        ds = tokenize_dataset(rows, llama31, max_seq_length=4096, text_field="text", show_progress=False)
        for row in ds:
            assert row["input_ids"][0] == bos and row["input_ids"].count(bos) == 1
    msgs = tokenize_dataset(
        sample_rows[:30], llama31, max_seq_length=4096, messages_field="messages", show_progress=False
    )
    assert all(row["input_ids"].count(bos) == 1 for row in msgs)


@pytest.mark.parametrize("max_seq_length", [8192, 200])
def test_marker_path_gives_the_structure_labels(llama31, sample_rows, max_seq_length):
    structure = tokenize_dataset(
        sample_rows,
        llama31,
        max_seq_length=max_seq_length,
        messages_field="messages",
        train_on="assistant",
        show_progress=False,
    )
    texts = [{"text": llama31.apply_chat_template(r["messages"], tokenize=False)} for r in sample_rows]
    every = tokenize_dataset(texts, llama31, max_seq_length=max_seq_length, text_field="text", show_progress=False)
    marked = train_on_responses_only(
        every, instruction_part=LLAMA_USER, response_part=LLAMA_ASSISTANT, tokenizer=llama31
    )
    assert list(marked.source_rows) == list(structure.source_rows)
    assert [marked[i] for i in range(len(marked))] == [structure[i] for i in range(len(structure))]
    assert marked.report.rows_in == len(sample_rows) == marked.report.rows_used + len(marked.report.skipped)
    if max_seq_length == 200:  # some answers start after token 200: dropped the same way on both paths
        assert structure.report.skipped and {p.kind for p in marked.report.skipped} == {"no-trained-token"}
    # the registry's default markers and the text-column fallback give the same labels too
    fallback = tokenize_dataset(
        texts, llama31, max_seq_length=max_seq_length, text_field="text", train_on="assistant", show_progress=False
    )
    assert [fallback[i] for i in range(len(fallback))] == [structure[i] for i in range(len(structure))]


def test_train_on_responses_only_relabels_a_trainer_in_place(smol, sample_rows):
    texts = [{"text": smol.apply_chat_template(r["messages"], tokenize=False)} for r in sample_rows[:60]]
    kw = dict(max_seq_length=4096, text_field="text", show_progress=False)
    trainer = SimpleNamespace(
        train_dataset=tokenize_dataset(texts[:50], smol, **kw),
        eval_dataset=tokenize_dataset(texts[50:], smol, **kw),
        tokenizer=smol,
        train_on="all",
    )
    assert train_on_responses_only(trainer) is trainer  # markers from the smollm2 registry entry
    expected = tokenize_dataset(
        sample_rows[:60],
        smol,
        max_seq_length=4096,
        messages_field="messages",
        train_on="assistant",
        show_progress=False,
    )
    got = [*trainer.train_dataset, *trainer.eval_dataset]
    assert got == [expected[i] for i in range(60)] and trainer.train_on == "assistant"


def test_truncation_is_counted_and_rows_without_trained_tokens_are_dropped(smol):
    long = " ".join(["word"] * 300)
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "user", "content": long}, {"role": "assistant", "content": "Short."}]},
        {"messages": [{"role": "user", "content": "Tell me"}, {"role": "assistant", "content": long}]},
    ]
    ds = tokenize_dataset(
        rows, smol, max_seq_length=64, messages_field="messages", train_on="assistant", show_progress=False
    )
    r = ds.report
    assert (r.rows_in, r.rows_used, r.truncated) == (3, 2, 2)
    assert [(p.row, p.kind) for p in r.skipped] == [(1, "no-trained-token")]
    assert "truncation to 64" in r.skipped[0].reason
    assert list(ds.source_rows) == [0, 2] and max(ds.lengths) == 64 and ds.lengths == [len(x["input_ids"]) for x in ds]
    assert sorted(p.row for p in r.warnings if p.kind == "over-long") == [1, 2]
    # training on everything keeps the long-prompt row (its prompt is trained)
    assert len(tokenize_dataset(rows, smol, max_seq_length=64, messages_field="messages", show_progress=False)) == 3


BAD_ROWS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {"messages": []},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "   "}]},
    {"messages": [{"role": "user", "content": "Anyone there?"}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]},
    {"messages": [{"from": "human", "value": "Hi"}, {"from": "bard", "value": "Hello"}]},
]


def test_bad_rows_error_lists_every_unusable_row(smol):
    with pytest.raises(DataError) as e:
        tokenize_dataset(BAD_ROWS, smol, max_seq_length=128, messages_field="messages", show_progress=False)
    assert isinstance(e.value, ValueError)
    assert [(p.row, p.kind) for p in e.value.report.skipped] == [
        (1, "no-conversation"),
        (2, "empty-turn"),
        (3, "no-assistant"),
        (4, "bad-message"),
    ]
    for n in (1, 2, 3, 4):
        assert f"row {n}:" in str(e.value)


def test_bad_rows_skip_counts_every_row(smol):
    ds = tokenize_dataset(
        BAD_ROWS, smol, max_seq_length=128, messages_field="messages", bad_rows="skip", show_progress=False
    )
    r = ds.report
    assert r.rows_in == 6 == r.rows_used + len(r.skipped) and r.rows_used == 2
    assert [p.row for p in r.warnings if p.kind == "unknown-role-mapped"] == [5]  # bard -> assistant
    assert "6 rows in, 2 used, 4 skipped" in r.summary()


def test_every_odd_row_is_accounted_for(smol):
    from hizli.data.load import load_conversations
    from hizli.data.sample import sample_path

    odd = load_conversations(sample_path("sharegpt-odd"), bad_rows="skip")
    ds = tokenize_dataset(
        odd,
        smol,
        max_seq_length=256,
        messages_field="messages",
        train_on="assistant",
        bad_rows="skip",
        show_progress=False,
    )
    r = ds.report
    with open(sample_path("sharegpt-odd"), encoding="utf-8") as f:
        lines = sum(1 for line in f if line.strip())
    assert r.rows_in == lines == r.rows_used + len(r.skipped)
    assert all(p.line is not None for p in r.skipped)  # every skip names its file line
    assert sorted([*ds.source_lines, *(p.line for p in r.skipped)]) == list(range(1, lines + 1))


def test_parallel_and_dataset_inputs_give_identical_results(smol, sample_rows, monkeypatch):
    from datasets import Dataset

    from hizli.data import tokenize

    monkeypatch.setattr(tokenize, "MIN_ROWS_PER_PROCESS", 100)  # two processes for 409 rows
    kw = dict(max_seq_length=256, messages_field="messages", train_on="assistant", show_progress=False)
    one = tokenize_dataset(sample_rows.rows, smol, num_proc=1, **kw)
    two = tokenize_dataset(Dataset.from_list(sample_rows.rows), smol, num_proc=2, **kw)
    assert len(one) == len(two) and one.lengths == two.lengths and len(one) + len(one.report.skipped) == 409
    assert (one._ids == two._ids).all() and (one._labels == two._labels).all()
    assert one.report.truncated == two.report.truncated > 0


def test_argument_errors(smol, smol_tok):
    rows = [{"messages": BAD_ROWS[0]["messages"], "text": "x"}]
    with pytest.raises(ValueError, match="exactly one of text_field"):
        tokenize_dataset(rows, smol, max_seq_length=64, text_field="text", messages_field="messages")
    with pytest.raises(ValueError, match="train_on='everything'"):
        tokenize_dataset(rows, smol, max_seq_length=64, text_field="text", train_on="everything")
    with pytest.raises(ValueError, match="'msgs' is not in the rows"):
        tokenize_dataset(rows, smol, max_seq_length=64, messages_field="msgs")
    smol_tok.chat_template = None
    with pytest.raises(ValueError, match="get_chat_template"):
        tokenize_dataset(rows, smol_tok, max_seq_length=64, messages_field="messages")


def test_from_rows_and_select():
    rows = [
        {"input_ids": [1, 2, 3, 4], "labels": [IGNORE, IGNORE, 3, 4]},
        {"input_ids": [5, 6]},
        {"input_ids": [7, 8, 9], "labels": [IGNORE, IGNORE, IGNORE]},
    ]
    ds = TokenizedDataset.from_rows(rows, max_seq_length=3)
    assert ds[0] == {"input_ids": [1, 2, 3], "labels": [IGNORE, IGNORE, 3]}
    assert ds[1] == {"input_ids": [5, 6], "labels": [5, 6]} and ds[-1] == ds[1]
    assert ds.lengths == [3, 2] and ds.report.truncated == 1
    assert [p.kind for p in ds.report.skipped] == ["no-trained-token"]
    assert list(ds.select([1])) == [ds[1]]
    with pytest.raises(IndexError):
        ds[2]
