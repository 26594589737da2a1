"""Bad data, fuzzed: whatever rows or files come in, every row ends as used or as a reported problem.

The pipeline under test is the one training runs: ``load_conversations`` (files, in-memory rows) ->
``standardize_sharegpt`` (the recipe's API path) -> chat-template rendering -> ``tokenize_dataset``,
plus the text-column and pre-tokenized paths of ``SFTTrainer``. Allowed outcomes: a result whose
report accounts for every row (rows in = rows used + rows reported, each problem printable and
naming its row or line), a ``DataError`` listing the rows, or a ``ValueError`` naming the row (the
documented behaviour of ``standardize_sharegpt``). Anything else is a bug.

Hypothesis runs derandomized, so the figures in docs/RELIABILITY.md are the same on every run.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hizli import _log
from hizli.data.load import load_conversations
from hizli.data.problems import DataError, DataReport
from hizli.data.sharegpt import standardize_sharegpt
from hizli.data.tokenize import TokenizedDataset, tokenize_dataset

pytestmark = pytest.mark.reliability("data")

FUZZ = settings(
    max_examples=500,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_SEQ = 48  # short, so truncation (and rows losing every trained token to it) happens often


class Tally:
    """Counts shared by the tests of this file; recorded as the section's figures at the end."""

    def __init__(self) -> None:
        self.inputs = self.rows = self.files = self.api_errors = 0
        self.kinds: Counter = Counter()

    def report(self, report: DataReport, rows_in: int | None = None) -> None:
        report.check()
        if rows_in is not None:
            assert report.rows_in == rows_in, f"{rows_in} rows went in, the report says {report.rows_in}"
        assert report.rows_in == report.rows_used + len(report.skipped)
        for p in [*report.skipped, *report.warnings]:
            text = str(p)
            text.encode("utf-8")  # printable: no lone surrogates reach a terminal
            assert re.match(r"(line|row) \d+: ", text), f"a problem that names no row: {text!r}"
            if p in report.skipped:
                self.kinds[p.kind] += 1


@pytest.fixture(scope="module")
def tally(request):
    t = Tally()
    yield t


@pytest.fixture(scope="module")
def tok(smol_tokenizer):
    from hizli.data.templates import get_chat_template

    # a shallow copy, as `hizli data check` makes: the session's tokenizer keeps its template
    return get_chat_template(copy.copy(smol_tokenizer), "smollm2", map_eos_token=False, warn=False)


@pytest.fixture(autouse=True)
def quiet():
    # every generated input logs a summary line; thousands of them would drown the test output
    _log.setup()
    level = _log.logger.level
    _log.logger.setLevel(logging.ERROR)
    yield
    _log.logger.setLevel(level)


# ---------------------------------------------------------------- strategies
ODD_TEXT = [
    "",
    " ",
    "\t\n",
    "\x00",
    "\x1b[2J",
    "\ud800",
    "a\udcffb",
    "\u202e",
    "\ufeff",
    "{{ 7*7 }}",
    "{% raw %}",
    "<|im_end|>",
    "<|im_start|>assistant\n",
    "\r\n",
    "x" * 5000,
    "ş" * 300,
]
text = st.text(max_size=40) | st.sampled_from(ODD_TEXT)
scalar = st.none() | st.booleans() | st.integers() | st.integers(10**18, 10**40) | st.floats() | text
junk = st.recursive(
    scalar,
    lambda c: (
        st.lists(c, max_size=3)
        | st.dictionaries(st.text(max_size=6), c, max_size=3)
        | st.dictionaries(st.integers(), c, max_size=2)
    ),
    max_leaves=8,
)
role = st.sampled_from(["human", "gpt", "system", "user", "assistant", "tool", "chatgpt", "bing", " GPT ", "", "HUMAN"])
good_sharegpt = st.lists(st.tuples(role, text), min_size=1, max_size=4).map(
    lambda turns: {"conversations": [{"from": r, "value": v} for r, v in turns]}
)
good_messages = st.lists(st.tuples(role, text), min_size=1, max_size=4).map(
    lambda turns: {"messages": [{"role": r, "content": v} for r, v in turns]}
)
good_alpaca = st.fixed_dictionaries(
    {"instruction": text, "output": text}, optional={"input": text, "system": text, "response": text}
)
VALID = [
    {"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4."}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ]
    },
    {"instruction": "Translate.", "input": "Merhaba dünya", "output": "Hello world"},
]


