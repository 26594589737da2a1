"""Read conversations from the hub or a local file, in any of three schemas, accounting for every row.

Sources:
- a hub dataset id (``"mlabonne/FineTome-100k"``): ``datasets.load_dataset(name, split=split)``;
- ``.jsonl``: one JSON object per line (blank lines are ignored);
- ``.json``: a JSON list of objects, or JSON lines. A list cut off mid-record (a partial download)
  yields every complete record plus one ``truncated-file`` problem for the cut record;
- ``.parquet``: one row per record;
- a ``datasets.Dataset`` or a list of dicts already in memory.

Schemas (``schema="auto"`` detects each row's from its keys):
- ``sharegpt``: ``{"conversations": [{"from": "human", "value": ...}, ...]}``;
- ``messages`` (OpenAI): ``{"messages": [{"role": "user", "content": ...}, ...]}``;
- ``alpaca``: ``{"instruction": ..., "input": ..., "output": ..., "system"?: ...}``; a non-empty
  input follows the instruction after a blank line.

Everything becomes ``{"messages": [{"role", "content"}, ...]}`` with the role policy of
``hizli.data.sharegpt``. Rows that cannot be used (invalid JSON, no conversation, a malformed
message, an empty turn, no assistant or no user turn, a conversation that starts with the assistant
or ends with the user, an unknown role under ``unknown_roles="error"``) are
reported with their line (``.jsonl``/``.json``) or 0-based row index: ``bad_rows="error"`` raises a
``DataError`` listing all of them, ``"skip"`` keeps them in ``.problems`` so the data report counts them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Iterator

from hizli import _log
from hizli.data.problems import DataError, DataReport, Problem, order_problem, validate_messages
from hizli.data.sharegpt import convert_messages

SCHEMAS = ("auto", "sharegpt", "messages", "alpaca")


class Conversations(Sequence):
    """Rows normalised to ``{"messages": [...]}``, with where each came from and what was unusable.

    A sequence of row dicts (``len``, indexing, slicing). ``problems`` are the unusable input rows
    (not among ``rows``); a contiguous slice keeps the problems that fall between its rows, so
    splitting into train/eval never loses or doubles one. ``tokenize_dataset`` accepts this object
    directly and reports problems by file line.
    """

    column_names = ["messages"]
    hizli_standardized = True  # standardize_sharegpt passes it through unchanged

    def __init__(
        self,
        rows: list[dict],
        *,
        input_rows: list[int],
        lines: list[int | None],
        problems: list[Problem],
        warnings: list[Problem],
        source: str = "",
        schema: str = "auto",
    ) -> None:
        assert len(rows) == len(input_rows) == len(lines)
        self.rows, self.input_rows, self.lines = rows, input_rows, lines
        self.problems, self.warnings = problems, warnings
        self.source, self.schema = source, schema

    @property
    def rows_in(self) -> int:
        return len(self.rows) + len(self.problems)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self.rows))
            if step != 1:
                raise ValueError("Conversations supports contiguous slices only (step 1)")
            stop = max(start, stop)
            lo = self.input_rows[start] if start > 0 and start < len(self.rows) else (-1 if start == 0 else 1 << 62)
            hi = self.input_rows[stop] if stop < len(self.rows) else 1 << 62
            keep = lambda ps: [p for p in ps if lo <= (p.row if p.row is not None else 1 << 61) < hi]  # noqa: E731
            return Conversations(
                self.rows[start:stop],
                input_rows=self.input_rows[start:stop],
                lines=self.lines[start:stop],
                problems=keep(self.problems),
                warnings=keep(self.warnings),
                source=self.source,
                schema=self.schema,
            )
        return self.rows[index]

    def report(self) -> DataReport:
        """The account of this load alone (before tokenization)."""
        return DataReport(
            rows_in=self.rows_in, rows_used=len(self.rows), skipped=list(self.problems), warnings=list(self.warnings)
        )

    def to_dataset(self):
        """A ``datasets.Dataset`` with one ``messages`` column."""
        from datasets import Dataset

        return Dataset.from_list(self.rows)


def load_conversations(
    source: Any,
    *,
    split: str = "train",
    schema: str = "auto",
    max_rows: int | None = None,
    unknown_roles: str = "assistant",
    aliases: dict[str, str] | None = None,
    bad_rows: str = "error",
    turn_order: str = "warn",
) -> Conversations:
    """Read conversations from ``source`` and normalise them to role/content messages.

    Args:
        source: hub dataset id, path to a ``.jsonl``/``.json``/``.parquet`` file, a
            ``datasets.Dataset`` or a list of dicts.
        split: the hub split to read (``"train"``, ``"train[:1000]"``).
        schema: ``"auto"``, ``"sharegpt"``, ``"messages"`` or ``"alpaca"``.
        max_rows: read at most this many input rows (bad ones included).
        unknown_roles: what other roles become: ``"assistant"``, ``"user"``, ``"drop"``, ``"error"``.
        aliases: extra role names, e.g. ``{"chatgpt": "assistant"}``.
        bad_rows: ``"error"`` raises ``DataError`` listing every unusable row; ``"skip"`` keeps them
            in ``.problems`` (counted in the data report).
        turn_order: a conversation whose turns are out of a chat's order (no user turn, the assistant
            first, an unanswered user turn last): ``"warn"`` keeps it with a warning (training: its
            assistant turns still teach), ``"error"`` makes it unusable (``hizli data check``).

    Returns:
        A ``Conversations`` sequence of ``{"messages": [...]}`` rows.
    """
    if schema not in SCHEMAS:
        raise ValueError(f"schema={schema!r}: use one of {', '.join(SCHEMAS)}")
    if bad_rows not in ("error", "skip"):
        raise ValueError(f"bad_rows={bad_rows!r}: use 'error' or 'skip'")
    name, records = _open(source, split)
    rows, input_rows, lines, problems, warnings = [], [], [], [], []
    detected: set[str] = set()
    for index, (line, record) in enumerate(records):
        if max_rows is not None and index >= max_rows:
            break
        if isinstance(record, Problem):
            record.row = index
            problems.append(record)
            continue
        where = f"line {line}" if line is not None else f"row {index}"
        try:
            kind, messages, unknown = _messages(record, schema, unknown_roles, aliases, where)
        except _RowProblem as e:
            problems.append(Problem(e.kind, e.reason, row=index, line=line))
            continue
        detected.add(kind)
        bad = validate_messages(messages, check_order=False)
        order = order_problem(messages) if bad is None else None
        if bad is not None or (order is not None and turn_order == "error"):
            kind, reason = bad or order
            problems.append(Problem(kind, reason, row=index, line=line))
            continue
        if order is not None:
            warnings.append(Problem(order[0], order[1] + " (trained as it is)", row=index, line=line))
        if unknown:
            names = ", ".join(f"{r!r}" for r in unknown)
            what = "dropped" if unknown_roles == "drop" else f"mapped to {unknown_roles}"
            warnings.append(Problem("unknown-role-mapped", f"unknown role {names} {what}", row=index, line=line))
        rows.append({"messages": messages})
        input_rows.append(index)
        lines.append(line)
    out = Conversations(
        rows,
        input_rows=input_rows,
        lines=lines,
        problems=problems,
        warnings=warnings,
        source=name,
        schema=",".join(sorted(detected)) or schema,
    )
    msg = f"read {name}: {out.rows_in} rows ({out.schema}), {len(rows)} usable"
    if problems:
        msg += f", {len(problems)} unusable"
    mapped = sum(w.kind == "unknown-role-mapped" for w in warnings)
    if mapped:
        what = "dropped" if unknown_roles == "drop" else f"mapped to {unknown_roles}"
        msg += f", {mapped} with unknown roles {what}"
    if len(warnings) > mapped:
        msg += f", {len(warnings) - mapped} with turns out of a chat's order (kept; `hizli data check` lists them)"
    _log.info(msg)
    if problems and bad_rows == "error":
        raise DataError(out.report(), what=name)
    return out


# ---------------------------------------------------------------- sources
def _open(source: Any, split: str) -> tuple[str, Iterator[tuple[int | None, Any]]]:
    """(display name, iterator of (line or None, record or Problem))."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file():
            suffix = path.suffix.lower()
            if suffix == ".jsonl":
                return str(path), _read_jsonl(_decode(path.read_bytes()))
            if suffix == ".json":
                return str(path), _read_json(_decode(path.read_bytes()))
            if suffix == ".parquet":
                import pyarrow.parquet as pq

                return str(path), ((None, r) for r in pq.read_table(path).to_pylist())
            raise ValueError(f"{path}: unknown file type {suffix!r}; use .jsonl, .json or .parquet")
        if path.exists() or str(source).startswith((".", "/", "~")) or path.suffix in (".jsonl", ".json", ".parquet"):
            raise FileNotFoundError(f"{source}: no such data file")
        return str(source), _read_hub(str(source), split)
    if hasattr(source, "column_names") and hasattr(source, "__getitem__"):
        return "dataset", ((None, r) for r in source)
    if isinstance(source, (list, tuple)):
        return "rows", ((None, r) for r in source)
    raise ValueError(
        f"cannot read conversations from a {type(source).__name__}; pass a hub id, a file path, "
        "a datasets.Dataset or a list of dicts"
    )


