"""Out of GPU memory, explained: how much was asked, what was free, and which setting to change.

PyTorch's ``torch.OutOfMemoryError`` says how much one allocation wanted and what the card held, in
a message whose wording changed across versions::

    CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which
    1.06 GiB is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use. Of the
    allocated memory 76.20 GiB is allocated by PyTorch, and 1.31 GiB is reserved by PyTorch but
    unallocated. ...
    CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 15.78 GiB total capacity; 14.56 GiB
    already allocated; 3.19 MiB free; 14.73 GiB reserved in total by PyTorch)

``explain`` reads both forms (and asks the driver, ``torch.cuda.mem_get_info``, for what is free
after the failed step's tensors are released), then lists the settings that lower the peak, the
largest saving first, with the values to try; under ``max_memory_gib``, also the cap to raise it to.
The trainer raises the result as ``GPUOutOfMemoryError``; ``hizli train`` prints its message.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from hizli.train.args import TrainingArguments

_UNITS = {
    "b": 1,
    "bytes": 1,
    "kib": 1024,
    "kb": 1024,
    "mib": 1024**2,
    "mb": 1024**2,
    "gib": 1024**3,
    "gb": 1024**3,
    "tib": 1024**4,
    "tb": 1024**4,
}
_SIZE = r"([\d.]+)\s*(TiB|GiB|MiB|KiB|TB|GB|MB|KB|bytes|B)\b"
_PATTERNS = {
    "requested": [r"Tried to allocate " + _SIZE],
    "total": [r"total capac\w* of " + _SIZE, _SIZE + r" total capacity"],  # torch 2.1 wrote "capacty"
    "free": [r"of which " + _SIZE + r" is free", _SIZE + r" free"],
    "in_use": [r"this process has " + _SIZE + r" memory in use", _SIZE + r" already allocated"],
    "reserved_unallocated": [_SIZE + r" is reserved by PyTorch but unallocated"],
}


class GPUOutOfMemoryError(RuntimeError):
    """A training step ran out of GPU memory; the message says what to lower. ``.report`` has the figures."""

    def __init__(self, message: str, report: "OOMReport") -> None:
        super().__init__(message)
        self.report = report


@dataclass
class OOMReport:
    """The figures of one out-of-memory error, in bytes (None where unknown)."""

    requested: int | None = None
    free: int | None = None  # when the allocation failed (from the error message)
    total: int | None = None
    in_use: int | None = None  # by this process
    reserved_unallocated: int | None = None
    free_now: int | None = None  # after the failed step's tensors were released (from the driver)
    device: str | None = None
    suggestions: list[str] = field(default_factory=list)


def parse(message: str) -> OOMReport:
    """The sizes a PyTorch out-of-memory message states (either wording)."""
    report = OOMReport()
    for name, patterns in _PATTERNS.items():
        for pattern in patterns:
            m = re.search(pattern, message)
            if m:
                setattr(report, name, int(float(m.group(1)) * _UNITS[m.group(2).lower()]))
                break
    gpu = re.search(r"GPU (\d+)", message)
    if gpu:
        report.device = f"cuda:{gpu.group(1)}"
    return report


def gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 1024**3:.2f} GiB"


def explain(
    error: BaseException,
    *,
    device: Any = None,
    args: TrainingArguments | None = None,
    model: Any = None,
    max_seq_length: int | None = None,
    longest_row: int | None = None,
    memory_plan: dict | None = None,
    step: int | None = None,
) -> GPUOutOfMemoryError:
    """A ``GPUOutOfMemoryError`` for ``error`` (a ``torch.OutOfMemoryError``) with the figures and the
    settings to lower.

    Args:
        error: what PyTorch raised.
        device: the training device (to ask the driver what is free now); default: the error's GPU.
        args: the run's ``TrainingArguments`` (batch size, accumulation, ``max_memory_gib``).
        model: the model (whether its layers recompute activations, whether it is 4-bit).
        max_seq_length: the run's ``max_seq_length``; longest_row: the longest row in tokens.
        memory_plan: the trainer's memory plan (``SFTTrainer.memory_plan``), if one was made.
        step: the optimizer step that failed.
    """
    report = parse(str(error))
    if device is not None and str(device).startswith("cuda"):
        report.device = str(device)
    report.free_now = _free_now(report.device)
    report.suggestions = _suggestions(args, model, max_seq_length, longest_row, memory_plan, report)
    where = f"step {step}: " if step is not None else ""
    card = f" on {_card_name(report.device)}" if report.device else ""
    lines = [
        f"{where}out of GPU memory{card}: asked for {gib(report.requested)} with {gib(report.free)} free of "
        f"{gib(report.total)}" + (f" (this process held {gib(report.in_use)})" if report.in_use else "") + "."
    ]
    cap = getattr(args, "max_memory_gib", None)
    if cap:  # the trainer limits PyTorch's allocator to the cap, so the card's free memory is not the limit
        lines.append(
            f"This run is capped at max_memory_gib={cap:g} GiB (PyTorch's allocator is held to it "
            "while training), so what counts is the cap, not the card's free memory. If the card has "
            f"room, raise it to max_memory_gib={_cap_hint(report, cap)} or more (an allocation of "
            f"{gib(report.requested)} did not fit under it); else lower the peak."
        )
    elif report.free_now is not None:
        lines.append(f"After releasing this step's tensors {gib(report.free_now)} is free.")
    unused = report.reserved_unallocated
    if unused and report.requested and report.free is not None and report.free + unused >= report.requested:
        lines.append(
            f"{gib(unused)} more was reserved by PyTorch but unused: the request would have fitted "
            "without fragmentation, so PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True may be enough."
        )
    if report.suggestions:
        lines.append("Lower the peak with, largest saving first:")
        lines += [f"  - {s}" for s in report.suggestions]
    return GPUOutOfMemoryError("\n".join(lines), report)


def _free_now(device: str | None) -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info(torch.device(device or "cuda"))
        return int(free)
    except Exception:  # the driver may be in no state to answer after an OOM; the message has figures
        return None


def _card_name(device: str | None) -> str:
    import torch

    try:
        if device and torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(torch.device(device))} ({device})"
    except Exception:
        pass
    return str(device)


def _suggestions(
    args: TrainingArguments | None,
    model: Any,
    max_seq_length: int | None,
    longest_row: int | None,
    plan: dict | None,
    report: OOMReport,
) -> list[str]:
    out: list[str] = []
    bs = getattr(args, "per_device_train_batch_size", None)
    ga = getattr(args, "gradient_accumulation_steps", None)
    # Under a cap the allocator is held to it: a smaller one only shrinks the room (explain's cap line).
    if not getattr(args, "max_memory_gib", None) and plan and (plan.get("micro_batches") or 0) >= 1:
        budget = plan.get("budget_gib")
        target = _budget_hint(report, budget)
        out.append(
            f"max_memory_gib={target} (the memory plan predicted {plan.get('predicted_peak_gib', 0):.2f} GiB "
            f"within a {_gib_number(budget)} GiB budget; a smaller budget makes it split each step and recompute layers)"
        )
    if bs and bs > 1:
        out.append(
            f"per_device_train_batch_size={max(1, bs // 2)} with gradient_accumulation_steps={(ga or 1) * 2} "
            f"(now {bs} x {ga or 1}: the same rows per optimizer step, the same result, half the activations)"
        )
    from hizli.models.record import find_state

    record = find_state(model) if model is not None else None
    allowed = record.allowed_modes if record is not None else None
    if allowed is not None and allowed == ("keep",):
        out.append(
            "use_gradient_checkpointing='unsloth' (now False: every layer keeps its activations; "
            "recomputing them costs about a third more time and saves most of that memory)"
        )
    elif model is not None and allowed is None and not getattr(model, "is_gradient_checkpointing", False):
        out.append("use_gradient_checkpointing='unsloth' in get_peft_model (activations are all kept now)")
    if max_seq_length:
        longest = min(longest_row or max_seq_length, max_seq_length)
        target = max(8, _pow2_below(longest))
        out.append(
            f"max_seq_length={target} (now {max_seq_length}, longest row {longest} tokens: activations grow "
            "with the longest step; longer rows are truncated)"
        )
    info = record.info if record is not None else None
    if info is not None and not getattr(info, "is_4bit", True):
        out.append("load_in_4bit=True (the base weights take a quarter of the memory in NF4)")
    return out


def _budget_hint(report: OOMReport, budget) -> str:
    """A budget below the plan's by at least what the failed allocation lacked, with a 10% margin,
    rounded down to 0.5 GiB."""
    if not budget:
        return "<a smaller budget>"
    short = max(0, (report.requested or 0) - (report.free or 0)) / 1024**3
    return f"{max(0.5, int((float(budget) - short) * 0.9 * 2) / 2):g}"


def _cap_hint(report: OOMReport, cap: float) -> str:
    """A cap above the run's by the failed allocation, rounded up to 0.1 GiB (the card's free figure
    in the message does not know the cap, so what the allocation lacked under it is not known)."""
    return f"{math.ceil((cap + (report.requested or 0) / 1024**3) * 10) / 10:g}"


def _pow2_below(n: int) -> int:
    p = 1
    while p * 2 < n:
        p *= 2
    return p


def _gib_number(value: object) -> str:
    """A budget in GiB as the message shows it (two decimals; as it is where it is not a number)."""
    return f"{value:.2f}" if isinstance(value, (int, float)) else str(value)