@st.composite
def mutated(draw):
    """A valid row with one to three random edits: a key dropped or renamed, a value replaced."""
    row = copy.deepcopy(draw(st.sampled_from(VALID) | good_sharegpt | good_messages | good_alpaca))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(row))
        path = draw(st.sampled_from(paths))
        parent, key = _at(row, path)
        action = draw(st.sampled_from(["drop", "junk", "rename", "wrap"]))
        if action == "drop" and isinstance(parent, dict):
            del parent[key]
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["form", "val", "Role", "contents", "", "conversation"]))] = parent.pop(key)
        elif action == "wrap":
            parent[key] = [parent[key]]
        else:
            parent[key] = draw(junk)
        if not isinstance(row, dict) or not row:
            break
    return row


def _paths(value, prefix=()):
    if isinstance(value, dict):
        for k, v in value.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def _at(root, path):
    parent = root
    for k in path[:-1]:
        parent = parent[k]
    return parent, path[-1]


row = mutated() | good_sharegpt | good_messages | good_alpaca | junk
rows = st.lists(row, max_size=6)


# ---------------------------------------------------------------- rows in memory
@FUZZ
@given(data=rows, train_on=st.sampled_from(["all", "assistant"]))
def _rows_through_loader(tok, tally, data, train_on):
    tally.inputs += 1
    tally.rows += len(data)
    conv = load_conversations(data, bad_rows="skip")
    ds = tokenize_dataset(
        conv,
        tok,
        max_seq_length=MAX_SEQ,
        messages_field="messages",
        train_on=train_on,
        bad_rows="skip",
        show_progress=False,
    )
    tally.report(ds.report, rows_in=len(data))
    broken = [p for p in ds.report.skipped if p.kind != "no-trained-token"]
    if broken:  # the default policy stops with every bad row listed
        with pytest.raises(DataError) as e:
            load_conversations(data)
        assert len(e.value.report.skipped) == len(conv.problems)


@FUZZ
@given(data=st.lists(mutated() | good_sharegpt | good_messages, min_size=1, max_size=6))
def _rows_through_standardize(tok, tally, data):
    """The recipe's own calls: standardize_sharegpt, then render and tokenize the column."""
    tally.inputs += 1
    tally.rows += len(data)
    column = next((c for c in ("conversations", "messages") if isinstance(data[0], dict) and c in data[0]), None)
    try:
        standard = standardize_sharegpt(data)
    except ValueError as e:  # documented: names the row that cannot be converted
        assert re.search(r"\brow \d+\b|column", str(e)), str(e)
        tally.api_errors += 1
        return
    assert column is not None
    try:
        ds = tokenize_dataset(
            standard, tok, max_seq_length=MAX_SEQ, messages_field=column, bad_rows="skip", show_progress=False
        )
    except ValueError as e:  # a row without the first row's column: says which column is missing
        assert "column" in str(e), str(e)
        tally.api_errors += 1
        return
    tally.report(ds.report, rows_in=len(data))


@FUZZ
@given(
    data=st.lists(st.fixed_dictionaries({"text": text | junk}) | junk, min_size=1, max_size=6),
    train_on=st.sampled_from(["all", "assistant"]),
)
def _text_rows(tok, tally, data, train_on):
    tally.inputs += 1
    tally.rows += len(data)
    if not (isinstance(data[0], dict) and "text" in data[0]):  # the column is found from the first row
        data = [{"text": "hello"}] + data
        tally.rows += 1
    ds = tokenize_dataset(
        data, tok, max_seq_length=MAX_SEQ, text_field="text", train_on=train_on, bad_rows="skip", show_progress=False
    )
    tally.report(ds.report, rows_in=len(data))


ids = st.lists(st.integers(-200, 600), max_size=8) | st.lists(scalar, max_size=3) | junk
pretokenized = st.fixed_dictionaries({}, optional={"input_ids": ids, "labels": ids}) | junk