def _read_hub(name: str, split: str) -> Iterator[tuple[None, Any]]:
    # The real path for hub ids (not reachable offline): the datasets library downloads and caches.
    from datasets import load_dataset

    dataset = load_dataset(name, split=split)
    for row in dataset:
        yield None, row


_TOO_DEEP = "the record is nested too deeply to read (thousands of levels of lists or objects)"


def _decode(data: bytes) -> str:
    """The file's text. A UTF-8 byte-order mark is dropped (editors on Windows write one). Bytes that
    are not UTF-8 become lone surrogates (``surrogateescape``) instead of failing the whole file, so
    the records holding them are reported one by one (``_bad_bytes``) and the rest stay usable."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.decode("utf-8", errors="surrogateescape")


def _bad_bytes(raw: str, line: int) -> Problem | None:
    """An ``invalid-utf8`` problem if ``raw`` (a record's source text) holds undecodable bytes."""
    if raw.isascii():
        return None
    for col, ch in enumerate(raw):
        if "\udc80" <= ch <= "\udcff":
            return Problem(
                "invalid-utf8",
                f"byte 0x{ord(ch) - 0xDC00:02x} (character {col + 1} of the record) is "
                "not UTF-8 text; save the file as UTF-8",
                line=line,
            )
    return None


def _read_jsonl(text: str) -> Iterator[tuple[int, Any]]:
    lines = text.split("\n")
    last = max((i for i, s in enumerate(lines) if s.strip()), default=-1)
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        bad = _bad_bytes(raw, i + 1)
        try:
            record = json.loads(raw)
            yield i + 1, record if bad is None else bad
        except RecursionError:
            yield i + 1, Problem("invalid-json", _TOO_DEEP, line=i + 1)
        except json.JSONDecodeError as e:
            if i == last and _cut_off(raw, e, ends_with_newline=text.endswith("\n")):
                yield (
                    i + 1,
                    Problem("truncated-file", "the file ends in the middle of this record (cut off?)", line=i + 1),
                )
            elif bad is not None:
                yield i + 1, bad
            else:
                yield i + 1, Problem("invalid-json", f"invalid JSON: {e.msg} (column {e.colno})", line=i + 1)


def _read_json(text: str) -> Iterator[tuple[int | None, Any]]:
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        if text.lstrip().startswith("["):
            yield from _read_json_list(text)
        else:  # a .json file holding JSON lines
            yield from _read_jsonl(text)
        return
    if isinstance(data, dict):
        raise ValueError("the JSON file holds one object; expected a list of records (or one record per line)")
    if not isinstance(data, list):
        raise ValueError(f"the JSON file holds a {type(data).__name__}; expected a list of records")
    yield from _read_json_list(text)  # parse again record by record to know each record's line


def _read_json_list(text: str) -> Iterator[tuple[int, Any]]:
    """Records of a JSON list one by one, so a cut or broken record costs only itself."""
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    line, counted = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text):
            yield (
                line_at(i),
                Problem(
                    "truncated-file", "the file ends before the list is closed with ']' (cut off?)", line=line_at(i)
                ),
            )
            return
        if text[i] == "]":
            return
        start, begin = line_at(i), i
        try:
            record, i = decoder.raw_decode(text, i)
            bad = _bad_bytes(text[begin:i], start)
            if bad is not None:
                yield start, bad
                continue
        except RecursionError:
            yield start, Problem("invalid-json", _TOO_DEEP + "; the records after it cannot be read", line=start)
            return
        except json.JSONDecodeError as e:
            if _cut_off(text[i:], e, ends_with_newline=text.endswith("\n"), offset=i):
                yield (
                    start,
                    Problem("truncated-file", "the file ends in the middle of this record (cut off?)", line=start),
                )
            else:
                bad = _bad_bytes(text[e.pos : e.pos + 1], e.lineno)
                why = bad.reason.split(" (", 1)[0] if bad is not None else e.msg
                yield (
                    start,
                    Problem(
                        "invalid-json",
                        f"invalid JSON at line {e.lineno}, column {e.colno}: {why}; "
                        "the records after it cannot be read",
                        line=start,
                    ),
                )
            return
        yield start, record


