"""What can be wrong with a data row, and the report that accounts for every row.

A ``Problem`` names one row (by file line where there is one, else by 0-based row index), a short
``kind`` and a sentence saying what is wrong and what to do. A ``DataReport`` holds the counts the
reliability contract promises: ``rows_in == rows_used + len(skipped)``; ``warnings`` are rows
that were used but deserve a look (unknown roles mapped, rows truncated). ``DataError`` is the
``ValueError`` that carries a report when bad rows stop training.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

# Problem kinds. Fatal ones make a row unusable; the rest are warnings.
FATAL_KINDS = (
    "invalid-json",
    "invalid-utf8",
    "truncated-file",
    "not-an-object",
    "no-conversation",
    "bad-message",
    "unknown-role",
    "empty-turn",
    "no-assistant",
    "no-user",
    "assistant-first",
    "ends-with-user",
    "render-error",
    "no-trained-token",
    "bad-text",
    "bad-tokens",
)
WARNING_KINDS = ("unknown-role-mapped", "over-long")
KNOWN_ROLES = ("system", "user", "assistant", "tool", "ipython")


@dataclass
class Problem:
    """One row's problem. ``row`` is the 0-based input row index, ``line`` the 1-based file line."""

    kind: str
    reason: str
    row: int | None = None
    line: int | None = None

    @property
    def where(self) -> str:
        if self.line is not None:
            return f"line {self.line}"
        return f"row {self.row}" if self.row is not None else "file"

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class DataReport:
    """Every input row accounted for: ``rows_in == rows_used + len(skipped)``.

    Attributes:
        rows_in: rows read (including unreadable ones).
        rows_used: rows that will be trained on.
        skipped: one Problem per unusable row (the first problem found in it).
        truncated: rows cut to ``max_seq_length``.
        warnings: problems of used rows (unknown roles mapped, truncation), for information.
        lengths: token count of each used row before truncation (for statistics).
        tokens: tokens kept after truncation; trained_tokens: of those, tokens with a label.
    """

    rows_in: int = 0
    rows_used: int = 0
    skipped: list[Problem] = field(default_factory=list)
    truncated: int = 0
    warnings: list[Problem] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    tokens: int = 0
    trained_tokens: int = 0
    max_seq_length: int | None = None

    @property
    def ok(self) -> bool:
        """True when there are rows and none is unusable."""
        return not self.skipped and self.rows_in > 0

    def check(self) -> None:
        assert self.rows_in == self.rows_used + len(self.skipped), (
            f"row accounting broken: {self.rows_in} in != {self.rows_used} used + {len(self.skipped)} skipped"
        )

    def stats(self) -> dict[str, int]:
        """Token-length statistics of the used rows (before truncation): count, min, median, p95, max, total."""
        xs = sorted(self.lengths)
        if not xs:
            return {"count": 0, "min": 0, "median": 0, "p95": 0, "max": 0, "total": 0}
        return {
            "count": len(xs),
            "min": xs[0],
            "median": _quantile(xs, 0.5),
            "p95": _quantile(xs, 0.95),
            "max": xs[-1],
            "total": sum(xs),
        }

    def summary(self) -> str:
        """One paragraph: rows in/used/skipped by reason, truncation, tokens."""
        parts = [f"data: {self.rows_in} rows in, {self.rows_used} used, {len(self.skipped)} skipped"]
        if self.skipped:
            kinds = Counter(p.kind for p in self.skipped)
            parts[0] += " (" + ", ".join(f"{n} {k}" for k, n in kinds.most_common()) + ")"
        if self.truncated:
            parts.append(f"{self.truncated} truncated to {self.max_seq_length} tokens")
        if self.tokens:
            parts.append(f"{self.tokens:,} tokens, {self.trained_tokens:,} trained")
        text = "; ".join(parts)
        if self.skipped:
            shown = "; ".join(str(p) for p in self.skipped[:5])
            more = f" (and {len(self.skipped) - 5} more)" if len(self.skipped) > 5 else ""
            text += f". Skipped: {shown}{more}"
        return text

    def merge_load(self, problems: Sequence[Problem], warnings: Sequence[Problem] = ()) -> None:
        """Add rows that never reached tokenization (unreadable in the file) to the account."""
        self.rows_in += len(problems)
        self.skipped = sorted([*problems, *self.skipped], key=_order)
        self.warnings = sorted([*warnings, *self.warnings], key=_order)