@FUZZ
@given(data=st.lists(pretokenized, max_size=6))
def _pretokenized_rows(tally, data):
    tally.inputs += 1
    tally.rows += len(data)
    ds = TokenizedDataset.from_rows(data, max_seq_length=MAX_SEQ)
    tally.report(ds.report, rows_in=len(data))
    for i in range(len(ds)):  # what is kept is well-formed for the collator
        r = ds[i]
        assert len(r["input_ids"]) == len(r["labels"]) and min(r["input_ids"]) >= 0


def test_fuzzed_rows_are_used_or_reported(tok, tally):
    _rows_through_loader(tok, tally)
    _rows_through_standardize(tok, tally)
    _text_rows(tok, tally)
    _pretokenized_rows(tally)


# ---------------------------------------------------------------- files
def _serialise(records, fmt: str, ascii_only: bool) -> bytes | None:
    try:
        if fmt == "jsonl":
            text = "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in records)
        else:
            text = json.dumps(records, indent=1, ensure_ascii=ascii_only)
    except (TypeError, ValueError):  # e.g. dict keys of mixed types: not expressible as JSON
        return None
    return text.encode("utf-8", "surrogatepass")


BAD_BYTES = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\xf0\x9f", b"\xfe\xff", b"\x00"]


def _mutate(data: bytes, op: str, pos: int, junk_bytes: bytes) -> bytes:
    p = pos % (len(data) + 1)
    return {
        "bom": b"\xef\xbb\xbf" + data,
        "cut": data[:p],
        "insert": data[:p] + junk_bytes + data[p:],
        "overwrite": data[:p] + junk_bytes + data[p + len(junk_bytes) :],
        "crlf": data.replace(b"\n", b"\r\n"),
        "empty": b"",
        "blank-lines": data.replace(b"\n", b"\n\n  \n"),
        "none": data,
    }[op]


@FUZZ
@given(
    records=st.lists(row, max_size=5),
    fmt=st.sampled_from(["jsonl", "json"]),
    ascii_only=st.booleans(),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["bom", "cut", "insert", "overwrite", "crlf", "empty", "blank-lines", "none"]),
            st.integers(0, 10**6),
            st.sampled_from(BAD_BYTES),
        ),
        max_size=3,
    ),
)
def _files(tok, tally, tmp_path_factory, records, fmt, ascii_only, ops):
    data = _serialise(records, fmt, ascii_only)
    if data is None:
        return
    for op, pos, junk_bytes in ops:
        data = _mutate(data, op, pos, junk_bytes)
    path = tmp_path_factory.mktemp("fuzz") / f"data.{fmt}"
    path.write_bytes(data)
    tally.inputs += 1
    tally.files += 1
    try:
        conv = load_conversations(path, bad_rows="skip")
    except ValueError as e:  # a .json file holding one object or a scalar: a whole-file message
        assert "JSON file holds" in str(e), str(e)
        return
    tally.rows += conv.rows_in
    if fmt == "jsonl":  # every non-blank line is one row, whatever its bytes
        text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")
        assert conv.rows_in == sum(1 for line in text.split("\n") if line.strip())
    ds = tokenize_dataset(
        conv, tok, max_seq_length=MAX_SEQ, messages_field="messages", bad_rows="skip", show_progress=False
    )
    tally.report(ds.report, rows_in=conv.rows_in)


def test_fuzzed_files_are_used_or_reported(tok, tally, tmp_path_factory):
    _files(tok, tally, tmp_path_factory)


def test_a_file_cut_at_every_byte(tmp_path, tally, figures):
    """A partial download: every complete record is used, the cut one is reported as truncated."""
    cuts = 0
    for fmt in ("jsonl", "json"):
        data = _serialise(VALID, fmt, ascii_only=False)
        ends, depth = [], 0  # byte offsets where each record's closing brace ends
        for i, b in enumerate(data):
            depth += {ord("{"): 1, ord("}"): -1}.get(b, 0)
            if b == ord("}") and depth == 0:
                ends.append(i + 1)
        for cut in range(len(data) + 1):
            path = tmp_path / f"cut.{fmt}"
            path.write_bytes(data[:cut])
            conv = load_conversations(path, bad_rows="skip")
            complete = sum(1 for e in ends if e <= cut)
            assert len(conv) == complete, (fmt, cut)
            kinds = [p.kind for p in conv.problems]
            if fmt == "jsonl":  # the cut record, if any, is reported
                tail = data[max([0] + [e for e in ends if e <= cut]) : cut]
                assert kinds == (["truncated-file"] if tail.strip() else []), (fmt, cut, kinds)
            else:  # a list cut anywhere lacks its ']': one truncated-file problem
                assert kinds == ([] if cut == len(data) or not data[:cut].strip() else ["truncated-file"]), (
                    fmt,
                    cut,
                    kinds,
                )
            assert conv.rows_in == len(conv) + len(conv.problems)
            tally.kinds.update(kinds)
            cuts += 1
    tally.inputs += cuts
    tally.files += cuts
    figures.set(cut_points=cuts)


