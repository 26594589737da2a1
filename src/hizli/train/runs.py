"""Which run a checkpoint belongs to, so that resuming never continues another run.

A run is one fresh start of training. Its identity is recorded in every checkpoint's
``trainer_state.json`` under ``"run"``:

  started       when the fresh start happened (UTC, ISO 8601)
  recipe_hash   sha256 (first 12 hex digits) of the recipe minus the settings that may change on resume
  recipe        those hashed settings, so a refusal can name what differs

Resuming checks the checkpoint's ``recipe_hash`` against the recipe being run and refuses another
recipe's checkpoint, naming the settings that differ. A resumed run keeps the identity (start time)
of the run it continues.

Settings that may change on resume (``RESUMABLE``): how long to train (``train.max_steps``,
``train.num_train_epochs``: raise them to extend a finished run; the learning-rate schedule is then
computed for the new total from the resumed step on), how often to log, save and evaluate, where
outputs go, memory and error-handling policy that does not change the update (``max_memory_gib``,
``merge_micro_batches``, ``oom_retries``, ``nan_policy``, ``use_gradient_checkpointing``), data-loading
processes, how the ranks hold the base (``parallel``) and ``reshard``, the LoRA ``random_state`` (it only seeds the adapter the checkpoint replaces), and the
``output`` and ``chat`` sections (used after training). Everything else (model, LoRA, data, batch
size, optimizer, learning rate, seeds, ...) must match.

A fresh start must not leave an earlier run's checkpoints where ``resume`` would find them:
``hizli train`` with ``output.overwrite: true`` removes them (``remove_earlier_run``), the Python
``SFTTrainer.train()`` moves them into ``OUTPUT_DIR/earlier-runs/`` (``set_aside_earlier_run``);
both say so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hizli import _log

# section.key settings that may differ between a checkpoint's run and the run that resumes it
RESUMABLE = frozenset(
    {
        "train.max_steps",
        "train.num_train_epochs",
        "train.resume_from_checkpoint",
        "train.output_dir",
        "train.logging_steps",
        "train.logging_dir",
        "train.disable_tqdm",
        "train.report_to",
        "train.run_name",
        "train.save_strategy",
        "train.save_steps",
        "train.save_total_limit",
        "train.eval_strategy",
        "train.eval_steps",
        "train.per_device_eval_batch_size",
        "train.max_memory_gib",
        "train.merge_micro_batches",
        "train.oom_retries",
        "train.nan_policy",
        "train.dataloader_num_workers",
        "train.parallel",  # whole or sharded base weights: the same update
        "train.reshard",  # says that the number of ranks may change; keep_global_batch keeps the steps
        "data.dataset_num_proc",
        "lora.random_state",  # only seeds the initial adapter, which the checkpoint replaces
        "lora.use_gradient_checkpointing",  # recomputes or keeps activations: the same update
    }
)
RESUMABLE_SECTIONS = frozenset({"output", "chat"})
EARLIER_RUNS = "earlier-runs"
RUN_FILES = ("metrics.jsonl", "loss.png")  # what a run writes into OUTPUT_DIR besides its checkpoints


def identity(recipe: dict[str, Any]) -> dict[str, Any]:
    """The part of ``recipe`` (sections of settings) that a resumed run must share."""
    out: dict[str, Any] = {}
    for section, values in recipe.items():
        if section in RESUMABLE_SECTIONS:
            continue
        if isinstance(values, dict):
            out[section] = {k: v for k, v in values.items() if f"{section}.{k}" not in RESUMABLE}
        else:
            out[section] = values
    return json.loads(json.dumps(out, sort_keys=True, default=str))  # plain JSON types, as stored


def recipe_hash(recipe: dict[str, Any]) -> str:
    """Short sha256 of ``identity(recipe)``."""
    text = json.dumps(identity(recipe), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def new_run(recipe: dict[str, Any]) -> dict[str, Any]:
    """The identity of a run starting now."""
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {"started": started, "recipe_hash": recipe_hash(recipe), "recipe": identity(recipe)}


def describe(run: dict[str, Any] | None) -> str:
    """``run started <start time, ISO 8601 with offset>, recipe <12 hex digits>`` (or that it is unknown)."""
    if not run:
        return "a run with no run record"
    return f"run started {run.get('started', '?')}, recipe {run.get('recipe_hash', '?')}"


def run_of(checkpoint_dir: Path) -> dict[str, Any] | None:
    """The run record of a checkpoint folder, or None when it has none (or cannot be read)."""
    try:
        state = json.loads((Path(checkpoint_dir) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    run = state.get("run") if isinstance(state, dict) else None
    return run if isinstance(run, dict) else None


def check_same_recipe(state: dict[str, Any], recipe: dict[str, Any], path: Path) -> None:
    """Raise ``CheckpointError`` unless the checkpoint ``path`` (its ``state``) was made by ``recipe``."""
    from hizli.train.checkpoint import CheckpointError

    run = state.get("run")
    if not isinstance(run, dict) or not isinstance(run.get("recipe_hash"), str):
        raise CheckpointError(
            f"{path} has no run record (it was written by an older hizli), so it cannot be "
            "checked against this recipe; start a new run instead of resuming it"
        )
    if run["recipe_hash"] == recipe_hash(recipe):
        return
    differs = _differences(run.get("recipe") or {}, identity(recipe))
    shown = "; ".join(differs[:6]) + (f"; and {len(differs) - 6} more" if len(differs) > 6 else "")
    raise CheckpointError(
        f"{path} belongs to another recipe ({describe(run)}); this recipe differs in: {shown or 'unknown settings'}. "
        "Resume only with the recipe that made it (only max_steps/num_train_epochs, logging, saving and output "
        "settings may change), or start a new run"
    )


def resume_message(path: Path, state: dict[str, Any], total_steps: int) -> str:
    """What resuming from ``path`` does, in one line (including when nothing is left to train)."""
    step = state["global_step"]
    where = f"{path} (step {step}) of the {describe(state.get('run'))}"
    if step >= total_steps:
        return (
            f"nothing left to train: {where} has reached the {total_steps} steps this recipe asks for. "
            f"To train further, raise train.max_steps (e.g. --set train.max_steps={step + max(step, 10)}) "
            "and resume again"
        )
    return f"resuming {where}: steps {step + 1}-{total_steps}"


def earlier_run(output_dir: str | os.PathLike) -> tuple[list[Path], dict[str, Any] | None]:
    """The checkpoints in ``output_dir`` and the run record of the newest one."""
    from hizli.train.checkpoint import list_checkpoints

    found = list_checkpoints(output_dir)
    return found, (run_of(found[-1]) if found else None)


def remove_earlier_run(output_dir: str | os.PathLike) -> list[str]:
    """Delete an earlier run's checkpoints, metrics.jsonl and loss.png from ``output_dir`` (saying so);
    return the names removed."""
    found, run = earlier_run(output_dir)
    out = Path(output_dir)
    files = [out / name for name in RUN_FILES if (out / name).is_file()]
    if not found and not files:
        return []
    names = [p.name for p in found + files]
    _log.info(
        f"output.overwrite=true: removing the earlier run's {', '.join(names)} from {out} ({describe(run)})"
        if found
        else f"output.overwrite=true: removing the earlier run's {', '.join(names)} from {out}"
    )
    for p in found:
        shutil.rmtree(p)
    for p in files:
        p.unlink()
    return names


def set_aside_earlier_run(output_dir: str | os.PathLike) -> Path | None:
    """Move an earlier run's checkpoints (and its metrics.jsonl, loss.png) into
    ``output_dir/earlier-runs/<its start>/`` so a fresh run neither mixes with nor resumes them.
    Returns that folder, or None when there was nothing to move."""
    found, run = earlier_run(output_dir)
    if not found:
        return None
    out = Path(output_dir)
    stamp = (run or {}).get("started") or datetime.fromtimestamp(found[-1].stat().st_mtime, timezone.utc).isoformat(
        timespec="seconds"
    )
    base = out / EARLIER_RUNS / stamp.replace(":", "-").replace("+00-00", "Z")
    target, n = base, 1
    while target.exists():
        n += 1
        target = base.with_name(f"{base.name}.{n}")
    target.mkdir(parents=True)
    moved = found + [out / name for name in RUN_FILES if (out / name).is_file()]
    for p in moved:
        os.rename(p, target / p.name)
    _log.info(
        f"{out} held {', '.join(p.name for p in moved)} of an earlier run ({describe(run)}): moved to "
        f"{target}/ so that this fresh run does not resume or mix with them; delete that folder when you no "
        "longer need it"
    )
    return target


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    out = []
    for section in sorted(set(saved) | set(now)):
        a, b = saved.get(section), now.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    out.append(f"{section}.{key} {a.get(key)!r} -> {b.get(key)!r}")
        elif a != b:
            out.append(f"{section} {a!r} -> {b!r}")
    return out
