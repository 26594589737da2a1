"""A Triton kernel launched again and again with the same arguments but a few, without Triton's
per-call Python work once that call's compiled kernel is known.

``kernel[grid](*args)`` runs Triton's JIT launcher on every call: it binds the arguments to the
kernel's parameters, works out how each is specialised (a pointer's dtype and whether its address is
a multiple of 16; an int's width, whether it is 1 and whether it is a multiple of 16), builds a cache
key from that and the options, looks the compiled kernel up, checks the kernel's globals, asks the
driver for the device and stream and builds the launch hooks' metadata, then calls the compiled
kernel's C launcher: about 10 us of Python a call on a 2-core Xeon. A training step dequantizes each
frozen weight several times per micro-batch with the same arguments but the output buffer.

:class:`BoundLaunch` fixes a launch's grid, arguments and options, and leaves a run of arguments
open. A call specialises only the open ones, with Triton's own function (``native_specialize_impl``,
with the kernel's backend and each parameter's flags), and looks that up among the compiled kernels
it has kept: a new specialisation goes through ``kernel[grid]`` (which compiles if needed, and
launches) and its compiled kernel is kept; a known one is launched through the compiled kernel's own
launcher. The fixed arguments are specialised by Triton at that first launch and do not change (the
bound launch holds them, so a tensor keeps its address), so both paths pick the same binary.

``HIZLI_TRITON_LAUNCH`` (read at every call): ``jit`` (default) always goes through
``kernel[grid]``; ``direct`` launches as above. Calls go through ``kernel[grid]`` whatever the mode
under Triton's interpreter, while any launch hook is installed (a profiler such as Proton then sees
every launch), and with a Triton that lacks the pieces used here (``triton.knobs`` and
``native_specialize_impl``). tests/kernels/test_kernels_launch.py checks, against Triton's own JIT,
that both paths pass the same arguments to the same compiled kernel (Triton 3.6.0 and 3.9.0).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

ENV = "HIZLI_TRITON_LAUNCH"
MODES = ("jit", "direct")


def launch_mode() -> str:
    """The validated value of ``HIZLI_TRITON_LAUNCH`` (``jit`` when unset or empty)."""
    mode = os.environ.get(ENV, "").strip().lower() or "jit"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r} is not a launch mode: use one of {', '.join(MODES)}")
    return mode


class _Site(NamedTuple):
    """What a direct launch of one kernel on one device needs besides the call's own arguments."""

    backend: Any  # Triton's backend for the device (specialisation asks it about pointers and ints)
    open_flags: list  # (is_const, specialise, specialise alignment) of each open argument
    constexprs: tuple  # the constexprs' values in order (the launcher skips them but expects them)


def _make_site(kernel: Any, device: int, n_args: int, open_args: slice, meta: dict) -> _Site | None:
    """The kernel's site on ``device`` after its first launch there, or None where this module cannot
    launch it: an interpreted kernel, typed runtime parameters, constexprs not after every runtime
    parameter (hizli's kernels all have them last), runtime arguments not all given positionally
    (``n_args`` of them), or a constexpr without a value."""
    caches = getattr(kernel, "device_caches", None)  # an interpreted kernel has none
    if caches is None or device not in caches or not hasattr(kernel, "params"):
        return None
    params = kernel.params
    runtime = [p for p in params if not p.is_constexpr]
    constexprs = params[len(runtime) :]
    if len(runtime) != n_args or any(p.annotation_type for p in runtime):
        return None
    if not all(p.is_constexpr for p in constexprs):
        return None
    values = tuple(meta.get(p.name, p.default if p.has_default else _REQUIRED) for p in constexprs)
    if any(v is _REQUIRED for v in values):
        return None
    flags = [(p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment) for p in runtime]
    return _Site(caches[device][3], flags[open_args], values)  # the entry's fourth item: the backend


_REQUIRED: Any = object()  # a constexpr without a default
_UNSEEN: Any = object()
_triton_parts: list[Any] = []  # [native_specialize_impl, knobs, current device, current raw stream]


