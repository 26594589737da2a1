"""The recipe's export methods, bound onto every model hizli adapts, and the output-folder rule they share.

``models.lora.attach_methods`` binds ``save_pretrained_merged``, ``save_pretrained_gguf``,
``push_to_hub_merged`` and ``push_to_hub_gguf`` onto each adapted model; ``hizli export`` calls
``export_cli``. The work happens in merge.py (merged safetensors), gguf.py (GGUF + Ollama Modelfile)
and hub.py (uploads).

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
from typing import Any, Iterator

STAGING_PREFIX = ".hizli-partial-"


def save_pretrained_merged(model, save_directory: str, tokenizer=None, save_method: str = "merged_16bit",
                           **kwargs: Any):
    """Merge the LoRA adapter into the base and save it; see ``hizli.export.merge.save_merged``."""
    from hizli.export import merge

    return merge.save_merged(model, save_directory, tokenizer, save_method=save_method, **kwargs)


def save_pretrained_gguf(model, save_directory: str, tokenizer=None, quantization_method: str = "q8_0",
                         **kwargs: Any):
    """Write a GGUF file (and an Ollama Modelfile); see ``hizli.export.gguf.save_gguf``."""
    from hizli.export import gguf

    return gguf.save_gguf(model, save_directory, tokenizer, quantization_method=quantization_method, **kwargs)


def push_to_hub_merged(model, repo_id: str, tokenizer=None, save_method: str = "merged_16bit",
                       token: str | None = None, private: bool = True, **kwargs: Any):
    """Merge, save to a temporary folder and upload it to ``repo_id`` (private unless ``private=False``)."""
    from hizli.export import hub

    return hub.push_merged(model, repo_id, tokenizer, save_method=save_method, token=token, private=private,
                           **kwargs)


def push_to_hub_gguf(model, repo_id: str, tokenizer=None, quantization_method: str = "q8_0",
                     token: str | None = None, private: bool = True, **kwargs: Any):
    """Write GGUF to a temporary folder and upload it to ``repo_id`` (private unless ``private=False``)."""
    from hizli.export import hub

    return hub.push_gguf(model, repo_id, tokenizer, quantization_method=quantization_method, token=token,
                         private=private, **kwargs)


def push_to_hub(model, repo_id: str, tokenizer=None, token: str | None = None, private: bool = True,
                **kwargs: Any):
    """Upload the LoRA adapter (and tokenizer) to ``repo_id``, private by default.

    PEFT's own ``push_to_hub`` makes public repositories unless told otherwise; binding this one
    instead keeps the recipe's ``model.push_to_hub(...)`` private by default.
    """
    from hizli.export import hub

    return hub.push_adapter(model, repo_id, tokenizer, token=token, private=private, **kwargs)


def export_cli(args) -> int:
    from hizli.export import cli

    return cli.run(args)


# --------------------------------------------------------------------------------------------------
# output folders


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
def staged_output(target: str | os.PathLike, *, overwrite: bool,
                  flag: str = "overwrite=True") -> Iterator[Path]:
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
