"""``OUTPUT_DIR/recipe.yaml``: the resolved recipe of a run, saved beside its outputs.

``hizli train`` passes the recipe it ran; a run started from Python records what the objects
say (model source, LoRA settings, data options, training arguments).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hizli.train.args import TrainingArguments


def write_recipe(output_dir: str | os.PathLike, recipe: dict[str, Any]) -> Path:
    """Write ``recipe`` as YAML atomically (temporary file, then rename); returns the path."""
    import yaml

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "recipe.yaml.tmp"
    tmp.write_text(yaml.safe_dump(recipe, sort_keys=False))
    os.replace(tmp, out / "recipe.yaml")
    return out / "recipe.yaml"


def recipe_from_objects(
    model: Any,
    args: TrainingArguments,
    *,
    max_seq_length: int,
    dataset_text_field: str | None,
    packing: bool,
    train_on: str,
    rows: int,
) -> dict[str, Any]:
    """What a run started from Python can say about its recipe."""
    from hizli.models.record import find_state

    record = find_state(model)
    info = record.info if record is not None else None
    return {
        "model": {
            "name": info.source if info else None,
            "max_seq_length": max_seq_length,
            "dtype": info.dtype if info else None,
            "load_in_4bit": info.load_in_4bit_requested if info else None,
        },
        "lora": record.lora if record is not None else None,
        "data": {"dataset_text_field": dataset_text_field, "packing": packing, "train_on": train_on, "rows": rows},
        "train": jsonable(args.to_dict()),
    }


def jsonable(values: dict[str, Any]) -> dict[str, Any]:
    """The entries whose values JSON and YAML can hold as they are."""
    return {k: v for k, v in values.items() if v is None or isinstance(v, (str, int, float, bool, list, dict))}
