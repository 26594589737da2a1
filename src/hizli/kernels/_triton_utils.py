"""Helpers shared by the kernel modules: lazy ``triton.jit``, block sizes, warps, grid sizes.

Nothing here imports triton at module level, so every kernel module (which imports this one) imports
on a machine without Triton; Triton is imported at the first kernel launch (:class:`LazyJit`).
Kernel modules import :data:`tl` from here, so that their kernel bodies name a defined module
(linters and readers see where ``tl`` comes from); the first launch replaces it with
``triton.language`` in that module.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import torch

from hizli.kernels.dispatch import interpreting


class _TritonLanguagePlaceholder:
    """Stands for ``triton.language`` in a kernel module until its first kernel launch.

    Kernel bodies only run inside Triton, after :meth:`LazyJit.materialize` has bound the real
    module in their module's globals, so any use of this placeholder is a bug in hizli.
    """

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(
            f"tl.{name} used before the kernel module's first launch bound triton.language; "
            "call kernels through their launchers, not directly"
        )

    def __repr__(self) -> str:
        return "<triton.language, imported at the first kernel launch>"


tl: Any = _TritonLanguagePlaceholder()

# Contract a * b + c into one fused multiply-add, as Triton does by default up to 3.9 (3.10 turns the
# default off; 3.9 warns while it is unset). Every launch passes it, so results do not move with the
# Triton version; the NF4 dequantization turns it off (bitsandbytes rounds its two steps apart).
FP_FUSION = True


class LazyJit:
    """A Triton kernel whose ``triton.jit`` happens at its first launch, not at module import.

    Kernel files define their kernels at module level (readable, and Triton needs the source and
    module globals of each kernel) but must import without Triton. At the first launch of any lazy
    kernel of a module, every lazy kernel of that module is swapped in place for the real
    ``JITFunction`` and ``triton``/``tl`` are bound in the module's globals (``tl`` replacing the
    placeholder the module imported from here), so kernels that call helper kernels resolve them as
    Triton expects. The kernels' ``tl.constexpr`` annotations stay
    unevaluated strings thanks to ``from __future__ import annotations``, which Triton accepts
    (checked with Triton 3.6: the interpreter and a full sm_90 compile to cubin).
    ``TRITON_INTERPRET`` is read by ``triton.jit`` at that moment, so set it before the first launch.
    """

    def __init__(self, fn: Callable[..., Any], **jit_kwargs: Any) -> None:
        self.fn, self.jit_kwargs = fn, jit_kwargs

    def materialize(self) -> Any:
        module_globals = self.fn.__globals__
        from hizli.kernels import _precompile

        _precompile.wait()  # a background compile of these kernels may be under way: use its results
        import triton
        import triton.language as tl

        if interpreting():
            _patch_interpreter_index()
        module_globals.setdefault("triton", triton)
        if isinstance(module_globals.get("tl", _TritonLanguagePlaceholder()), _TritonLanguagePlaceholder):
            module_globals["tl"] = tl
        for name, value in list(module_globals.items()):
            if isinstance(value, LazyJit):
                assert value.fn.__name__ == name, f"lazy kernel {value.fn.__name__} bound as {name}"
                module_globals[name] = triton.jit(value.fn, **value.jit_kwargs)
        return module_globals[self.fn.__name__]

    def __getitem__(self, grid: Any) -> Any:
        return self.materialize()[grid]


@lru_cache(maxsize=1)
def _patch_interpreter_index() -> None:
    """Let Triton 3.6's interpreter use run-time scalars as loop bounds under NumPy >= 2.4.

    The interpreter holds every scalar as a 1-element array and converts it with ``int(array)``,
    which NumPy 2.4 rejects for arrays with a dimension ("only 0-dimensional arrays can be converted
    to Python scalars"), so ``for i in range(0, n)`` with a kernel argument ``n`` fails. This wraps
    its per-launch patching to convert through ``.item()`` instead. Interpreter only: compiled
    kernels never go through this code.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


def lazy_jit(fn: Callable[..., Any] | None = None, **jit_kwargs: Any) -> Any:
    """Decorator: ``@lazy_jit`` in place of ``@triton.jit`` (see :class:`LazyJit`); keyword arguments
    go to ``triton.jit``, e.g. ``do_not_specialize=("n_rows",)`` for an argument that changes from
    batch to batch (Triton compiles a kernel once per divisibility-by-16 class of each int argument
    otherwise, and a compile costs a few hundred ms in the middle of training)."""
    if fn is None:
        return lambda f: LazyJit(f, **jit_kwargs)
    return LazyJit(fn, **jit_kwargs)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (>= 1): Triton block shapes must be powers of two."""
    return 1 << max(0, int(n) - 1).bit_length()


def row_warps(block: int, most: int = 8) -> int:
    """Warps for a one-row-per-program kernel over ``block`` elements.

    About 256 elements per warp (8 per thread, one 16-byte vector of bf16) with at most 8 warps:
    the rule of Triton's layer-norm tutorial, which keeps every thread on wide loads without
    spilling. For a Llama-3B row (3,072 -> block 4,096) that is 8 warps, 16 elements a thread.
    Kernels that keep more row-sized values live raise ``most`` (see the RMSNorm backward).
    """
    return max(1, min(most, block // 256))


@lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def program_count(device: torch.device, rows: int, per_sm: int = 4) -> int:
    """A grid size for kernels that loop over rows and keep per-program partial sums.

    ``per_sm`` programs per multiprocessor gives enough warps in flight to cover memory latency
    while keeping the partial-sum buffer (programs x columns, fp32) small. Under the interpreter a
    handful of programs keeps the test fast while still exercising the row loop.
    """
    if device.type != "cuda" or interpreting():
        return max(1, min(rows, 3))
    return max(1, min(rows, _sm_count(device.index or 0) * per_sm))