def _cut_off(rest: str, e: json.JSONDecodeError, *, ends_with_newline: bool, offset: int = 0) -> bool:
    """Whether a decode error means the text simply stops inside the record."""
    if e.msg.startswith("Unterminated string"):
        return True
    return e.pos - offset >= len(rest.rstrip()) - 1 or (not ends_with_newline and e.pos - offset >= len(rest) - 1)


# ---------------------------------------------------------------- rows
class _RowProblem(Exception):
    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def _messages(record: Any, schema: str, unknown_roles: str, aliases, where: str):
    """(schema, messages, unknown role names) for one record; _RowProblem when it has none."""
    if not isinstance(record, dict):
        raise _RowProblem("not-an-object", f"the record is a {type(record).__name__}, not a JSON object")
    kind = schema if schema != "auto" else _detect(record)
    if kind is None:
        raise _RowProblem(
            "no-conversation",
            "no conversation: expected a 'conversations' or 'messages' list or "
            f"'instruction'/'output' fields, found keys {sorted(map(str, record))[:8]}",
        )
    if kind == "alpaca":
        return kind, _alpaca(record), []
    column = "conversations" if kind == "sharegpt" else "messages"
    if column not in record:
        other = "messages" if column == "conversations" else "conversations"
        hint = f" (it has {other!r}: use schema='auto')" if other in record else ""
        raise _RowProblem("no-conversation", f"no {column!r} field for schema={kind}{hint}")
    try:
        messages, unknown = convert_messages(record[column], aliases, unknown_roles, where=where)
    except ValueError as e:
        text = str(e).split(": ", 1)[-1]
        raise _RowProblem("unknown-role" if "unknown role" in text else "bad-message", text) from None
    return kind, messages, list(unknown)


def _detect(record: dict) -> str | None:
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "messages"
    if "instruction" in record and ("output" in record or "response" in record):
        return "alpaca"
    return None


def _alpaca(record: dict) -> list[dict[str, str]]:
    fields = {k: record.get(k) for k in ("system", "instruction", "input", "output")}
    if fields["output"] is None:
        fields["output"] = record.get("response")
    for k in ("instruction", "output"):
        if not isinstance(fields[k], str):
            raise _RowProblem("bad-message", f"alpaca field {k!r} is {_kind(fields[k])}, not text")
    for k in ("system", "input"):
        if fields[k] is not None and not isinstance(fields[k], str):
            raise _RowProblem("bad-message", f"alpaca field {k!r} is {_kind(fields[k])}, not text")
    prompt = fields["instruction"]
    if fields["input"] and fields["input"].strip():
        prompt = f"{prompt}\n\n{fields['input']}"
    messages = [{"role": "system", "content": fields["system"]}] if fields["system"] else []
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": fields["output"]}]


def _kind(value: Any) -> str:
    return "missing" if value is None else f"a {type(value).__name__}"