def _parts() -> list[Any] | None:
    """Triton's and torch's functions the direct path calls, looked up once; None if this Triton lacks them."""
    if not _triton_parts:
        try:
            import torch
            from triton import knobs
            from triton.runtime.jit import native_specialize_impl

            _triton_parts.extend(
                [native_specialize_impl, knobs, torch._C._cuda_getDevice, torch._C._cuda_getCurrentRawStream]
            )
        except (ImportError, AttributeError):
            _triton_parts.append(None)
    return None if _triton_parts[0] is None else _triton_parts


def _hooks_idle(knobs: Any) -> bool:
    """True when no launch hook is installed (Triton 3.6 keeps them in chains, earlier versions as None)."""
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def _compiled(result: Any) -> Any:
    """What ``kernel[grid](...)`` returned, if it is a compiled kernel this module can launch."""
    if hasattr(result, "result"):  # an asynchronous compile's future
        result = result.result()
    if getattr(result, "function", None) is None or not hasattr(result, "packed_metadata"):
        return None
    return result


class BoundLaunch:
    """``kernel[grid](*args, **meta)`` with ``args[open_at : open_at + n]`` given at each call.

    Args:
        kernel: a ``triton.jit`` kernel, or hizli's lazy one (materialised here).
        grid: one to three program counts.
        args: the kernel's runtime arguments, all positional, in order; the open ones' values here
            are placeholders.
        meta: its ``tl.constexpr`` arguments and launch options (``num_warps``, ...), by name.
        open_at: the position of the first open argument.
        n_open: how many arguments from there are given at each call.
    """

    def __init__(self, kernel: Any, grid: tuple, args: tuple, meta: dict, open_at: int, n_open: int = 1) -> None:
        from hizli.kernels._triton_utils import LazyJit

        self.kernel = kernel.materialize() if isinstance(kernel, LazyJit) else kernel
        self.grid, self.meta, self.open = tuple(grid), dict(meta), slice(open_at, open_at + n_open)
        self.grid3 = (self.grid + (1, 1))[:3]
        self.head, self.tail = tuple(args[:open_at]), tuple(args[open_at + n_open :])
        self.devices: dict[int, _Site | None] = {}  # None: this kernel always launches through Triton
        self.compiled: dict[tuple, Any] = {}  # (device, open arguments' specialisation) -> compiled kernel

    def __call__(self, *values: Any) -> None:
        args = self.head + values + self.tail
        parts = _parts() if launch_mode() == "direct" else None
        if parts is None:
            self.kernel[self.grid](*args, **self.meta)
            return
        specialize, knobs, current_device, current_stream = parts
        device = current_device()
        known = self.devices.get(device, _UNSEEN)
        if known is None or not _hooks_idle(knobs):
            self.kernel[self.grid](*args, **self.meta)
            return
        if known is _UNSEEN:  # the first call on this device: Triton binds, compiles and launches
            compiled = _compiled(self.kernel[self.grid](*args, **self.meta))
            known = self.devices[device] = _make_site(self.kernel, device, len(args), self.open, self.meta)
            if known is not None and compiled is not None:
                self.compiled[self._key(device, known, values, specialize)] = compiled
            return
        key = self._key(device, known, values, specialize)
        compiled = self.compiled.get(key)
        if compiled is None:
            compiled = _compiled(self.kernel[self.grid](*args, **self.meta))
            if compiled is not None:
                self.compiled[key] = compiled
            return
        g0, g1, g2 = self.grid3
        compiled.run(
            g0,
            g1,
            g2,
            current_stream(device),
            compiled.function,
            compiled.packed_metadata,
            None,  # the launch hooks' metadata and the two hooks: none is installed
            None,
            None,
            *args,
            *known.constexprs,
        )

    @staticmethod
    def _key(device: int, site: _Site, values: tuple, specialize: Any) -> tuple:
        return (device,) + tuple(specialize(site.backend, v, *f) for v, f in zip(values, site.open_flags))
