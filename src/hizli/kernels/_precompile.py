"""Triton compiles ahead of time: a background process that fills Triton's on-disk cache, a thread that
primes Triton's per-process start-up, and the wait that the first kernel launch here does for both.

What to compile (the model's shapes, the kernels of a training step) is the models layer's business
(:mod:`hizli.models.warmup`); this module only starts the process, knows Triton's cache and waits.
Nothing is shared with the background process but that cache, so a compile that fails costs only
the time it would have saved: this process then compiles the kernel at its first launch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from typing import Sequence

from hizli import _log

ENV = "HIZLI_KERNEL_WARMUP"

_process: subprocess.Popen | None = None
_process_log: str | None = None
_thread: threading.Thread | None = None


def enabled(device: str) -> bool:
    """Whether compiling ahead can help on ``device``: CUDA with Triton kernels on, ``HIZLI_KERNEL_WARMUP``
    not ``0``, the first local rank, and more than one CPU core (on one it would slow the load down)."""
    from hizli.kernels.dispatch import interpreting, kernels_mode

    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not str(device).startswith("cuda") or kernels_mode() == "reference" or interpreting():
        return False
    if int(os.environ.get("LOCAL_RANK", "0") or 0) != 0 or (os.cpu_count() or 1) < 2:
        return False
    try:
        import importlib.util

        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def triton_cache_dir() -> str:
    """Where Triton keeps compiled kernels (its own rule: ``TRITON_CACHE_DIR``, else
    ``$TRITON_HOME/.triton/cache`` with ``TRITON_HOME`` defaulting to the home folder)."""
    home = os.environ.get("TRITON_HOME") or os.path.expanduser("~/")
    return os.environ.get("TRITON_CACHE_DIR") or os.path.join(home, ".triton", "cache")


def cache_has_kernels(names: Sequence[str]) -> bool:
    """Whether Triton's cache holds a compiled variant of each named kernel (it has run here before).

    Only the names are checked, not the variants: after another model's run the sizes may differ,
    and those kernels then compile at first use, as they would without a warm-up."""
    root = triton_cache_dir()
    try:
        found = {
            entry.name
            for folder in os.scandir(root)
            if folder.is_dir()
            for entry in os.scandir(folder.path)
            if entry.name.endswith(".cubin")
        }
    except OSError:
        return False
    return all(f"{name}.cubin" in found for name in names)


def start_process(module: str, argv: Sequence[str]) -> bool:
    """Run ``python -m module *argv`` in the background (one at a time); True if it started.

    The child gets ``HIZLI_KERNEL_WARMUP=0`` and finds hizli even when this process got it through a
    ``sys.path`` edit (hizli's folder is appended to ``PYTHONPATH``, after what the user put there).
    """
    global _process, _process_log
    if _process is not None:
        return False
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), package_root) if p)
    fd, _process_log = tempfile.mkstemp(prefix="hizli-kernel-warmup-", suffix=".log")
    with os.fdopen(fd, "w") as log:
        _process = subprocess.Popen(
            [sys.executable, "-m", module, *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, ENV: "0", "PYTHONPATH": path},
        )
    _log.debug(f"compiling Triton kernels in the background: {module} {' '.join(argv)} (pid {_process.pid})")
    return True


def _prime_triton() -> None:
    # Triton hashes its own library (the key of every cache entry) and builds its driver module once
    # per process; hashing and file reads release the GIL, so this overlaps the main thread's work.
    try:
        from triton.runtime import driver
        from triton.runtime.cache import triton_key

        triton_key()
        driver.active.get_current_device()
    except Exception as e:  # noqa: BLE001 - the main thread does the same later and reports errors
        _log.debug(f"priming Triton in the background failed: {e!r}")


def prime_in_background(device: str) -> None:
    """Start the per-process part of Triton's start-up in a thread. Call it after the heavy imports
    (transformers, bitsandbytes) are done: two threads importing modules that import each other can
    deadlock."""
    global _thread
    if _thread is not None or not enabled(device):
        return
    _thread = threading.Thread(target=_prime_triton, name="hizli-triton-prime", daemon=True)
    _thread.start()


def wait(timeout: float = 120.0) -> None:
    """Wait for the background compile and priming, if any (before the first kernel launch, and
    before measuring free GPU memory, which the background process holds a little of)."""
    global _process, _thread
    thread, _thread = _thread, None
    if thread is not None:
        thread.join(timeout)
    process, _process = _process, None
    if process is None:
        return
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
    if code != 0 and _process_log:
        try:
            with open(_process_log) as f:
                tail = f.read()[-2000:]
        except OSError:
            tail = ""
        _log.debug(f"background kernel compile exited with {code}; the kernels compile at first use.\n{tail}")
    if _process_log:
        try:
            os.unlink(_process_log)
        except OSError:
            pass
