"""ShareGPT rows (``conversations: [{from, value}]``) to the role/content form chat templates read.

Role policy. ``human``/``user`` become ``user``; ``gpt``/``assistant``/``model``/``bot`` become
``assistant``; ``system`` stays ``system``; ``tool`` stays ``tool`` (OpenAI's role for tool output).
Role names are compared lower case without surrounding spaces. Any other role (real ShareGPT dumps
hold ``chatgpt``, ``bing``, ``bard``) follows ``unknown_roles``:

- ``"assistant"`` (default): treat it as the assistant. Those roles label answers written by a chat
  model, so this keeps the answer trainable.
- ``"user"``: treat it as the user.
- ``"drop"``: leave that message out.
- ``"error"``: raise ``ValueError`` naming the row and the role.

``aliases`` adds or overrides names (``{"chatgpt": "assistant", "function": "tool"}``). What was
mapped is said once per call as a log line with counts, e.g.
``standardize_sharegpt: 14 messages with unknown roles mapped to assistant (chatgpt: 8, bing: 4, bard: 2)``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Sequence

from hizli import _log

ROLE_MAP: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
    "tool": "tool",
}
UNKNOWN_ROLE_POLICIES = ("assistant", "user", "drop", "error")
COLUMNS = ("conversations", "messages")


def convert_messages(
    turns: Any, aliases: Mapping[str, str] | None = None, unknown_roles: str = "assistant", *, where: str = "row"
) -> tuple[list[dict[str, str]], Counter]:
    """One conversation to ``[{"role", "content"}]``.

    Args:
        turns: a list of messages, each with ``from``/``value`` or ``role``/``content`` keys.
        aliases: extra role names -> ``user`` | ``assistant`` | ``system`` | ``tool``.
        unknown_roles: policy for other roles (see the module docstring).
        where: how to name this row in error messages (``"line 12"``, ``"row 3"``).

    Returns:
        The converted messages and a Counter of the unknown role names met (before the policy).

    Raises:
        ValueError: the conversation is not a list of messages, a message lacks a role or a text
            content, or ``unknown_roles="error"`` met an unknown role.
    """
    if unknown_roles not in UNKNOWN_ROLE_POLICIES:
        raise ValueError(f"unknown_roles={unknown_roles!r}: use one of {', '.join(UNKNOWN_ROLE_POLICIES)}")
    if turns is None:
        return [], Counter()
    if not isinstance(turns, (list, tuple)):
        raise ValueError(f"{where}: the conversation is a {type(turns).__name__}, not a list of messages")
    roles = _role_map(aliases)
    out: list[dict[str, str]] = []
    unknown: Counter = Counter()
    for k, m in enumerate(turns):
        if not isinstance(m, Mapping):
            raise ValueError(
                f"{where}: message {k} is a {type(m).__name__}, not an object with from/value or role/content"
            )
        raw_role = m.get("from", m.get("role"))
        if not isinstance(raw_role, str):
            raise ValueError(
                f"{where}: message {k} has no role (expected a 'from' or 'role' key; it has {sorted(map(str, m))})"
            )
        content = m["value"] if "value" in m else m.get("content")
        content = _text(content)
        if content is None:
            raise ValueError(
                f"{where}: message {k} ({raw_role!r}) has no text content (expected a string 'value' or 'content')"
            )
        role = roles.get(raw_role.strip().lower())
        if role is None:
            unknown[raw_role] += 1
            if unknown_roles == "error":
                raise ValueError(
                    f"{where}: message {k} has the unknown role {raw_role!r}; map it with "
                    f"aliases={{{raw_role!r}: 'assistant'}} or choose unknown_roles="
                    "'assistant' | 'user' | 'drop'"
                )
            if unknown_roles == "drop":
                continue
            role = unknown_roles
        out.append({"role": role, "content": content})
    return out, unknown


def standardize_sharegpt(
    dataset, aliases: Mapping[str, str] | None = None, unknown_roles: str = "assistant", *, num_proc: int | None = None
):
    """Convert ShareGPT ``from``/``value`` messages to ``role``/``content`` (the recipe's step 6).

    Works on a ``datasets.Dataset`` (through ``.map``; ``num_proc`` processes), a ``DatasetDict``
    (each split), or a list of dicts (a new list is returned). The ``conversations`` column is
    converted in place (a ``messages`` column if there is no ``conversations``); other columns are
    kept. Rows already in role/content form come through unchanged (their role names are still
    normalised). A row whose conversation is missing or null gets an empty list, counted in the
    log line; ``hizli data check`` and training report such rows.

    Args:
        dataset: the rows.
        aliases: extra role names, e.g. ``{"chatgpt": "assistant"}``.
        unknown_roles: ``"assistant"`` (default), ``"user"``, ``"drop"`` or ``"error"``.
        num_proc: processes for ``Dataset.map``.

    Returns:
        The same kind of object with converted conversations.
    """
    if unknown_roles not in UNKNOWN_ROLE_POLICIES:
        raise ValueError(f"unknown_roles={unknown_roles!r}: use one of {', '.join(UNKNOWN_ROLE_POLICIES)}")
    if getattr(dataset, "hizli_standardized", False):
        return dataset  # hizli.data.load output is already role/content, with its own report
    if isinstance(getattr(dataset, "column_names", None), dict):  # a DatasetDict: every split
        from datasets import DatasetDict

        return DatasetDict(
            {k: standardize_sharegpt(v, aliases, unknown_roles, num_proc=num_proc) for k, v in dataset.items()}
        )
    if hasattr(dataset, "map") and hasattr(dataset, "column_names"):
        return _standardize_dataset(dataset, aliases, unknown_roles, num_proc)
    if isinstance(dataset, Sequence) and not isinstance(dataset, (str, bytes)):
        return _standardize_list(dataset, aliases, unknown_roles)
    raise ValueError(
        f"standardize_sharegpt got a {type(dataset).__name__}; pass a datasets.Dataset or a "
        "list of dicts with a 'conversations' (or 'messages') list"
    )


def _standardize_list(rows: Sequence[Any], aliases, unknown_roles: str) -> list[dict]:
    column = _column(rows[0].keys() if rows and isinstance(rows[0], Mapping) else ())
    out = []
    unknown: Counter = Counter()
    missing = 0
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"row {i} is a {type(row).__name__}, not a dict with a {column!r} list")
        turns = row.get(column)
        missing += turns is None
        messages, seen = convert_messages(turns, aliases, unknown_roles, where=f"row {i}")
        unknown.update(seen)
        out.append({**row, column: messages})
    _say(unknown, unknown_roles, missing, len(out))
    return out


def _standardize_dataset(dataset, aliases, unknown_roles: str, num_proc: int | None):
    column = _column(dataset.column_names)
    seen_col, missing_col = "__hizli_unknown_roles", "__hizli_no_conversation"

    def convert(batch: dict, indices: list[int]) -> dict:
        converted, seen, missing = [], [], []
        for i, turns in zip(indices, batch[column]):
            messages, unknown = convert_messages(turns, aliases, unknown_roles, where=f"row {i}")
            converted.append(messages)
            seen.append(list(unknown.elements()))
            missing.append(turns is None)
        # Counted through temporary columns: a closure's counter would not survive num_proc > 1.
        return {column: converted, seen_col: seen, missing_col: missing}

    mapped = dataset.map(convert, batched=True, with_indices=True, num_proc=num_proc, desc="standardize_sharegpt")
    unknown: Counter = Counter()
    for names in mapped[seen_col]:
        unknown.update(names)
    _say(unknown, unknown_roles, sum(mapped[missing_col]), len(mapped))
    return mapped.remove_columns([seen_col, missing_col])


def _column(names) -> str:
    names = list(names)
    for c in COLUMNS:
        if c in names:
            return c
    raise ValueError(
        f"standardize_sharegpt needs a 'conversations' or 'messages' column; the rows have {sorted(names)}"
    )


def _role_map(aliases: Mapping[str, str] | None) -> dict[str, str]:
    roles = dict(ROLE_MAP)
    for name, role in (aliases or {}).items():
        if role not in ("user", "assistant", "system", "tool"):
            raise ValueError(f"aliases[{name!r}]={role!r}: map a role name to user, assistant, system or tool")
        roles[str(name).strip().lower()] = role
    return roles


def _text(content: Any) -> str | None:
    """A message's text: a string, or the text parts of an OpenAI content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) for p in content):
        parts = [p.get("text") for p in content if p.get("type", "text") == "text"]
        if parts and all(isinstance(p, str) for p in parts):
            return "".join(parts)
    return None


def _say(unknown: Counter, policy: str, missing: int, rows: int) -> None:
    if unknown:
        what = {"assistant": "mapped to assistant", "user": "mapped to user", "drop": "dropped"}[policy]
        detail = ", ".join(f"{name}: {n}" for name, n in unknown.most_common())
        _log.info(
            f"standardize_sharegpt: {sum(unknown.values())} messages with unknown roles {what} ({detail}); "
            "set unknown_roles='assistant' | 'user' | 'drop' | 'error' or aliases={...} to change this"
        )
    if missing:
        _log.info(
            f"standardize_sharegpt: {missing} of {rows} rows have no conversation (null); they stay empty "
            "and are reported when tokenized"
        )
