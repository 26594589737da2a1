"""Checkpoints that are either complete or absent, and resuming from them exactly.

A checkpoint is written into a hidden temporary folder beside its final place, every file is
flushed to disk, a checksum list is written last, and the folder is renamed to ``checkpoint-N``.
A rename within one folder is atomic on POSIX file systems, so a crash or ``kill -9`` at any moment
leaves either the previous checkpoints or the complete new one, never half of one.

Contents of ``checkpoint-N/``:
  adapter_model.safetensors, adapter_config.json   the adapter, loadable by PEFT
  optimizer.pt, rng_state.pt                        tensors only (loaded with weights_only=True)
  trainer_state.json                                step, scheduler, data position, log history, and the
                                                    run it belongs to (``hizli.train.runs``)
  checksums.json                                    sha256 of every other file, written last
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from hizli.train.args import TrainingArguments

PREFIX = "checkpoint-"
_STEP = re.compile(rf"^{PREFIX}(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, incomplete or corrupted)."""


def check_world_size(state: dict, world_size: int, reshard: bool, path) -> None:
    """Refuse a checkpoint written by another number of ranks unless ``reshard`` allows it."""
    saved = state.get("world_size", 1)
    if saved != world_size and not reshard:
        raise CheckpointError(
            f"{path} was written by {saved} rank(s) and this run has {world_size}. Resume "
            "with --reshard (reshard=True) to continue it here; with keep_global_batch on, the "
            "optimizer steps stay the same"
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    import numpy as np

    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    # python and numpy states hold plain ints; stored as tensors so the file loads with weights_only
    py = random.getstate()
    state["python"] = torch.tensor(py[1], dtype=torch.int64)
    state["python_pos"] = torch.tensor([py[0], -1 if py[2] is None else 1], dtype=torch.int64)
    np_state = np.random.get_state()
    state["numpy"] = torch.from_numpy(np_state[1].astype("int64"))
    state["numpy_pos"] = torch.tensor([np_state[2], np_state[3]], dtype=torch.int64)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version = int(state["python_pos"][0])
    random.setstate((version, tuple(int(x) for x in state["python"].tolist()), None))
    pos, has_gauss = (int(x) for x in state["numpy_pos"].tolist())
    np.random.set_state(("MT19937", state["numpy"].numpy().astype("uint32"), pos, has_gauss, 0.0))


def save(
    output_dir: str | os.PathLike,
    step: int,
    model,
    optimizer,
    trainer_state: dict[str, Any],
    save_total_limit: int | None = None,
) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically and rotate old ones. Returns its path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = path_for(out, step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{PREFIX}{step}.tmp-", dir=out))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for p in files:
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
        sums = {str(p.relative_to(tmp)): _sha256(p) for p in files}
        with open(tmp / "checksums.json", "w") as f:
            json.dump(sums, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # same step saved again (e.g. after a resume): swap, never half-replace
            trash = Path(tempfile.mkdtemp(prefix=f".{PREFIX}{step}.old-", dir=out))
            os.rename(final, trash / "old")
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == 28:  # ENOSPC
            last = latest(out)
            raise OSError(
                28,
                f"disk full while saving {final.name}; the previous checkpoint "
                f"({last.name if last else 'none'}) is intact. Free space or lower "
                "save_total_limit, then resume",
            ) from e
        raise
    rotate(out, save_total_limit, keep=final)
    return final


def save_due(args: TrainingArguments, step_no: int, total: int) -> bool:
    """Whether ``args.save_strategy`` / ``save_steps`` saves after step ``step_no`` of ``total``. The
    last step is always saved (when saving is on), so any run can be resumed or extended."""
    if args.save_strategy == "no":
        return False
    return step_no == total or bool(
        args.save_strategy == "steps" and args.save_steps and step_no % args.save_steps == 0
    )


def path_for(output_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of ``step`` is (or will be) in ``output_dir``."""
    return Path(output_dir) / f"{PREFIX}{step}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (renamed into place), oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def rotate(output_dir: Path, limit: int | None, keep: Path) -> None:
    # leftovers of interrupted saves (kill -9, power loss) are not checkpoints; tidy them, with or
    # without a limit, or every crash would leave one behind for good
    for p in Path(output_dir).glob(f".{PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)
    if not limit:
        return
    found = list_checkpoints(output_dir)
    for p in found[: max(0, len(found) - limit)]:
        if p != keep:
            shutil.rmtree(p, ignore_errors=True)


def verify(path: Path) -> dict[str, str]:
    """Raise CheckpointError if any file is missing or differs from its recorded checksum; return the
    checksums (file name -> sha256)."""
    sums_file = path / "checksums.json"
    if not sums_file.is_file():
        raise CheckpointError(f"{path} has no checksums.json: it is not a complete hizli checkpoint")
    try:
        sums = json.loads(sums_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{sums_file} is corrupted ({e})") from e
    if not isinstance(sums, dict) or not all(isinstance(d, str) for d in sums.values()):
        raise CheckpointError(f"{sums_file} is corrupted (expected a mapping of file name to sha256)")
    root = path.resolve()
    for name, digest in sums.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{sums_file} names a file outside the checkpoint: {name!r}")
        f = path / name
        if f.is_symlink() or not f.resolve().is_relative_to(root):  # hizli never writes links
            raise CheckpointError(f"checkpoint {path}: {name} is a link to a file outside the checkpoint")
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if _sha256(f) != digest:
            raise CheckpointError(
                f"checkpoint {path} is corrupted: {name} does not match its checksum. Resume from an "
                f"earlier checkpoint (resume_from_checkpoint=PATH) or start again"
            )
    return sums


def resolve(resume: str | bool | None, output_dir: str | os.PathLike) -> Path | None:
    """``True``/"true": the latest checkpoint in ``output_dir``; a path: that one; None/False: none."""
    if resume in (None, False, "", "false", "False"):
        return None
    if resume is True or str(resume).lower() == "true":
        last = latest(output_dir)
        if last is None:
            raise CheckpointError(f"resume_from_checkpoint=True but {output_dir} holds no checkpoint-N folder")
        return last
    path = Path(str(resume))
    if not path.is_dir():
        raise CheckpointError(f"resume_from_checkpoint={str(resume)!r}: no such checkpoint folder")
    return path


def load(path: Path, model, optimizer, check_state: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Restore adapter weights, optimizer and RNG from ``path``; return its trainer_state.
    ``check_state`` sees the trainer_state first and may refuse it by raising (the trainer refuses a
    checkpoint of another recipe: ``hizli.train.runs.check_same_recipe``)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    sums = verify(path)
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path} has no adapter_model.safetensors")
    unlisted = [
        n for n in ("adapter_model.safetensors", "optimizer.pt", "rng_state.pt", "trainer_state.json") if n not in sums
    ]
    if unlisted:  # read below, so they must be covered by a checksum
        raise CheckpointError(f"checkpoint {path} is incomplete: checksums.json does not list {', '.join(unlisted)}")
    # everything is read and checked before anything in the model or optimizer changes
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}/trainer_state.json is not valid JSON ({e})") from None
    _check_state(state, path)
    if check_state is not None:
        check_state(state)
    device = next(p.device for p in model.parameters() if p.requires_grad)
    try:
        optimizer_state = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
        rng = torch.load(path / "rng_state.pt", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused something that is not tensors and numbers
        raise CheckpointError(
            f"{path}: optimizer.pt / rng_state.pt hold objects other than tensors; refused "
            f"(they could run code when loaded). Resume from another checkpoint. ({e})"
        ) from None
    result = set_peft_model_state_dict(model, load_file(str(weights), device=str(device)))
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise CheckpointError(f"{weights} does not fit this model (unexpected keys such as {unexpected[0]})")
    optimizer.load_state_dict(optimizer_state)
    set_rng_state(rng)
    return state


def _check_state(state: Any, path: Path) -> None:
    """The fields of trainer_state.json that resuming relies on, with the types it relies on."""

    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    ok = (
        isinstance(state, dict)
        and whole(state.get("global_step"))
        and isinstance(state.get("position"), dict)
        and set(state["position"]) == {"epoch", "micro"}
        and all(whole(v) for v in state["position"].values())
        and isinstance(state.get("scheduler"), dict)
        and isinstance(state.get("log_history", []), list)
    )
    if not ok:
        raise CheckpointError(
            f"{path}/trainer_state.json does not hold a valid training state (global_step, "
            "position, scheduler); resume from another checkpoint"
        )