class DataError(ValueError):
    """Bad rows stopped the run. ``.report`` is the DataReport listing every one of them."""

    def __init__(self, report: DataReport, what: str = "data") -> None:
        self.report = report
        lines = [str(p) for p in report.skipped[:20]]
        more = f"\n  ... and {len(report.skipped) - 20} more" if len(report.skipped) > 20 else ""
        super().__init__(
            f"{len(report.skipped)} of {report.rows_in} {what} rows are unusable:\n  "
            + "\n  ".join(lines)
            + more
            + "\nFix them (`hizli data check FILE` lists them all), or skip them with bad_rows='skip' "
            "(--set train.bad_rows=skip); skipped rows are counted in the data report."
        )


def validate_messages(
    messages: Any, *, need_assistant: bool = True, check_order: bool = True
) -> tuple[str, str] | None:
    """The first problem that makes a role/content conversation unusable, as (kind, reason), or None.

    Checks: a non-empty list; every message a dict with a known role and a string content; no
    empty (whitespace-only) turn; and, when ``need_assistant`` (a conversation to train on), an
    assistant turn; with ``check_order`` also a user turn, no assistant turn before the first user
    turn, and no unanswered user turn at the end (``order_problem``).
    """
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        what = (
            "empty"
            if isinstance(messages, (list, tuple))
            else ("missing" if messages is None else f"a {type(messages).__name__}")
        )
        return "no-conversation", f"no conversation (the message list is {what})"
    has_assistant = False
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return "bad-message", f"message {k} is not a {{role, content}} pair with text content: {_short(m)}"
        if m["role"] not in KNOWN_ROLES:
            return "unknown-role", (
                f"message {k} has the unknown role {m['role']!r}; use user, assistant or system "
                "(standardize_sharegpt maps ShareGPT names)"
            )
        if not m["content"].strip():
            return "empty-turn", f"message {k} ({m['role']}) is empty"
        if not is_unicode(m["content"]):
            return "bad-message", f"message {k} ({m['role']}) {NOT_UNICODE}"
        has_assistant |= m["role"] == "assistant"
    if not need_assistant:
        return None
    if not has_assistant:
        return "no-assistant", "no assistant turn: nothing to learn from this conversation"
    return order_problem(messages) if check_order else None


def order_problem(messages: Any) -> tuple[str, str] | None:
    """Whether the turns of a valid conversation with an assistant turn come in the order a chat has:
    a user turn, none of the assistant's before it, no unanswered user turn at the end. Training keeps
    such rows (their assistant turns still teach) and warns; ``hizli data check`` calls them unusable."""
    roles = [m["role"] for m in messages]
    if "user" not in roles:
        return "no-user", (
            "no user turn: the assistant answers nothing (after role mapping the roles are "
            f"{', '.join(dict.fromkeys(roles))}; map the asking role to user)"
        )
    first = next(k for k, r in enumerate(roles) if r != "system")
    if roles[first] == "assistant":
        return "assistant-first", (
            f"the conversation starts with the assistant (message {first}) before any user "
            "turn; drop that opening message or add the user turn it answers"
        )
    if roles[-1] == "user":
        return "ends-with-user", (
            f"the conversation ends with a user turn (message {len(roles) - 1}) that has no "
            "answer; drop it or add the assistant's answer"
        )
    return None


NOT_UNICODE = (
    "holds text that is not valid Unicode (a lone surrogate such as \\ud800, usually a broken "
    "JSON escape); tokenizers cannot encode it"
)


def is_unicode(text: str) -> bool:
    """False when ``text`` holds lone surrogates, which no tokenizer can encode (they come from JSON
    escapes such as ``"\\ud800"`` or from bytes read with ``surrogateescape``)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _order(p: Problem) -> tuple[int, int]:
    return (p.row if p.row is not None else 1 << 62, p.line or 0)


def _quantile(xs: list[int], q: float) -> int:
    # nearest-rank quantile on sorted data: the smallest value with at least q of the data at or below it
    import math

    return xs[max(0, math.ceil(q * len(xs)) - 1)]


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."
