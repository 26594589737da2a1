"""One (system, cap) pair of ``hizli bench longest`` in its own process: load the recipe's model once,
search in place, write the result file after every trial (so a run cut short keeps its trials).

Run as a script, so that Unsloth is imported before anything else (it patches transformers on import)::

    python src/hizli/bench/longest/worker.py SETTINGS.json

The cap: ``torch.cuda.set_per_process_memory_fraction(cap / total)`` before the model loads, for both
systems alike, and (``free_memory="cap"``) ``torch.cuda.mem_get_info`` answering as a card of that
size would. hizli is also told the cap the way a user would (``max_memory_gib``) and gets
``oom_retries=0``. "whole" sets no fraction: the cap is the card.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path, where its neighbours (kernels.py,
# results.py, ...) would shadow packages of the same name that the trainers import.
if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

SYSTEMS = ("hizli", "unsloth")


@dataclass
class WorkerSettings:
    """What one worker searches; written as JSON by the parent."""

    system: str
    cap: str
    model: str
    tokens: str  # .npy file of token ids, at least max_len long
    out: str
    start: int
    max_len: int
    resolution: int
    trial_timeout: float
    recheck: str = "auto"
    free_memory: str = "cap"
    search_budget: float | None = None


def worker_main(s: WorkerSettings) -> int:
    """Load once, search, write ``s.out`` after every trial."""
    system, cap = s.system, s.cap
    t_start = time.time()
    # The system's package first, before CUDA starts: both set the allocator's options on import
    # (expandable segments), and Unsloth must also come before transformers.
    unsloth = None
    if system == "unsloth":
        import unsloth
    elif system == "hizli":
        importlib.import_module("hizli")
    else:
        raise SystemExit(f"system {system!r}: use one of {', '.join(SYSTEMS)}")
    import numpy as np
    import torch

    from hizli.bench.longest.search import Trial, cap_label, find_longest
    from hizli.bench.longest.trials import (
        GIB,
        hizli_trainer_fn,
        load_recipe_model,
        measure,
        report_free_within_cap,
        unsloth_step_fn,
    )

    cuda = torch.cuda.is_available()
    doc: dict[str, Any] = {
        "system": system,
        "cap": cap,
        "done": False,
        "alloc_conf": {k: os.environ.get(k) for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")},
    }
    cap_bytes = None
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        doc.update(gpu=torch.cuda.get_device_name(0), total_gib=round(total / GIB, 3))
        if cap != "whole":
            cap_bytes = int(float(cap) * GIB)
            if cap_bytes >= total:
                raise SystemExit(f"cap {cap} GiB is not below the card's {total / GIB:.1f} GiB: use 'whole'")
            torch.cuda.set_per_process_memory_fraction(cap_bytes / total, 0)
            doc["memory_fraction"] = cap_bytes / total
            if s.free_memory == "cap":
                report_free_within_cap(cap_bytes)
            doc["free_memory_reported"] = s.free_memory
        doc["cap_gib"] = round((cap_bytes or total) / GIB, 3)
    else:
        doc.update(gpu="CPU", cap_gib=None, note="no GPU: the cap is ignored and the trials run on the CPU")
    doc["torch"] = torch.__version__
    if unsloth is not None:
        doc["unsloth"] = getattr(unsloth, "__version__", None)
    tokens = np.load(s.tokens)
    if len(tokens) < s.max_len:
        raise SystemExit(f"{s.tokens} holds {len(tokens)} tokens, fewer than max_len {s.max_len}")
    out = Path(s.out)

    def save() -> None:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, out)

    t_load = time.time()
    if system == "hizli":
        import logging

        from hizli import _log

        _log.setup(logging.WARNING)
        model, tokenizer = load_recipe_model("hizli", s.model, s.max_len)
        max_memory_gib = float(cap) if cap != "whole" and cuda else None
        doc["max_memory_gib"] = max_memory_gib
        train = hizli_trainer_fn(model, tokenizer, tokens, max_memory_gib)
    else:
        model, _tokenizer = load_recipe_model("unsloth", s.model, s.max_len)
        train = unsloth_step_fn(model, tokens)
    doc["load_s"] = round(time.time() - t_load, 1)
    doc["startup_s"] = round(time.time() - t_start, 1)
    if cuda:
        torch.cuda.synchronize()
        doc["after_load_allocated_gib"] = round(torch.cuda.memory_allocated() / GIB, 3)
        doc["after_load_reserved_gib"] = round(torch.cuda.memory_reserved() / GIB, 3)
    doc.update(
        start=s.start,
        max_len=s.max_len,
        resolution=s.resolution,
        trial_timeout=s.trial_timeout,
        search_budget_s=s.search_budget,
        trials=[],
    )
    save()

    def on_trial(trial: Trial) -> None:
        doc["trials"].append(asdict(trial))
        print(
            f"[{system} @ {cap_label(cap)}] {trial.len:>7} tokens: {'ok  ' if trial.ok else 'FAIL'} "
            f"{trial.seconds:6.1f} s, peak reserved {trial.peak_reserved_gib} GiB"
            f"{'' if trial.ok else ' - ' + str(trial.error)}{' (recheck)' if trial.recheck else ''}",
            flush=True,
        )
        save()

    t_search = time.time()
    result = find_longest(
        lambda n: measure(train, n, model, cap_bytes, cuda),
        s.start,
        s.max_len,
        s.resolution,
        trial_timeout=s.trial_timeout,
        recheck=s.recheck,
        budget_s=s.search_budget,
        on_trial=on_trial,
    )
    doc.update(result.to_dict())
    doc.update(search_s=round(time.time() - t_search, 1), done=True)
    save()
    print(
        f"[{system} @ {cap_label(cap)}] longest ok {result.longest_ok}, first fail {result.first_fail}, "
        f"rechecked {result.rechecked}{', stopped: ' + result.stopped if result.stopped else ''}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(worker_main(WorkerSettings(**json.loads(Path(sys.argv[1]).read_text()))))
