"""``TokenizedDataset``: the rows a run trains on, as token ids and labels stored flat.

``ds[i]`` is ``{"input_ids", "labels"}`` (labels aligned with input_ids, -100 where nothing is
trained), ``ds.lengths`` feeds the batcher, ``ds.report`` accounts for every input row. Made by
``hizli.data.tokenize.tokenize_dataset`` from text or conversations, or by
``TokenizedDataset.from_rows`` from rows that are already token ids.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from hizli import _log
from hizli.data.problems import DataReport, Problem

IGNORE = -100  # the label of a token that is not trained (transformers' convention)


class TokenizedDataset:
    """Token ids and labels of the usable rows, stored flat (int32) so 100k rows stay compact."""

    column_names = ["input_ids", "labels"]

    def __init__(
        self,
        ids: np.ndarray,
        labels: np.ndarray,
        offsets: np.ndarray,
        *,
        report: DataReport,
        max_seq_length: int | None,
        source_rows: np.ndarray,
        source_lines: Sequence[int | None] | None = None,
        texts: list[str] | None = None,
        train_on: str = "all",
    ) -> None:
        assert len(ids) == len(labels) == offsets[-1] and len(source_rows) == len(offsets) - 1
        self._ids, self._labels, self._offsets = ids, labels, offsets
        self.report = report
        self.max_seq_length = max_seq_length
        self.source_rows = source_rows  # input row index of each row
        self.source_lines = source_lines  # file line of each row, where known
        self.texts = texts  # rendered text of each row before truncation (for re-labelling)
        self.train_on = train_on
        self._lengths: list[int] | None = None

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"TokenizedDataset indices are integers, not {type(i).__name__}; use .select([...])")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} of a {n}-row dataset")
        a, b = self._offsets[i % n], self._offsets[i % n + 1]
        return {"input_ids": self._ids[a:b].tolist(), "labels": self._labels[a:b].tolist()}

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"TokenizedDataset(rows={len(self)}, tokens={int(self._offsets[-1])}, train_on={self.train_on!r})"

    @property
    def lengths(self) -> list[int]:
        """Tokens per row (after truncation)."""
        if self._lengths is None:
            self._lengths = np.diff(self._offsets).tolist()
        return self._lengths

    def describe_rows(self, indices: Sequence[int], limit: int = 20) -> str:
        """Where rows ``indices`` of this dataset came from, for messages: dataset rows, the input rows
        they were made from (rows dropped earlier shift the two apart) and file lines where known."""
        idx = [int(i) for i in indices]
        more = " ..." if len(idx) > limit else ""
        idx = idx[:limit]
        text = f"rows {idx}{more} of the training set"
        sources = [int(self.source_rows[i]) for i in idx]
        if sources != idx:
            text += f", input rows {sources}{more}"
        if self.source_lines is not None and any(self.source_lines[i] is not None for i in idx):
            text += f", file lines {[self.source_lines[i] for i in idx]}{more}"
        return text

    def select(self, indices: Sequence[int]) -> "TokenizedDataset":
        """The rows at ``indices`` (e.g. an eval split); its report counts only those rows."""
        idx = np.asarray(list(indices), dtype=np.int64)
        parts = [(self._offsets[i], self._offsets[i + 1]) for i in idx]
        ids = np.concatenate([self._ids[a:b] for a, b in parts]) if parts else self._ids[:0]
        labels = np.concatenate([self._labels[a:b] for a, b in parts]) if parts else self._labels[:0]
        offsets = np.concatenate([[0], np.cumsum([b - a for a, b in parts], dtype=np.int64)]).astype(np.int64)
        report = DataReport(
            rows_in=len(idx),
            rows_used=len(idx),
            max_seq_length=self.max_seq_length,
            tokens=int(offsets[-1]),
            trained_tokens=int((labels != IGNORE).sum()),
        )
        lines = [self.source_lines[i] for i in idx] if self.source_lines is not None else None
        texts = [self.texts[i] for i in idx] if self.texts is not None else None
        return TokenizedDataset(
            ids,
            labels,
            offsets,
            report=report,
            max_seq_length=self.max_seq_length,
            source_rows=self.source_rows[idx],
            source_lines=lines,
            texts=texts,
            train_on=self.train_on,
        )

    @classmethod
    def from_rows(cls, rows: Sequence[dict], max_seq_length: int | None = None) -> "TokenizedDataset":
        """Rows that are already tokenized (``input_ids``, optional ``labels``; no labels = train all)."""
        ids, labels, lengths, kept, skipped = [], [], [], [], []
        truncated = 0
        for i, row in enumerate(rows):
            bad = _token_row_problem(row)
            if bad is not None:
                skipped.append(Problem("bad-tokens", bad, row=i))
                continue
            x = list(row["input_ids"])
            y = list(row["labels"]) if row.get("labels") is not None else list(x)
            if len(x) != len(y):
                skipped.append(Problem("bad-message", f"{len(x)} input_ids but {len(y)} labels", row=i))
                continue
            if max_seq_length and len(x) > max_seq_length:
                x, y, truncated = x[:max_seq_length], y[:max_seq_length], truncated + 1
            if not any(v != IGNORE for v in y[1:]):
                skipped.append(Problem("no-trained-token", "no trained token", row=i))
                continue
            ids.append(np.asarray(x, dtype=np.int32))
            labels.append(np.asarray(y, dtype=np.int32))
            lengths.append(len(x))
            kept.append(i)
        flat_ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        flat_labels = np.concatenate(labels) if labels else np.zeros(0, np.int32)
        report = DataReport(
            rows_in=len(rows),
            rows_used=len(kept),
            skipped=skipped,
            truncated=truncated,
            lengths=list(lengths),
            tokens=len(flat_ids),
            max_seq_length=max_seq_length,
            trained_tokens=int((flat_labels != IGNORE).sum()),
        )
        report.check()
        if skipped:
            _log.info(report.summary())
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        return cls(
            flat_ids,
            flat_labels,
            offsets,
            report=report,
            max_seq_length=max_seq_length,
            source_rows=np.asarray(kept, dtype=np.int64),
        )


def _token_row_problem(row: Any) -> str | None:
    """Why a pre-tokenized row cannot be used (not a dict of integer lists), or None."""
    if not isinstance(row, dict):
        return f"the row is a {type(row).__name__}, not a dict with 'input_ids' (and 'labels')"
    for key in ("input_ids", "labels"):
        value = row.get(key)
        if value is None and key == "labels":
            continue
        if not isinstance(value, (list, tuple, np.ndarray)):
            return f"{key!r} is {'missing' if value is None else 'a ' + type(value).__name__}, not a list of token ids"
        ints = (
            np.asarray(value).dtype.kind in "iu"
            if isinstance(value, np.ndarray)
            else all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
        )
        if not ints:
            return f"{key!r} holds values that are not integer token ids"
        wrong = [int(v) for v in value if v < 0 and not (key == "labels" and v == IGNORE) or v >= 2**31]
        if wrong:
            allowed = "token ids >= 0, or -100 for no label" if key == "labels" else "token ids >= 0"
            return f"{key!r} holds {wrong[0]}; use {allowed}"
    return None
