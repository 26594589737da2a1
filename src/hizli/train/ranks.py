"""The one place where training meets several processes: who logs and saves, what is summed, which
rows each rank trains.

A single process is rank 0 of a world of 1, and every call here is then a no-op that returns its
argument. Under ``torch.distributed`` (``torchrun``, ``accelerate launch``, ``hizli train --gpus N``)
each rank takes a token-balanced share of every optimizer step's rows, the trained-token count of
the step is summed over ranks so each rank divides its loss by the same global count, the LoRA
gradients are summed once per optimizer step over one flat buffer (so nothing interacts with
checkpointing or the fused backward), and only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Sequence

import torch

# How long a collective may wait for a stalled rank before the run stops and names it.
TIMEOUT_MINUTES = float(os.environ.get("HIZLI_DIST_TIMEOUT_MIN", "30"))


class RankError(RuntimeError):
    """The process group cannot be set up or a rank stopped answering."""


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate) started this process as a rank of a process group
    (one of one included: ``torchrun --nproc-per-node 1`` runs the same code as N)."""
    return all(os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def init_from_env() -> None:
    """Join the process group a launcher described (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``), once.

    NCCL on GPUs, each rank on ``cuda:LOCAL_RANK``; gloo on CPUs. With one GPU per rank, more ranks
    on a host than it has GPUs is refused here, before any model is loaded.
    """
    import torch.distributed as dist

    if not launched() or not dist.is_available() or dist.is_initialized():
        return
    timeout = timedelta(minutes=TIMEOUT_MINUTES)
    if torch.cuda.is_available():
        count, lr = torch.cuda.device_count(), local_rank()
        if lr >= count:
            raise RankError(
                f"local rank {lr} has no GPU: this host has {count} GPU(s) but the launcher started "
                f"{os.environ.get('LOCAL_WORLD_SIZE', '?')} processes here. Use --nproc-per-node {count} "
                f"(or hizli train --gpus {count}) at most"
            )
        torch.cuda.set_device(lr)
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", lr))
    else:
        dist.init_process_group("gloo", timeout=timeout)


_MONITOR: list[Any] = []


def _monitor_group() -> Any:
    """A gloo group over all ranks (made once; every rank makes it at the same point), through which a
    failed collective finds out which ranks stopped answering (the failed group itself may be closed)."""
    import torch.distributed as dist

    if not _MONITOR:
        _MONITOR.append(dist.new_group(backend="gloo"))
    return _MONITOR[0]


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    grouped: bool = False  # in a process group: the collectives run, at a world size of 1 too
    _monitor: Any = field(default=None, compare=False, repr=False)  # a gloo group that names stalled ranks

    @classmethod
    def current(cls) -> "Ranks":
        """This process's place in the default process group (0 of 1 without one), joining the group a
        launcher described if nobody has yet."""
        import torch.distributed as dist

        init_from_env()
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), True, _monitor_group())
        return cls()

    @property
    def is_main(self) -> bool:
        """The rank that logs, prints and saves."""
        return self.rank == 0

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over ranks (in place where distributed)."""
        if self.grouped:
            import torch.distributed as dist

            if value.device.type == "cpu" and dist.get_backend() == "nccl":  # NCCL reduces GPU tensors only
                on_gpu = value.to(torch.device("cuda", torch.cuda.current_device()))
                self._collective(dist.all_reduce, on_gpu)
                return value.copy_(on_gpu)
            self._collective(dist.all_reduce, value)
        return value

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over ranks in one all-reduce of one flat buffer.

        Each rank divided its loss by the step's global trained-token count, so the sum is the
        gradient of the whole step; a parameter this rank left without a gradient counts as zeros."""
        if not self.grouped or not params:
            return
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        dtype = grads[0].dtype
        flat = torch.cat([g.reshape(-1).to(dtype) for g in grads])
        self._collective(dist.all_reduce, flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
            offset += n

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every rank, in rank order (a list of one without a process group)."""
        if not self.grouped:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def same_everywhere(self, value: Any, what: str) -> None:
        """Refuse to go on when ranks disagree on ``value`` (a setting that must match)."""
        if self.world_size <= 1:
            return
        values = self.gather(value)
        if any(v != values[0] for v in values):
            raise RankError(f"the ranks disagree on {what}: {values} (rank: value). Start every rank the same way")

    def barrier(self) -> None:
        if self.grouped:
            import torch.distributed as dist

            self._collective(dist.barrier)

    def _collective(self, op, *args) -> None:
        """Run ``op``; if it fails (a timeout: a rank stopped answering), say which ranks stalled."""
        try:
            op(*args)
        except RuntimeError as e:
            raise RankError(f"rank {self.rank}: a collective failed ({e}). {self._stalled()}") from e

    def _stalled(self) -> str:
        import torch.distributed as dist

        try:
            wait = timedelta(minutes=min(TIMEOUT_MINUTES, 1.0))
            dist.monitored_barrier(group=self._monitor, timeout=wait, wait_all_ranks=True)
        except RuntimeError as e:  # gloo's message lists the ranks that did not arrive
            return f"Stalled: {e}"
        return "Every rank still answers; the failure was not a stall"


def deal_rows(groups: Sequence[Sequence[int]], lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """One optimizer step's rows (``groups``: its micro-batches) dealt to the ranks, token-balanced:
    longest first, each to the rank with the fewest tokens so far (ties to the lower rank), so no
    rank waits long for another. Every rank computes the same deal. The loss does not depend on it:
    every rank divides by the step's global trained-token count."""
    rows = sorted((i for g in groups for i in g), key=lambda i: (-lengths[i], i))
    load = [0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for i in rows:
        target = min(range(world_size), key=lambda r: (load[r], r))
        load[target] += lengths[i]
        owned[target].append(i)
    return [sorted(o) for o in owned]


def cut(rows: Sequence[int], batch_size: int) -> list[list[int]]:
    """``rows`` as micro-batches of ``batch_size``."""
    return [list(rows[k : k + batch_size]) for k in range(0, len(rows), batch_size)]


@dataclass
class Share:
    """One rank's part of an optimizer step: micro-batches to train on, and fillers to run at weight 0."""

    groups: list[list[int]]
    fillers: list[list[int]]


def equal_passes(per_rank: Sequence[list[list[int]]], rank: int, lengths: Sequence[int]) -> Share:
    """``rank``'s micro-batches, with fillers so that it runs as many passes as the busiest rank (a
    sharded model gathers its weights in every forward, on all ranks at once). A filler is the step's
    shortest row, the cheapest pass."""
    mine = per_rank[rank]
    most = max(len(groups) for groups in per_rank)
    rows = [i for groups in per_rank for g in groups for i in g]
    filler = [min(rows, key=lambda i: (lengths[i], i))] if rows else []
    return Share(mine, [filler] * (most - len(mine)) if filler else [])
