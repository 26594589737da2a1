"""The one place where training meets several processes: who logs and saves, and what is summed.

A single process is rank 0 of a world of 1, and every call here is then a no-op that returns its
argument. Under ``torch.distributed`` (torchrun) the trained-token count of a step is summed over
ranks, so each rank divides its loss by the same global count, and only rank 0 writes files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> "Ranks":
        """This process's place in the default process group (0 of 1 without one)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        """The rank that logs, prints and saves."""
        return self.rank == 0

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over ranks (in place where distributed)."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(value)
        return value

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
