"""Start-up: the cyclic garbage collector paused while hizli imports its dependencies and loads a model.

Importing torch, transformers, PEFT and bitsandbytes allocates about 785,000 objects the collector
tracks (counted with it off), most of them living as long as the process. The collector runs after
every 700 net allocations and its older generations walk those objects again and again: with it on,
those four imports took 4.3-4.7 s on this project's 2-core machine, with it off 3.6-3.8 s
(2026-11-28, two runs each). From process start to a loaded 4-bit model of the bench's tiny shape
(``benchmarks/load_time.py``, same machine) it took 4.1-4.2 s with the pause and 4.8-5.0 s without,
three runs each. Objects without reference cycles are still freed at once; cyclic garbage waits for
the collector, which runs again as usual once the pause ends. Data preparation is not paused:
tokenising 8,000 ShareGPT rows took as long either way.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def gc_paused() -> Iterator[None]:
    """Cyclic garbage collection off inside the block; the caller's setting is restored (nesting is fine)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
