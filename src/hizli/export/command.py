"""One export of an adapter folder, as ``hizli export`` runs it: check, load, write, report.

Everything a user can get wrong (a non-empty output folder, an unknown type, a missing
llama-quantize, a missing token for --push) is checked before the model is loaded, so mistakes
cost a second, not a merge. The export itself goes through a staging folder beside ``--out``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

_SAVE_METHOD = {"merged": "merged_16bit", "merged-4bit": "merged_4bit"}


def export_adapter(
    path: str,
    *,
    to: str,
    out: str,
    quant: str = "q8_0",
    push: str | None = None,
    token: str | None = None,
    force: bool = False,
) -> Path:
    """Export the model or adapter at ``path`` as ``to`` ("merged", "merged-4bit" or "gguf" with
    ``quant``) into the folder ``out`` (new or empty unless ``force``); with ``push`` also upload it
    to that hub repository (private). Prints what was written; returns the output folder."""
    from hizli.export import hub, staging

    target = staging.check_output_dir(out, overwrite=force, flag="--force")
    method = None
    if to == "gguf":
        from hizli.export import gguf

        method = gguf.normalize_quantization(quant)
        if method in gguf.EXTERNAL and gguf.find_llama_quantize() is None:
            raise ValueError(gguf._missing_quantize_message(method))
    elif to not in _SAVE_METHOD:
        raise ValueError(f"--to {to!r}: use merged, merged-4bit or gguf")
    if push:
        hub.check_repo_id(push)
        hub.resolve_token(token)

    start = time.perf_counter()
    _say(f"loading {path}")
    from hizli.models import loader

    # Full-precision base: a LoRA trained on an NF4 base is merged into the original weights (as
    # Unsloth does); a checkpoint that is itself 4-bit on disk is dequantized by the merge.
    model, tokenizer = loader.load(path, load_in_4bit=False, adapter_trainable=False)
    loaded = time.perf_counter()
    if method is not None:
        from hizli.export import gguf

        _say(f"writing GGUF ({method}) to {target}")
        gguf.save_gguf(model, target, tokenizer, quantization_method=method, overwrite=force, progress=True)
    else:
        from hizli.export import merge

        _say(f"writing {to} weights to {target}")
        merge.save_merged(model, target, tokenizer, save_method=_SAVE_METHOD[to], overwrite=force, progress=True)
    done = time.perf_counter()
    print(summary(target, load_s=loaded - start, export_s=done - loaded))
    if push:
        _say(f"uploading {target} to {push} (private)")
        url = hub.push_folder(target, push, token=token, private=True)
        print(f"uploaded: {url}")
    return target


def summary(folder: Path, *, load_s: float, export_s: float) -> str:
    """The files written with their sizes, and where the time went."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    width = max([len(str(p.relative_to(folder))) for p in files] + [5])
    lines = [f"exported to {folder} in {load_s + export_s:.1f} s (load {load_s:.1f} s, export {export_s:.1f} s)"]
    for p in files:
        lines.append(f"  {str(p.relative_to(folder)):<{width}}  {human_size(p.stat().st_size):>10}")
    lines.append(f"  {'total':<{width}}  {human_size(sum(p.stat().st_size for p in files)):>10}")
    return "\n".join(lines)


def human_size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _say(message: str) -> None:
    print(f"hizli: {message}", file=sys.stderr, flush=True)
