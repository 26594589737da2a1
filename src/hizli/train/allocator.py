"""PyTorch's CUDA allocator during training: a hard cap while the run lasts, and the peak it reached."""

from __future__ import annotations

from typing import Callable

import torch

from hizli.train import memory


def cap_allocator(device: torch.device, cap_gib: float | None) -> Callable[[], None]:
    """Make ``cap_gib`` a hard limit for the CUDA allocator; returns the function that puts the
    previous limit back.

    Capped, the allocator frees its cached blocks and retries before it would reserve more than the
    cap (and raises out-of-memory only if the live tensors themselves do not fit), so fragmentation
    cannot push the reserved peak over what the user allowed. Not during a CUDA graph capture: there
    it frees nothing (``hizli.models.layer_graphs`` makes room before each capture).
    """
    if not cap_gib or device.type != "cuda":
        return lambda: None
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    previous = getter(index) if getter is not None else 1.0
    torch.cuda.set_per_process_memory_fraction(min(previous, cap_gib * 1024**3 / total), index)
    return lambda: torch.cuda.set_per_process_memory_fraction(previous, index)


def peak_gib(device: torch.device) -> float | None:
    """Peak reserved GPU memory so far (GiB); on a CPU the process's peak resident memory."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
    return round(memory.snapshot("cpu").reserved_gib, 3)
