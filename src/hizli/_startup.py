"""Start-up: what hizli does to reach the first training step sooner.

Two measures, both invisible to what runs afterwards:

- ``gc_paused``: the cyclic garbage collector paused while hizli imports its dependencies and loads
  a model.
- ``import_bitsandbytes``: bitsandbytes imported with its ``torch.compile`` calls deferred to first use
  (the figures are in its docstring).

Why the collector pause: importing torch, transformers, PEFT and bitsandbytes allocates about 785,000 objects the collector
tracks (counted with it off), most of them living as long as the process. The collector runs after
every 700 net allocations and its older generations walk those objects again and again: with it on,
those four imports took 4.3-4.7 s on this project's 2-core machine, with it off 3.6-3.8 s
(2026-11-28, two runs each). From process start to a loaded 4-bit model of the bench's tiny shape
(same machine) it took 4.1-4.2 s with the pause and 4.8-5.0 s without,
three runs each. Objects without reference cycles are still freed at once; cyclic garbage waits for
the collector, which runs again as usual once the pause ends. Data preparation is not paused:
tokenising 8,000 ShareGPT rows took as long either way.
"""

from __future__ import annotations

import functools
import gc
from contextlib import contextmanager
from types import FunctionType
from typing import Any, Iterator


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


def import_bitsandbytes():
    """``import bitsandbytes``, with the ``torch.compile`` wrappers it makes at import deferred.

    bitsandbytes wraps its CPU fallbacks (``backends/default/ops.py``: blockwise and 4-bit
    dequantisation, the 32-bit optimizer update) in ``torch.compile`` at import time, and that call
    alone imports TorchInductor's lowering and decompositions. On CUDA those fallbacks never run, so
    the import cost is pure waste: on this project's 2-core CPU ``import bitsandbytes`` after torch
    took 2.2 s with the wrappers made at once and 0.2 s with them deferred (torch, bitsandbytes,
    transformers and PEFT together: 4.6 s against 3.7 s, two runs each, 2026-11-28). Deferred, a
    wrapped function is compiled on its first call exactly as bitsandbytes asked, so nothing changes
    for code that does call one. Raises what the import raises."""
    import sys

    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    with deferred_torch_compile():
        import bitsandbytes
    return bitsandbytes


@contextmanager
def deferred_torch_compile() -> Iterator[None]:
    """Inside the block, ``torch.compile(function, **options)`` (and its decorator form) returns a
    wrapper that calls the real ``torch.compile`` on first use; modules and other arguments go
    straight to the real one. ``torch.compile`` is restored on leaving, errors included."""
    import torch

    real = torch.compile

    def deferred(model: Any = None, **options: Any):
        if model is None:
            return lambda fn: deferred(fn, **options)
        if not isinstance(model, FunctionType):
            return real(model, **options)
        compiled: list = []

        @functools.wraps(model)
        def first_call_compiles(*args: Any, **kwargs: Any):
            if not compiled:
                compiled.append(real(model, **options))
            return compiled[0](*args, **kwargs)

        return first_call_compiles

    torch.compile = deferred
    try:
        yield
    finally:
        torch.compile = real
