"""One optimizer step over a step context: steps 2-3 of the trainer's loop.

``StepContext`` holds what every step needs and nothing a step changes (optimizer, scheduler,
scaler, device, precision, collator); ``optimizer_step`` runs the forward and backward passes of a
step's micro-batches, normalised by the step's trained-token count summed over ranks, then checks,
clips and applies the update.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from hizli import _log
from hizli.data.collate import bucket_length, pad_id_of, pad_to_length
from hizli.train import step as step_mod
from hizli.train.args import TrainingArguments
from hizli.train.ranks import Ranks


class NonFiniteLossError(RuntimeError):
    """The loss or gradient of a step was NaN/inf; the weights were not changed."""


@dataclass
class StepResult:
    loss: float  # mean over the step's trained tokens (all ranks)
    grad_norm: float
    tokens: int  # real tokens of the step (all ranks)
    lr: float  # the learning rate this step's update used (as transformers' Trainer logs it)


@dataclass
class StepContext:
    """What every optimizer step of one ``train()`` call uses."""

    model: Any
    args: TrainingArguments
    dataset: Any  # the TokenizedDataset being trained on
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    params: list[torch.nn.Parameter]
    device: torch.device
    amp_dtype: torch.dtype | None
    collate: Callable
    ranks: Ranks
    fused_ce: bool = True  # False materialises all logits (benchmarks measure the lever)
    ce_chunk_rows: int | None = None  # rows per chunk of the fused loss (None: the kernel's choice)
    # Padding-free micro-batches padded to a few lengths (``hizli.data.collate.bucket_length``) so
    # shapes repeat. None: on a GPU whose memory plan sets the limit (the plan then accounts for them).
    token_buckets: bool | None = None
    bucket_limit: int | None = None  # the memory plan's micro-batch size: no bucket goes above it
    bucket_per_doubling: int | None = None  # lengths per doubling (None: ``bucket_length``'s default)

    def device_batch(self, rows: Sequence[int]) -> step_mod.DeviceBatch:
        """The micro-batch of these dataset rows, collated (bucketed if asked) and on the device."""
        batch = self.collate([self.dataset[i] for i in rows])
        buckets = self.token_buckets
        if buckets is None:
            buckets = self.device.type == "cuda" and self.bucket_limit is not None
        if buckets and "cu_seqlens" in batch:
            n = batch["input_ids"].shape[1]
            length = bucket_length(n, self.bucket_limit, self.bucket_per_doubling)
            batch = pad_to_length(batch, length, pad_id_of(self.collate))
        return step_mod.to_device(batch, self.device)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def optimizer_step(
    ctx: StepContext, groups: list[list[int]], step_no: int, fillers: Sequence[list[int]] = ()
) -> StepResult | None:
    """Forward and backward each micro-batch (``groups``: row indices), then update the weights.
    ``fillers``: micro-batches run at weight 0, so that every rank of a sharded model runs as many
    passes (see ``hizli.train.ranks.equal_passes``). Returns None if the step was skipped (no trained token, or a
    non-finite loss under ``nan_policy='skip'``)."""
    batches = [ctx.device_batch(rows) for rows in groups]
    counts = torch.tensor([sum(b.n_trained for b in batches), sum(b.n_tokens for b in batches)], dtype=torch.float64)
    n_trained, tokens = (int(c) for c in ctx.ranks.sum(counts))
    if n_trained == 0:
        _log.warn_once("empty-step", f"step {step_no}: no trained token in its rows; skipped")
        return None
    batches += [ctx.device_batch(rows) for rows in fillers]
    # the logged loss is summed in float64 (one scalar): in float32 how a step's rows are split into
    # micro-batches would move it by an ulp (MPS has no float64)
    total = torch.zeros((), dtype=torch.float32 if ctx.device.type == "mps" else torch.float64, device=ctx.device)
    for k, b in enumerate(batches):
        weight = 1.0 if k < len(groups) else 0.0
        with ctx.autocast():
            loss_sum = step_mod.loss_sum(ctx.model, b, ce_chunk_rows=ctx.ce_chunk_rows, fused_ce=ctx.fused_ce) * weight
        scaled = loss_sum / n_trained
        (ctx.scaler.scale(scaled) if ctx.scaler is not None else scaled).backward()
        total += loss_sum.detach().to(total.dtype)
    del batches
    ctx.ranks.sum_gradients(ctx.params)
    if ctx.scaler is not None:
        ctx.scaler.unscale_(ctx.optimizer)
    max_norm = ctx.args.max_grad_norm if ctx.args.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(ctx.params, max_norm)
    loss = ctx.ranks.sum(total) / n_trained
    loss_value, norm_value = float(loss), float(grad_norm)  # the step's one host sync
    if not math.isfinite(loss_value) or (not math.isfinite(norm_value) and ctx.scaler is None):
        _refuse_non_finite(ctx, groups, step_no, loss_value, norm_value)
        return None
    lr = ctx.optimizer.param_groups[0]["lr"]
    if ctx.scaler is not None:
        ctx.scaler.step(ctx.optimizer)  # skips the update itself if fp16 gradients overflowed
        ctx.scaler.update()
    else:
        ctx.optimizer.step()
    ctx.scheduler.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_value, norm_value, tokens, lr)


def _refuse_non_finite(ctx: StepContext, groups: list[list[int]], step_no: int, loss: float, norm: float) -> None:
    """Drop the step's gradients and stop (``nan_policy='stop'``) or skip it, naming its rows."""
    ctx.optimizer.zero_grad(set_to_none=True)
    rows = sorted(sum(groups, []))
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    describe = getattr(ctx.dataset, "describe_rows", None)
    where = describe(rows) if describe is not None else f"rows {rows[:20]}{' ...' if len(rows) > 20 else ''}"
    message = (
        f"step {step_no}: the {what} is {loss if what == 'loss' else norm} ({where}); the weights were not changed"
    )
    if ctx.args.nan_policy == "stop":
        raise NonFiniteLossError(message + ". Lower learning_rate, check these rows, or set nan_policy='skip'")
    _log.warn_once(f"nan-{step_no}", message + "; step skipped (nan_policy='skip')")
    ctx.scheduler.step()


def autocast_dtype(args: TrainingArguments, device: torch.device, *, quiet: bool = False) -> torch.dtype | None:
    """The autocast dtype ``args`` (``bf16`` / ``fp16``) asks for on ``device``; None: no autocast."""
    if device.type != "cuda":
        if (args.fp16 or args.bf16) and not quiet:
            _log.warn_once(
                "cpu-precision",
                f"{'fp16' if args.fp16 else 'bf16'}=True was asked for, but there is "
                "no GPU: training in the model's own precision on the CPU "
                "(float32 by default)",
            )
        return None
    if args.bf16:
        if not torch.cuda.is_bf16_supported():
            raise ValueError("bf16=True but this GPU has no bfloat16; set fp16=True instead")
        return torch.bfloat16
    if args.fp16:
        return torch.float16
    return None  # neither asked for: no autocast, as in transformers
