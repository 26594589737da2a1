"""Start-up: what hizli does to reach the first training step sooner.

Two measures, both invisible to what runs afterwards:

- ``gc_paused``: the cyclic garbage collector paused while hizli imports its dependencies and loads
  a model.
- ``import_bitsandbytes``: bitsandbytes imported with its ``torch.compile`` calls deferred to first use
  (the figures are in its docstring).

Why the collector pause: importing torch, transformers, PEFT and bitsandbytes allocates about
785,000 long-lived objects that the collector's older generations walk again and again (those imports
take about 0.8 s less on a 2-core CPU with it paused). Objects without reference cycles are still
freed at once; cyclic garbage waits until the pause ends. Data preparation is not paused: it gains
nothing from it.
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
    the import cost is pure waste (``import bitsandbytes`` after torch: 2.2 s against 0.2 s
    deferred, on a 2-core CPU). Deferred, a wrapped function is compiled on its first call exactly
    as bitsandbytes asked, so nothing changes for code that does call one. Raises what the import
    raises."""
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
