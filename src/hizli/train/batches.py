"""Which rows go into which micro-batch and optimizer step, reproducibly and resumably.

Each epoch shuffles the row indices with a generator seeded by ``seed + epoch``, so the order is a
pure function of (seed, epoch) and a resumed run can jump to any position without replaying data.
The position saved in a checkpoint is ``(epoch, next micro-batch index)``.

With ``packing`` the rows of an epoch are first grouped into bins of at most ``max_seq_length``
tokens by best-fit decreasing, the bins are shuffled, and a micro-batch holds
``per_device_train_batch_size`` bins. Bins are laid out padding-free, so packed sequences never
see each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

from hizli.data.collate import best_fit_decreasing


@dataclass
class Position:
    epoch: int = 0
    micro: int = 0  # index of the next micro-batch within the epoch


class BatchPlan:
    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        grad_accum: int,
        seed: int,
        *,
        packing: bool = False,
        max_seq_length: int | None = None,
        shuffle: bool = True,
    ) -> None:
        if not lengths:
            raise ValueError("the training set is empty: no row is left to train on")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.packing = packing
        self.max_seq_length = max_seq_length
        self.shuffle = shuffle
        self._cache: tuple[int, list[list[int]]] | None = None

    def micro_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's micro-batches as lists of row indices."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        import torch

        n = len(self.lengths)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if self.packing:
            assert self.max_seq_length, "packing needs max_seq_length"
            bins = best_fit_decreasing([self.lengths[i] for i in order], self.max_seq_length)
            units = [[order[j] for j in b] for b in bins]
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch + 1_000_003)
                units = [units[i] for i in torch.randperm(len(units), generator=g).tolist()]
            groups = [sum(units[i : i + self.batch_size], []) for i in range(0, len(units), self.batch_size)]
        else:
            groups = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        self._cache = (epoch, groups)
        return groups

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.micro_batches(0)) / self.grad_accum)

    def total_steps(self, max_steps: int, num_train_epochs: float) -> int:
        if max_steps > 0:
            return max_steps
        return max(1, math.ceil(num_train_epochs * self.steps_per_epoch()))

    def steps(self, start: Position) -> Iterator[tuple[list[list[int]], Position, Position]]:
        """Yield ``(micro_batches, position_before, position_after)`` forever, from ``start``.

        A step never spans two epochs: the last step of an epoch may hold fewer micro-batches
        (still exact, since the loss is normalised by the step's trained-token count).
        """
        pos = Position(start.epoch, start.micro)
        while True:
            groups = self.micro_batches(pos.epoch)
            if pos.micro >= len(groups):
                pos = Position(pos.epoch + 1, 0)
                continue
            take = groups[pos.micro : pos.micro + self.grad_accum]
            before = Position(pos.epoch, pos.micro)
            pos = Position(pos.epoch, pos.micro + len(take))
            yield take, before, Position(pos.epoch, pos.micro)
