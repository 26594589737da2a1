"""Fitting each optimizer step into memory: the memory plan applied to a run, and the re-plan that
follows an out-of-memory error.

The plan (``hizli.train.memory_plan``) decides how many micro-batches a step's rows run as and what
each layer keeps for backward. Two settings feed it and are kept apart here: the *plan budget*
(what the plan must fit: ``max_memory_gib``, or the free memory) and the *allocator cap* (whether
the trainer also limits PyTorch's allocator: only when the user set ``max_memory_gib``). A re-plan
after running out of memory lowers the budget to 3/4, never the cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hizli import _log
from hizli.data.collate import PaddingFreeCollator
from hizli.models.checkpointing import apply_layer_modes
from hizli.models.record import state_of
from hizli.train.batches import BatchPlan
from hizli.train.context import StepContext, StepResult, optimizer_step
from hizli.train.memory_plan import MemoryPlan, plan_for, split_step
from hizli.train.ranks import cut, deal_rows, equal_passes

REPLAN_FRACTION = 0.75  # of the previous budget, after an out-of-memory error


@dataclass
class StepMemory:
    """How the run's steps are laid out: ``parts`` is None for the recipe's own micro-batches, else
    the most micro-batches a step's rows may run as (within ``plan.tokens_per_micro_batch``)."""

    parts: int | None = None
    plan: MemoryPlan | None = None
    retries: int = 0

    def groups(self, micro: list[list[int]], lengths: Any) -> list[list[int]]:
        """The step's rows (``micro``: the recipe's micro-batches) as the micro-batches to run."""
        if self.parts is None:
            return micro
        budget = self.plan.tokens_per_micro_batch if self.plan is not None and self.parts != 1 else None
        return split_step(sum(micro, []), lengths, self.parts, budget)


def plan_memory(
    ctx: StepContext, batch_plan: BatchPlan, total_steps: int, budget_gib: float | None = None
) -> StepMemory:
    """The run's ``StepMemory``; applies the plan's layer modes to the model. ``budget_gib``
    overrides ``max_memory_gib`` as the plan budget (the re-plan after an out-of-memory error)."""
    args, model = ctx.args, ctx.model
    budget_gib = budget_gib or args.max_memory_gib
    merge = args.merge_micro_batches
    padding_free = isinstance(ctx.collate, PaddingFreeCollator)
    if merge and not padding_free:
        raise ValueError("merge_micro_batches=True needs the padding-free layout (padding_free=True)")
    if not padding_free or merge is False:
        return StepMemory()
    if ctx.device.type != "cuda" and not budget_gib:
        # On a CPU memory is plentiful but fresh memory is slow: keeping every activation ran at
        # 52 tokens/s against 75-91 recomputing (SmolLM2-135M, NF4, 2 cores), so without a cap
        # layers keep what use_gradient_checkpointing asked for, one batch a step.
        return StepMemory(parts=1)
    steps, epoch = [], 0
    while len(steps) < total_steps and epoch < 3:  # the longest step of the epochs this run sees
        groups = batch_plan.micro_batches(epoch)
        ga = batch_plan.grad_accum
        steps += [sum(groups[i : i + ga], []) for i in range(0, len(groups), ga)]
        epoch += 1
    if ctx.ranks.world_size > 1:  # the plan is per GPU: the busiest rank's share of each step
        lengths = ctx.dataset.lengths
        steps = [
            max(deal_rows([rows], lengths, ctx.ranks.world_size), key=lambda o: sum(lengths[i] for i in o))
            for rows in steps
        ]
    n_params = sum(p.numel() for p in ctx.params)
    optimizer_bytes = n_params * (4 + (2 if args.optim.endswith("8bit") else 8))
    elt = 2 if ctx.amp_dtype in (torch.float16, torch.bfloat16) else ctx.params[0].element_size()
    plan = plan_for(
        model,
        steps=steps[: max(total_steps, 1)],
        lengths=ctx.dataset.lengths,
        budget_gib=budget_gib,
        allocator_capped=bool(args.max_memory_gib),
        amp_elt=elt,
        optimizer_bytes=optimizer_bytes,
    )
    if merge:  # asked for one micro-batch per step: keep the layer modes, force the count
        plan.micro_batches = 1
    apply_layer_modes(model, plan.layer_modes)
    if ctx.device.type == "cuda":
        ctx.ce_chunk_rows = plan.ce_chunk_rows
        ctx.bucket_limit = plan.tokens_per_micro_batch
        graphs = state_of(model).layer_graphs
        if graphs is not None:
            cap = int(args.max_memory_gib * 2**30) if args.max_memory_gib else 0
            graphs.reserve(plan.tokens_per_micro_batch, int(plan.graph_pool_gib * 2**30), cap)
    _log.info(plan.describe())
    for note in plan.notes:
        _log.warn_once(f"plan-{note}", note)
    return StepMemory(parts=plan.micro_batches, plan=plan)


def step_or_replan(
    ctx: StepContext, memory: StepMemory, micro: list[list[int]], step_no: int, replan: Any
) -> tuple[StepResult | None, StepMemory]:
    """One optimizer step. Out of GPU memory nothing has been updated yet: with a memory plan and
    retries left, ``replan(budget_gib)`` makes a plan for 3/4 of the budget and the step is repeated;
    else the error is explained and raised. Returns the step's result and the (possibly new) layout."""
    from hizli.train import oom

    lengths = ctx.dataset.lengths
    while True:
        try:
            if not ctx.ranks.grouped:
                return optimizer_step(ctx, memory.groups(micro, lengths), step_no), memory
            batch = ctx.args.per_device_train_batch_size
            per_rank = [
                memory.groups(cut(rows, batch), lengths) for rows in deal_rows(micro, lengths, ctx.ranks.world_size)
            ]
            share = equal_passes(per_rank, ctx.ranks.rank, lengths)
            # fillers only where the base is sharded: data-parallel ranks meet once a step, not per pass
            fillers = share.fillers if ctx.args.parallel == "fsdp" else []
            return optimizer_step(ctx, share.groups, step_no, fillers), memory
        except torch.OutOfMemoryError as e:
            ctx.optimizer.zero_grad(set_to_none=True)  # free the step's gradients before measuring
            e.__traceback__ = None  # its frames hold the step's activations: let them go too
            plan = memory.plan
            if plan is None or memory.retries >= ctx.args.oom_retries:
                raise oom.explain(
                    e,
                    device=ctx.device,
                    args=ctx.args,
                    model=ctx.model,
                    step=step_no,
                    max_seq_length=getattr(ctx.dataset, "max_seq_length", None),
                    longest_row=max(lengths),
                    memory_plan=plan.to_dict() if plan else None,
                ) from None
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
            smaller = REPLAN_FRACTION * plan.budget_gib
            retries = memory.retries + 1
            _log.warn_once(
                f"oom-retry-{retries}",
                f"step {step_no} ran out of memory; planning again for {smaller:.2f} GiB and "
                f"repeating the step (retry {retries} of {ctx.args.oom_retries})",
            )
            memory = replan(smaller)
            memory.retries = retries
