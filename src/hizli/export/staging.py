"""Output folders of exports: refuse to overwrite without asking, and write through a staging folder.

Every export writes into a staging folder beside its target and moves the result into place only
when it is complete (``staged_output``), so a crash or Ctrl-C never leaves a half-written file
under the final name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

STAGING_PREFIX = ".hizli-partial-"


def check_output_dir(target: str | os.PathLike, *, overwrite: bool, flag: str = "overwrite=True") -> Path:
    """Refuse a target that is a file, or a non-empty folder unless ``overwrite``; return it as a Path."""
    target = Path(target).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(f"output {str(target)!r} is a file; pass a folder path for the export")
    if target.is_dir() and not overwrite:
        entries = sorted(p.name for p in target.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise ValueError(
                f"output folder {str(target)!r} is not empty (it holds {shown}); refusing to overwrite it. "
                f"Pick a new or empty folder, or pass {flag} to replace the files an export writes there"
            )
    return target


@contextlib.contextmanager
def staged_output(target: str | os.PathLike, *, overwrite: bool, flag: str = "overwrite=True") -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; move its files into ``target`` only on success.

    A new or empty ``target`` is replaced by renaming the staging folder (one atomic step on one
    file system). An existing non-empty ``target`` (allowed only with ``overwrite``) receives each
    file with ``os.replace``, so every file name holds either the old or the complete new file;
    weight shards of an earlier save that the new one does not write are removed. On any error,
    KeyboardInterrupt included, the staging folder is deleted and ``target`` is left as it was.
    """
    target = check_output_dir(target, overwrite=overwrite, flag=flag)
    target.parent.mkdir(parents=True, exist_ok=True)
    # beside the target, not in /tmp: the final rename must not cross file systems
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{target.name}-", dir=target.parent))
    try:
        yield staging
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if staging.exists() and not any(staging.iterdir()):
            staging.rmdir()


def _move_into_place(staging: Path, target: Path) -> None:
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.rename(staging, target)
        return
    written = {p.relative_to(staging) for p in staging.rglob("*") if p.is_file()}
    for rel in sorted(written):
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, dest)
    # shards of an earlier, differently sharded save would otherwise be read with the new index
    for old in target.glob("model*.safetensors*"):
        if old.relative_to(target) not in written:
            old.unlink()
    shutil.rmtree(staging, ignore_errors=True)


def folder_size(path: str | os.PathLike) -> int:
    """Total bytes of the files under ``path`` (or of the file itself)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
