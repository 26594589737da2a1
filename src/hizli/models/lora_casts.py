"""Compute-dtype copies of the LoRA weights, made once per optimizer step instead of at every use.

PEFT keeps ``lora_A`` / ``lora_B`` in float32 while the matmuls run in bf16 or fp16, so the fused
projections (``hizli.models.fused_lora``) cast each adapter weight at every use: forward, the
recompute of a checkpointed layer and backward, in every micro-batch. Under a tight memory cap a
step runs several micro-batches with every layer recomputed and is bound by host work, not by the
GPU: these casts are 29 of the about 49 ``aten::copy_`` per layer per micro-batch of the capped
recipe. The weights only change when an optimizer steps, so one copy per weight and dtype serves
every use in between.

A copy is reused while all of these hold; otherwise it is made again:
- no optimizer has stepped since (a global ``torch.optim`` post-step hook counts steps; it also sees
  bitsandbytes' 8-bit optimizers, which write through their own kernels);
- the parameter's version counter is unchanged (in-place edits, ``load_state_dict``);
- it still has the same storage (a reassigned ``.data``).

The copies cost 2 bytes per adapter parameter (46 MiB for the recipe's 3B model, 24.3 million
parameters); the memory plan counts them (``pending_bytes``). ``CACHE = False`` casts at every use,
as before (the bench's ``--lever cast_cache=off``).
"""

from __future__ import annotations

import torch

CACHE = True

_steps_seen = 0  # optimizer steps taken anywhere in this process since the hook was installed
_hook = None


def _count_step(_optimizer, _args, _kwargs) -> None:
    global _steps_seen
    _steps_seen += 1


def _install_hook() -> None:
    global _hook
    if _hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _hook = register_optimizer_step_post_hook(_count_step)


def compute_copy(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in ``dtype``: itself when it already is, else a copy reused until the weight changes
    (parameters only; any other tensor is cast on every call)."""
    if weight.dtype == dtype:
        return weight
    if not CACHE or not isinstance(weight, torch.nn.Parameter):
        return weight.to(dtype)
    _install_hook()
    key = (_steps_seen, weight._version, weight.data_ptr(), dtype)
    kept = weight.__dict__.get("_hizli_compute_copy")
    if kept is not None and kept[0] == key:
        return kept[1]
    copy = weight.detach().to(dtype)
    weight.__dict__["_hizli_compute_copy"] = (key, copy)
    return copy


def pending_bytes(model: torch.nn.Module, element_size: int) -> int:
    """Bytes the copies will add for ``model``'s trainable LoRA weights (``lora_A`` / ``lora_B``) wider
    than ``element_size`` that have none yet (the memory plan adds this to what is already allocated)."""
    if not CACHE:
        return 0
    return sum(p.numel() * element_size for name, p in model.named_parameters()
               if "lora_" in name and p.requires_grad and p.element_size() > element_size
               and "_hizli_compute_copy" not in p.__dict__)
