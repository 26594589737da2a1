"""The one place that decides, per call, whether an op runs its Triton kernel or its torch reference.

``HIZLI_KERNELS`` (read at every call, so tests and users can flip it without a reset):

- ``auto`` (default): Triton when ``triton`` imports and every tensor is on a CUDA device, else the
  pure-PyTorch reference (the CPU path).
- ``triton``: always the kernel; a ``ValueError`` says why when that is impossible. With
  ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors through Triton's interpreter, which is how
  they are developed and tested on a machine without a GPU (slow: use small shapes).
- ``reference``: the reference path everywhere, also on a GPU (to compare losses or bisect a bug).

Triton is imported lazily, inside :func:`triton_available`, so ``import hizli`` works without it.
Reading one environment variable costs well under a microsecond, against the tens of microseconds
of a kernel launch, so there is no cache to go stale.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

ENV = "HIZLI_KERNELS"
MODES = ("auto", "triton", "reference")


def kernels_mode() -> str:
    """The validated value of ``HIZLI_KERNELS`` (``auto`` when unset or empty)."""
    mode = os.environ.get(ENV, "").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r} is not a kernel mode: use one of {', '.join(MODES)}")
    return mode


def interpreting() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``import triton`` works here (cached: an install does not appear mid-process)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails while loading its driver
        return False
    return True


def reset() -> None:
    """Forget the cached import check (for tests that fake a missing Triton)."""
    triton_available.cache_clear()


def use_triton(op: str, *tensors: torch.Tensor) -> bool:
    """Decide whether ``op`` runs its Triton kernel on these tensors.

    Args:
        op: the op's name, used in error messages.
        *tensors: the op's tensor inputs; all must be on CUDA for the kernel (or on CPU with the
            interpreter on, in ``triton`` mode).

    Returns:
        True for the Triton kernel, False for the reference.

    Raises:
        ValueError: in ``triton`` mode when the kernel cannot run (no Triton, tensors not on CUDA).
    """
    mode = kernels_mode()
    if mode == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if mode == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise ValueError(
            f"{ENV}=triton but triton does not import here: install triton, "
            f"or set {ENV}=auto to fall back to the reference {op}"
        )
    if not on_cuda and not (interpreting() and all(t.device.type == "cpu" for t in tensors)):
        devices = sorted({str(t.device) for t in tensors})
        raise ValueError(
            f"{ENV}=triton but {op} got tensors on {devices}: Triton kernels need CUDA "
            f"tensors (or TRITON_INTERPRET=1 with CPU tensors); set {ENV}=auto to use "
            "the reference off the GPU"
        )
    return True
