"""The recipe's memory report, read from torch.cuda on a GPU and from the process on a CPU.

Before training the recipe prints the GPU, its total memory and the memory reserved so far; after
training, the runtime and four memory figures. On a CPU the same report is given in terms of the
process's resident memory (RSS) against the machine's RAM, and labelled so.
"""

from __future__ import annotations

import os
import resource
from dataclasses import asdict, dataclass
from typing import Any

GIB = 1024**3


@dataclass
class MemorySnapshot:
    device: str  # "NVIDIA H100 80GB HBM3" or "CPU"
    kind: str  # "cuda" or "cpu"
    total_gib: float  # GPU memory, or RAM on a CPU
    reserved_gib: float  # torch.cuda.max_memory_reserved so far, or peak RSS so far

    def lines(self) -> list[str]:
        if self.kind == "cuda":
            return [
                f"GPU = {self.device}. Max memory = {self.total_gib:.3f} GB.",
                f"{self.reserved_gib:.3f} GB of memory reserved.",
            ]
        return [
            f"CPU (no GPU): memory figures are this process's resident memory (RSS). RAM = {self.total_gib:.3f} GB.",
            f"{self.reserved_gib:.3f} GB resident (peak so far).",
        ]


def _rss_peak_gib() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def _ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError):
        return float("nan")


def snapshot(device: Any = None) -> MemorySnapshot:
    """Memory now: on a GPU ``torch.cuda.max_memory_reserved`` (as the recipe reads it)."""
    import torch

    dev = (
        torch.device(device)
        if device is not None
        else (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    )
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return MemorySnapshot(props.name, "cuda", props.total_memory / GIB, torch.cuda.max_memory_reserved(dev) / GIB)
    return MemorySnapshot("CPU", "cpu", _ram_gib(), _rss_peak_gib())


def reset_peak(device: Any = None) -> None:
    import torch

    dev = torch.device(device) if device is not None else None
    if (dev is None and torch.cuda.is_available()) or (dev is not None and dev.type == "cuda"):
        torch.cuda.reset_peak_memory_stats(dev)


@dataclass
class MemoryReport:
    """The recipe's six after-training figures."""

    start: MemorySnapshot
    peak_gib: float
    runtime_s: float
    rank_peaks_gib: list[float] | None = None  # every rank's peak, when several trained (rank order)

    @property
    def peak_for_training_gib(self) -> float:
        return max(0.0, self.peak_gib - self.start.reserved_gib)

    def figures(self) -> dict[str, float]:
        total = self.start.total_gib
        return {
            "train_runtime": round(self.runtime_s, 2),
            "train_runtime_minutes": round(self.runtime_s / 60, 2),
            "peak_reserved_gib": round(self.peak_gib, 3),
            "peak_reserved_for_training_gib": round(self.peak_for_training_gib, 3),
            "peak_reserved_pct": round(100 * self.peak_gib / total, 3),
            "peak_reserved_for_training_pct": round(100 * self.peak_for_training_gib / total, 3),
        }

    def lines(self) -> list[str]:
        f = self.figures()
        what = "reserved memory" if self.start.kind == "cuda" else "resident memory (RSS)"
        of = "max memory" if self.start.kind == "cuda" else "RAM"
        return [
            f"{f['train_runtime']} seconds used for training.",
            f"{f['train_runtime_minutes']} minutes used for training.",
            f"Peak {what} = {f['peak_reserved_gib']} GB.",
            f"Peak {what} for training = {f['peak_reserved_for_training_gib']} GB.",
            f"Peak {what} % of {of} = {f['peak_reserved_pct']} %.",
            f"Peak {what} for training % of {of} = {f['peak_reserved_for_training_pct']} %.",
        ] + (
            [f"Peak {what} per rank = " + ", ".join(f"rank {r}: {g:.3f} GB" for r, g in enumerate(self.rank_peaks_gib))]
            if self.rank_peaks_gib
            else []
        )

    def to_dict(self) -> dict[str, Any]:
        extra = {"rank_peaks_gib": self.rank_peaks_gib} if self.rank_peaks_gib else {}
        return {"start": asdict(self.start), **self.figures(), **extra}


def finish(start: MemorySnapshot, runtime_s: float) -> MemoryReport:
    now = snapshot("cuda" if start.kind == "cuda" else "cpu")
    return MemoryReport(start=start, peak_gib=now.reserved_gib, runtime_s=runtime_s)


def memory_report(trainer_stats: Any = None, *, printed: bool = True) -> dict[str, Any]:
    """Print the recipe's memory report and return its figures.

    Without arguments: the before-training lines (device, total memory, reserved so far). With the
    stats that ``trainer.train()`` returned: the after-training lines.
    """
    if trainer_stats is None:
        snap = snapshot()
        if printed:
            print("\n".join(snap.lines()))
        return asdict(snap)
    report: MemoryReport | None = getattr(trainer_stats, "memory", None)
    if report is None:
        raise ValueError("memory_report(stats) needs the object returned by trainer.train()")
    if printed:
        print("\n".join(report.lines()))
    return report.figures()
