"""The memory plan: how to run an optimizer step as fast as possible within the memory there is.

Two choices, made once before training from the model's shape, the longest optimizer step of the
data (known in advance: the batch plan fixes every step's rows) and the memory budget (the GPU's free
memory, or ``max_memory_gib``):
- how many tokens a micro-batch may hold (a step's rows then run as the fewest micro-batches within
  that budget, at most ``micro_batches``; 1 = all its rows at once, padding-free);
- for each decoder layer, what it keeps for backward: everything (``keep``), its input
  (``recompute``), or nothing on the GPU (``offload``: the input waits in pinned CPU memory), within
  what ``use_gradient_checkpointing`` allows (see ``hizli.models.checkpointing``).

The plan minimises a simple time model (``step_seconds``: recomputing a layer costs about a third
of its work again, and every micro-batch pays the host's per-layer work again, which dominates
small micro-batches), subject to the predicted peak fitting the budget. The prediction is printed
beside the plan, and ``hizli bench`` reports it next to the measured peak so the model can be checked.

Bytes per token per layer, for hidden size H, key/value width KV, MLP width I, element size e:
``keep`` holds about e * (7H + 2KV + 3I) through PEFT's modules (inputs of both norms, their
outputs, q, k, v, the attention output, gate, up and their product) and e * (7H + 3KV + 2I) through
hizli's fused LoRA layers (the q/k/v matmul output, the rotated q and k, gate and up; no product;
since the group rotates q and k in its own output, (H + KV) of that is margin);
``recompute`` e * H (the layer input); ``offload`` 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

GIB = 1024**3
# Time model, fractions of a step that keeps everything in one micro-batch: recomputing 27 of 28 layers
# runs at 0.70x the speed of keeping them (H200, Llama-3.2-3B shape).
RECOMPUTE_COST = 0.43  # extra time of a recomputed layer, relative to its forward + backward
OFFLOAD_COST = 0.50  # recompute plus copies that mostly overlap compute
# A step takes the longer of its GPU time and its host time (the Python and launch work of every
# layer, paid again by every micro-batch whatever its size). On an H200 at the 3B shape the matmuls run at
# about 450 TFLOP/s, and an offloaded layer costs about 15 ms of host time (10 ms, plus half to recompute).
EFFECTIVE_FLOPS = 450e12
HOST_S_PER_LAYER = 10e-3


@dataclass
class MemoryPlan:
    micro_batches: int
    layer_modes: list[str]
    tokens_per_micro_batch: int
    ce_chunk_rows: int
    predicted_peak_gib: float
    budget_gib: float
    static_gib: float
    notes: list[str] = field(default_factory=list)
    graph_pool_gib: float = 0.0  # what offloaded layers' CUDA graphs pool (``Shape.graph_pool_bytes``)

    def describe(self) -> str:
        counts = {m: self.layer_modes.count(m) for m in ("keep", "recompute", "offload") if m in self.layer_modes}
        layers = ", ".join(f"{n} {m}" for m, n in counts.items())
        return (
            f"memory plan: up to {self.micro_batches} micro-batch(es) of <= {self.tokens_per_micro_batch:,} "
            f"tokens per step; layers: {layers}; loss chunks of {self.ce_chunk_rows} rows; predicted peak "
            f"{self.predicted_peak_gib:.2f} GiB of a {self.budget_gib:.2f} GiB budget (model and optimizer "
            f"{self.static_gib:.2f} GiB)"
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Shape:
    layers: int
    hidden: int
    kv: int
    intermediate: int
    vocab: int
    elt: int  # bytes per activation element
    fused: bool = False  # LoRA layers through hizli.models.fused_lora
    mlp_unread: bool = False  # offloaded layers' recomputed MLP runs only in backward (lora_mlp's output_unread)
    graphed: bool = False  # offloaded layers replay CUDA graphs (hizli.models.layer_graphs)

    @classmethod
    def of(cls, config, elt: int, fused: bool = False, mlp_unread: bool = False, graphed: bool = False) -> "Shape":
        heads = config.num_attention_heads
        d = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            config.num_hidden_layers,
            config.hidden_size,
            config.num_key_value_heads * d,
            config.intermediate_size,
            config.vocab_size,
            elt,
            fused,
            fused and mlp_unread,
            graphed,
        )

    def keep_bytes(self) -> int:
        if self.fused:
            return self.elt * (7 * self.hidden + 3 * self.kv + 2 * self.intermediate)
        return self.elt * (7 * self.hidden + 2 * self.kv + 3 * self.intermediate)

    def input_bytes(self) -> int:
        return self.elt * self.hidden

    def _layer_peak(self, offload: bool) -> tuple[float, float]:
        """(elements a token, bytes of dequantised weights) alive in the layer being recomputed and
        backpropagated (or, deferred, in its first pass), besides the loss's buffers."""
        if self.fused and offload and self.mlp_unread:
            # Kept by the recompute: the layer input, both norms' outputs, the q/k/v buffer, the attention
            # output and the residual after attention (6H + 2KV). The MLP's backward adds the incoming
            # gradient, dx and its three [T, I / UNREAD_CHUNKS] pieces; attention's backward the
            # gradients of q/k/v twice over (returned, then joined), of its output, and flash
            # attention's fp32 accumulator of dq (2H). 15 % margin: not yet checked on a GPU.
            # Its first pass (no autograd) holds four [T, H], q/k/v and the MLP's slices of [T, 3I / 2].
            from hizli.kernels.lora_mlp import NO_GRAD_CHUNKS, UNREAD_CHUNKS

            piece = -(-self.intermediate // UNREAD_CHUNKS)
            mlp = 8 * self.hidden + 2 * self.kv + 3 * piece
            attention = 10 * self.hidden + 6 * self.kv
            first_piece = -(-self.intermediate // NO_GRAD_CHUNKS)
            first_pass = 4 * self.hidden + 2 * self.kv + 3 * first_piece
            # down, and a piece of gate and up (the first pass's pieces are the larger)
            weight = self.elt * self.hidden * (self.intermediate + 2 * max(piece, first_piece))
            return 1.15 * max(mlp, attention, first_pass), weight
        if self.fused:
            # The recomputed layer's saved tensors plus backward's [T, I] and [T, H] temporaries, and one
            # weight-sized dequant buffer. 3H less than the count (q, k, v kept as views of the group's
            # output, the recomputed output freed before its backward, the layer below fetched after
            # it): 3.7 % above the 117.3 kB/token measured at the 3B shape, every layer offloaded
            # (subtracting the full 5H the count suggests ran out of memory under a 3.094 GiB cap).
            per_token = 1.1 * (9 * self.hidden + 3 * self.kv + 3 * self.intermediate) - 3 * self.hidden
            return per_token, self.elt * self.hidden * max(self.intermediate, self.hidden)
        # 252 kB/token measured with every layer offloaded
        return 2.3 * self.keep_bytes() / self.elt, 2 * self.elt * self.hidden * max(self.intermediate, self.hidden)

    def transient_bytes(self, tokens: int, ce_rows: int, offload: bool = False) -> int:
        """Alive besides the kept activations: one layer being recomputed and backpropagated (about
        twice its kept activations), the loss's logits chunk and its hidden-state buffers, and a
        dequantised weight. Errs high: 44.6 GiB from this model (before slack) against 42.5 GiB measured
        with all layers kept (H200, Llama-3.2-3B shape, 15,310 tokens). ``offload``: the layer
        recomputed is an offloaded one."""
        per_token, weight = self._layer_peak(offload)
        loss_phase = 3 * self.elt * self.hidden * tokens
        ce = ce_rows * self.vocab * self.elt
        if self.graphed and offload:
            # The graphs' pool is held through the loss: the two add up. Besides the pool: the static
            # buffers (layer input, output gradient and result) and what the eager code around a replay
            # holds (the fetched input, the incoming gradient, the result handed on), 6H a token.
            return int(self.graph_pool_bytes(tokens) + 6 * self.elt * self.hidden * tokens + loss_phase + ce)
        if self.fused and offload and self.mlp_unread:
            # The loss's [T, H] buffers are gone by then but for the gradient, counted here: the larger
            # of the two phases, not their sum.
            return int(max(self.elt * per_token * tokens, loss_phase) + ce + weight)
        return int(self.elt * per_token * tokens + loss_phase + ce + weight)

    def graph_pool_bytes(self, tokens: int) -> int:
        """The memory pool of offloaded layers' CUDA graphs (``hizli.models.layer_graphs``) at
        ``tokens``: one layer's first pass, or its recompute and backward, and its dequantised weights."""
        per_token, weight = self._layer_peak(offload=True)
        return int(self.elt * per_token * tokens + weight)


def split_rows(rows: Sequence[int], lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Split a step's rows into ``parts`` groups of similar token counts (longest first, greedy)."""
    parts = max(1, min(parts, len(rows)))
    groups: list[list[int]] = [[] for _ in range(parts)]
    sizes = [0] * parts
    for r in sorted(rows, key=lambda r: -lengths[r]):
        i = sizes.index(min(sizes))
        groups[i].append(r)
        sizes[i] += lengths[r]
    return [g for g in groups if g]


def max_micro_tokens(steps: Sequence[Sequence[int]], lengths: Sequence[int], parts: int) -> int:
    return max((max(sum(lengths[r] for r in g) for g in split_rows(rows, lengths, parts)) for rows in steps), default=0)


def split_step(
    rows: Sequence[int], lengths: Sequence[int], max_parts: int, token_budget: int | None
) -> list[list[int]]:
    """A step's rows in the fewest micro-batches (at most ``max_parts``) of <= ``token_budget`` tokens.

    The budget is set by the step with the longest rows; a step of short rows then runs in fewer,
    larger micro-batches than that worst case, which is where most of the speed under a cap comes
    from (each micro-batch re-reads every weight and launches every kernel again).
    """
    if token_budget is None:
        return split_rows(rows, lengths, max_parts)
    for parts in range(1, max(1, max_parts) + 1):
        groups = split_rows(rows, lengths, parts)
        if max(sum(lengths[r] for r in g) for g in groups) <= token_budget:
            return groups
    return split_rows(rows, lengths, max_parts)


SLACK_RATIO, SLACK_BYTES = 1.05, 128 * 1024**2
CAPPED_SLACK_RATIO, CAPPED_SLACK_BYTES = 1.02, 64 * 1024**2


def _peak(base: float, capped: bool = False) -> float:
    """Reserved memory from allocated: allocator slack of 5 % plus 128 MiB (reserved exceeded
    allocated by 0.4 % keeping every layer and by 4 % recomputing them, on the calibration runs).
    Under ``max_memory_gib`` the trainer caps the allocator itself, which then frees cached blocks
    before it would exceed the cap, so what must fit is little more than the allocated peak."""
    if capped:
        return base * CAPPED_SLACK_RATIO + CAPPED_SLACK_BYTES
    return base * SLACK_RATIO + SLACK_BYTES


def step_seconds(shape: Shape, tokens: float, micro_batches: float, not_kept: float, penalty: float) -> float:
    """Predicted seconds of a step of ``tokens`` run as ``micro_batches``, with a fraction
    ``not_kept`` of the layers recomputed at ``penalty`` extra each: the longer of GPU and host time."""
    layer_params = shape.hidden * (2 * shape.hidden + 2 * shape.kv) + 3 * shape.hidden * shape.intermediate
    gpu = tokens * 6 * layer_params * shape.layers / EFFECTIVE_FLOPS * (1 + penalty * not_kept)
    host = micro_batches * shape.layers * HOST_S_PER_LAYER * (1 + 0.5 * not_kept)
    return max(gpu, host)


def make_plan(
    *,
    shape: Shape,
    steps: Sequence[Sequence[int]],
    lengths: Sequence[int],
    allowed: Sequence[str],
    budget_bytes: float,
    static_bytes: float,
    max_parts: int,
    capped: bool = False,
) -> MemoryPlan:
    """Pick the token budget per micro-batch and the per-layer modes with the lowest time cost whose
    peak fits. For each layer layout the budget is the most tokens that fit (at least the longest
    row, at most the longest step); every step then runs as the fewest micro-batches within it."""
    best: tuple[float, MemoryPlan] | None = None
    # the loss's logits chunk: 1,024 rows where memory is ample; fewer when it is not. Each chunk
    # re-reads the head's weight, but under a tight budget the step is bound by host work, not by
    # those reads, and every MiB the chunk does not take goes to a larger micro-batch.
    spare = budget_bytes - static_bytes
    ce_rows = int(max(128, min(1024, spare * 0.04 / max(1, shape.vocab * shape.elt))) // 64 * 64)
    mean_tokens = sum(lengths[r] for rows in steps for r in rows) / max(1, len(steps))
    longest_row = max((lengths[r] for rows in steps for r in rows), default=0)
    longest_step = max((sum(lengths[r] for r in rows) for rows in steps), default=0)
    ratio, extra = (CAPPED_SLACK_RATIO, CAPPED_SLACK_BYTES) if capped else (SLACK_RATIO, SLACK_BYTES)

    def transient(tokens: int, mode: str) -> int:
        return shape.transient_bytes(tokens, ce_rows, offload=mode == "offload")

    def room_and_per_token(mode: str) -> tuple[float, float]:
        fixed = transient(0, mode)  # the dequant buffers and the loss chunk
        return (budget_bytes - extra) / ratio - static_bytes - fixed, (transient(4096, mode) - fixed) / 4096

    splits_at: dict[int, tuple[int, float, int]] = {}

    def splits(tokens: int) -> tuple[int, float, int]:
        """(most micro-batches of a step, their mean, largest micro-batch) at this token budget."""
        if tokens not in splits_at:
            counts, largest = [], 0
            for rows in steps:
                groups = split_step(rows, lengths, max_parts, tokens)
                counts.append(len(groups))
                largest = max(largest, max(sum(lengths[r] for r in g) for g in groups))
            splits_at[tokens] = (max(counts), sum(counts) / len(counts), largest)
        return splits_at[tokens]

    if longest_row and room_and_per_token("keep")[0] > 0:
        for keep in range(shape.layers, -1, -1):
            rest = shape.layers - keep
            options = []
            if rest == 0:
                options.append(("keep", keep * shape.keep_bytes(), 0.0))
            else:
                if "recompute" in allowed:
                    options.append(
                        ("recompute", keep * shape.keep_bytes() + rest * shape.input_bytes(), RECOMPUTE_COST)
                    )
                if "offload" in allowed:
                    options.append(("offload", keep * shape.keep_bytes(), OFFLOAD_COST))
            for mode, held, penalty in options:
                room, per_token = room_and_per_token(mode)
                if room <= 0:
                    continue
                tokens = min(longest_step, int(room / (per_token + held)))
                if tokens < longest_row:
                    continue
                micro, mean_parts, used = splits(tokens)
                if used > tokens:  # a step needs more micro-batches than it has rows
                    continue
                peak = _peak(static_bytes + transient(used, mode) + held * used, capped)
                cost = step_seconds(shape, mean_tokens, mean_parts, rest / shape.layers, penalty)
                if best is None or cost < best[0] - 1e-9:
                    best = (
                        cost,
                        MemoryPlan(
                            micro,
                            ["keep"] * keep + [mode] * rest,
                            used,
                            ce_rows,
                            peak / GIB,
                            budget_bytes / GIB,
                            static_bytes / GIB,
                            graph_pool_gib=shape.graph_pool_bytes(used) / GIB
                            if shape.graphed and mode == "offload"
                            else 0.0,
                        ),
                    )
            if best is not None and keep == shape.layers and best[1].micro_batches == 1:
                break  # nothing is faster than keeping everything in one micro-batch
    if best is not None:
        return best[1]
    # Nothing fits by the estimate: the smallest-footprint plan, said so; the OOM handler explains if it fails.
    parts = max(1, max_parts)
    tokens = max_micro_tokens(steps, lengths, parts)
    mode = "offload" if "offload" in allowed else ("recompute" if "recompute" in allowed else "keep")
    held = (
        (shape.input_bytes() * shape.layers * tokens)
        if mode == "recompute"
        else (shape.keep_bytes() * shape.layers * tokens if mode == "keep" else 0)
    )
    peak = _peak(static_bytes + shape.transient_bytes(tokens, 128, offload=mode == "offload") + held, capped)
    notes = (
        []
        if peak <= budget_bytes
        else [
            f"no plan fits the {budget_bytes / GIB:.2f} GiB budget by the estimate "
            f"({peak / GIB:.2f} GiB predicted); running the smallest one"
        ]
    )
    return MemoryPlan(
        parts, [mode] * shape.layers, tokens, 128, peak / GIB, budget_bytes / GIB, static_bytes / GIB, notes=notes
    )


def plan_for(
    model,
    *,
    steps: Sequence[Sequence[int]],
    lengths: Sequence[int],
    budget_gib: float | None,
    allocator_capped: bool,
    amp_elt: int,
    optimizer_bytes: int,
) -> MemoryPlan:
    """The plan for ``model`` on its device (GPU: free memory; CPU: 40 % of RAM), within ``budget_gib``
    when given. ``allocator_capped``: PyTorch's allocator is held to the run's ``max_memory_gib`` (then
    reserved memory stays close to allocated); a smaller budget alone, as an out-of-memory retry plans
    for, leaves the allocator as it is."""
    import torch

    from hizli.train.step import causal_lm

    device = next(model.parameters()).device
    from hizli.models.record import find_state

    record = find_state(model)
    allowed = tuple(record.allowed_modes if record is not None and record.allowed_modes else ("keep", "recompute"))
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = budget * 0.95 + torch.cuda.memory_allocated(device)
        static = torch.cuda.memory_allocated(device) + optimizer_bytes
    else:
        import os

        budget = 0.4 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        static = sum(p.numel() * p.element_size() for p in model.parameters()) + optimizer_bytes
    if budget_gib:
        budget = min(budget, budget_gib * GIB)
    from hizli.models.patch import model_uses_fused_lora

    fused = device.type == "cuda" and model_uses_fused_lora(model)
    copies = record.compute_copies if record is not None else None
    if fused and copies is not None:  # the adapters' compute-dtype copies, made at the first forward
        static += copies.pending_bytes(model, amp_elt)
    from hizli.models.checkpointing import decoder_layers, layer_options

    layers = decoder_layers(model)
    defer = record is not None and record.defer_offloaded_mlp
    mlp_unread = bool(layers) and layer_options(layers[0], defer).mlp_unread
    graphed = device.type == "cuda" and record is not None and record.layer_graphs is not None
    shape = Shape.of(causal_lm(model).config, amp_elt, fused=fused, mlp_unread=mlp_unread, graphed=graphed)
    max_parts = max((len(s) for s in steps), default=1)
    plan = make_plan(
        shape=shape,
        steps=steps,
        lengths=lengths,
        allowed=allowed,
        budget_bytes=budget,
        static_bytes=static,
        max_parts=max_parts,
        capped=allocator_capped and device.type == "cuda",
    )
    if not math.isfinite(plan.predicted_peak_gib):
        raise AssertionError(plan)
    return plan