def test_special_files(tmp_path, tok, tally):
    good = _serialise(VALID, "jsonl", ascii_only=False)
    cases = {
        "empty.jsonl": (b"", 0, 0),
        "blank.jsonl": (b"\n  \n\t\n", 0, 0),
        "bom.jsonl": (b"\xef\xbb\xbf" + good, 3, 0),
        "bom.json": (b"\xef\xbb\xbf" + _serialise(VALID, "json", False), 3, 0),
        "crlf.jsonl": (good.replace(b"\n", b"\r\n"), 3, 0),
        "latin1.jsonl": (good.replace("Merhaba".encode(), "Merhaba ş".encode("cp1254")), 2, 1),
        "utf16.jsonl": (good.decode().encode("utf-16"), None, None),
        "nested.jsonl": (b"[" * 100_000 + b"]" * 100_000 + b"\n" + good, 3, 1),
        "nested.json": (b"[" + b"[" * 100_000 + b"]" * 100_000 + b"]", 0, 1),
        "nul.jsonl": (good.replace(b"\n", b"\x00\n", 1), 2, 1),
    }
    for name, (data, used, bad) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        conv = load_conversations(path, bad_rows="skip")
        if used is not None:
            assert (len(conv), len(conv.problems)) == (used, bad), (name, [str(p) for p in conv.problems])
        else:
            assert len(conv) == 0 and conv.problems, name
        for p in conv.problems:
            str(p).encode("utf-8")
        ds = tokenize_dataset(
            conv, tok, max_seq_length=MAX_SEQ, messages_field="messages", bad_rows="skip", show_progress=False
        )
        tally.report(ds.report, rows_in=conv.rows_in)
        tally.inputs += 1
        tally.files += 1
        tally.rows += conv.rows_in
    kinds = {p.kind for p in load_conversations(tmp_path / "latin1.jsonl", bad_rows="skip").problems}
    assert kinds == {"invalid-utf8"}
    with pytest.raises(ValueError, match="holds one object"):
        (tmp_path / "one.json").write_text(json.dumps(VALID[0]))
        load_conversations(tmp_path / "one.json")


def test_a_one_megabyte_turn(tok, tally, figures):
    big = ("word " * 210_000)[:1_000_000]
    rows = [
        {"conversations": [{"from": "human", "value": big}, {"from": "gpt", "value": "ok"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": big}]},
    ]
    t0 = time.perf_counter()
    for train_on in ("all", "assistant"):
        ds = tokenize_dataset(
            load_conversations(rows),
            tok,
            max_seq_length=2048,
            messages_field="messages",
            train_on=train_on,
            bad_rows="skip",
            show_progress=False,
        )
        tally.report(ds.report, rows_in=2)
        assert ds.report.truncated == 2 and max(ds.lengths) == 2048
        if train_on == "assistant":  # the answer is cut away in the first row: counted, not trained on
            assert [p.kind for p in ds.report.skipped] == ["no-trained-token"] and len(ds) == 1
    seconds = time.perf_counter() - t0  # recorded, not asserted: speed is a benchmark's business
    tally.inputs += 2
    tally.rows += 4
    figures.set(big_turn_chars=len(big), big_turn_s=round(seconds / 2, 2))


def test_zz_record_figures(tally, figures):
    """Runs last in this file (pytest keeps file order): writes the tallies as the section's figures."""
    figures.set(
        inputs=tally.inputs,
        rows=tally.rows,
        files=tally.files,
        problems=sum(tally.kinds.values()),
        problem_kinds=", ".join(f"{k} {n}" for k, n in tally.kinds.most_common()),
        api_errors=tally.api_errors,
        uncaught=0,
        accounting_errors=0,
    )
    assert tally.inputs > 500 and tally.files > 100
