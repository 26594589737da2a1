"""Compute-dtype copies of the LoRA weights, made once per optimizer step instead of at every use.

PEFT keeps ``lora_A`` / ``lora_B`` in float32 while the matmuls run in bf16 or fp16, so the fused
projections (``hizli.models.fused_lora``) cast each adapter weight at every use: forward, the
recompute of a checkpointed layer and backward, in every micro-batch. Under a tight memory cap a
step runs several micro-batches with every layer recomputed and is bound by host work, not by the
GPU: these casts are 29 of the about 49 ``aten::copy_`` per layer per micro-batch of the capped
recipe. The weights only change when an optimizer steps, so one copy per weight and dtype serves
every use in between.

A copy is reused while all of these hold; otherwise it is refreshed, in place where its shape and
dtype still fit (a CUDA graph of an offloaded layer reads it at the address it was captured with):
- the training run's optimizer has not stepped since (hizli's trainer registers
  :meth:`ComputeCopies.step_taken` on its optimizer, which refreshes every copy at once:
  bitsandbytes' 8-bit optimizers write the weights through their own kernels, which no version
  counter sees, and a graph runs none of the code that would refresh a copy at its next use);
- the parameter's version counter is unchanged (in-place edits, ``load_state_dict``);
- it still has the same storage (a reassigned ``.data``).

The copies belong to one training run: hizli's trainer puts a :class:`ComputeCopies` on the model's
record (``model.hizli.compute_copies``) for the length of ``train()``; the fused layers read it there.
Anywhere else (another trainer, a model hizli did not load) there is none and every use casts, which
stays correct whatever optimizer runs. The copies cost 2 bytes per adapter parameter (46 MiB for the
recipe's 3B model, 24.3 million parameters); the memory plan counts them (:meth:`pending_bytes`).
"""

from __future__ import annotations

import torch

from hizli.kernels._weak import IdWeakMap


class ComputeCopies:
    """Compute-dtype copies of a model's LoRA weights for one training run."""

    def __init__(self) -> None:
        self.steps = 0  # optimizer steps taken in this run
        self._kept = IdWeakMap()  # parameter -> (key, copy)

    def step_taken(self, *_args: object) -> None:
        """An optimizer's post-step hook: every copy made before is stale, and is refreshed now, in
        place. A CUDA graph of an offloaded layer (``hizli.models.layer_graphs``) reads the copies at
        the addresses it was captured with and runs none of the code that would refresh them."""
        self.steps += 1
        kept = [(weight, key, copy) for weight, (key, copy) in self._kept.items()]
        if not kept:
            return
        with torch.no_grad():
            torch._foreach_copy_([copy for _, _, copy in kept], [weight.detach() for weight, _, _ in kept])
        for weight, key, copy in kept:
            self._kept[weight] = ((self.steps, weight._version, weight.data_ptr(), key[3]), copy)

    def get(self, weight: torch.nn.Parameter, dtype: torch.dtype) -> torch.Tensor:
        key = (self.steps, weight._version, weight.data_ptr(), dtype)
        kept = self._kept.get(weight)
        if kept is not None and kept[0] == key:
            return kept[1]
        if kept is not None and kept[1].shape == weight.shape and kept[1].dtype == dtype:
            copy = kept[1].copy_(weight.detach())  # in place: the address a graph may have captured
        elif _capturing(weight):
            # Inside a CUDA graph capture a cast is recorded, not run: kept, the copy would hold
            # nothing until the graph first replays, and nothing ever if the capture fails. The
            # graph casts at each replay instead.
            return weight.detach().to(dtype)
        else:
            copy = weight.detach().to(dtype)
        self._kept[weight] = (key, copy)
        return copy

    def pending_bytes(self, model: torch.nn.Module, element_size: int) -> int:
        """Bytes the copies will add for ``model``'s trainable LoRA weights (``lora_A`` / ``lora_B``)
        wider than ``element_size`` that have none yet (the memory plan adds this to what is already
        allocated)."""
        return sum(
            p.numel() * element_size
            for name, p in model.named_parameters()
            if "lora_" in name and p.requires_grad and p.element_size() > element_size and p not in self._kept
        )


def _capturing(weight: torch.Tensor) -> bool:
    return weight.is_cuda and torch.cuda.is_current_stream_capturing()


def compute_copy(weight: torch.Tensor, dtype: torch.dtype, copies: ComputeCopies | None) -> torch.Tensor:
    """``weight`` in ``dtype``: itself when it already is, else the run's kept copy (parameters only,
    with ``copies``) or a cast made now."""
    if weight.dtype == dtype:
        return weight
    if copies is None or not isinstance(weight, torch.nn.Parameter):
        return weight.to(dtype)
    return copies.get(weight, dtype)
