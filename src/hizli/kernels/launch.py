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
from typing import Any

ENV = "HIZLI_TRITON_LAUNCH"
MODES = ("jit", "direct")


def launch_mode() -> str:
    """The validated value of ``HIZLI_TRITON_LAUNCH`` (``jit`` when unset or empty)."""
    mode = os.environ.get(ENV, "").strip().lower() or "jit"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r} is not a launch mode: use one of {', '.join(MODES)}")
    return mode


class _Site:
    """How Triton specialises one JIT kernel's runtime arguments on one device."""

    def __init__(self, kernel: Any, backend: Any) -> None:
        self.backend = backend
        params = kernel.params
        runtime = [p for p in params if not p.is_constexpr]
        constexprs = params[len(runtime) :]
        # Handled: untyped runtime parameters first, then the constexprs (hizli's kernels all are).
        self.usable = all(not p.annotation_type for p in runtime) and all(p.is_constexpr for p in constexprs)
        self.flags = [(p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment) for p in runtime]
        self.constexprs = [(p.name, p.default if p.has_default else _REQUIRED) for p in constexprs]

    def values(self, args: tuple, meta: dict) -> tuple | None:
        """Every parameter's value in order (the launcher skips the constexprs but expects them), or
        None when a constexpr without a default is missing."""
        tail = []
        for name, default in self.constexprs:
            value = meta.get(name, default)
            if value is _REQUIRED:
                return None
            tail.append(value)
        return args + tuple(tail)


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


def _make_site(kernel: Any, device: int) -> Any:
    caches = getattr(kernel, "device_caches", None)  # an interpreted kernel has none
    if caches is None or device not in caches or not hasattr(kernel, "params"):
        return None
    site = _Site(kernel, caches[device][3])  # the entry's fourth item: the device's backend
    return site if site.usable else None


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
        self.devices: dict[int, Any] = {}  # device -> (backend, open arguments' flags, constexpr values), or None
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
            site = _make_site(self.kernel, device)
            values_all = site.values(args, self.meta) if site is not None and len(args) == len(site.flags) else None
            if values_all is None:
                self.devices[device] = None
                return
            known = self.devices[device] = (site.backend, site.flags[self.open], values_all[len(args) :])
            if compiled is not None:
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
            *known[2],
        )

    @staticmethod
    def _key(device: int, known: tuple, values: tuple, specialize: Any) -> tuple:
        backend, flags = known[0], known[1]
        return (device,) + tuple(specialize(backend, v, *f) for v, f in zip(values, flags))
