"""Activation checkpointing per decoder layer: plain (recompute) or offloaded (layer input on CPU).

``use_gradient_checkpointing`` in the recipe takes True, False or "unsloth". "unsloth" means: keep
only each layer's input, in pinned CPU memory, and recompute the layer in backward. On a CPU there
is nowhere cheaper to put it, so it is plain checkpointing there.

transformers' ``GradientCheckpointingLayer`` calls ``self._gradient_checkpointing_func(fn, *args)``
when ``self.gradient_checkpointing`` is set; we set both attributes per layer, which works across
the transformers 5.x range (the enabling API itself was renamed inside it).
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class _OffloadedCheckpoint(torch.autograd.Function):
    """Run ``fn(hidden, *args)`` without keeping activations; keep ``hidden`` on the CPU.

    Backward copies the input back, recomputes ``fn`` with grad enabled and backpropagates through
    it; LoRA weight gradients accumulate into ``.grad`` there. RNG state is replayed so dropout
    in the recompute matches the forward. Gradients flow to ``hidden`` only (the other positional
    arguments of a decoder layer are masks and position tensors that need none).
    """

    @staticmethod
    def forward(ctx, fn: Callable, hidden: torch.Tensor, *args: Any) -> torch.Tensor:
        ctx.fn, ctx.args, ctx.device, ctx.n_args = fn, args, hidden.device, len(args)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        if hidden.is_cuda:
            saved = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            saved.copy_(hidden, non_blocking=True)
            ctx.copied = torch.cuda.Event()
            ctx.copied.record()
        else:
            saved = hidden.detach()
        ctx.saved = saved
        with torch.no_grad():
            return fn(hidden, *args)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.device.type == "cuda":
            ctx.copied.synchronize()
            hidden = ctx.saved.to(ctx.device, non_blocking=True)
        else:
            hidden = ctx.saved
        hidden = hidden.detach().requires_grad_(True)
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with torch.enable_grad():
                out = ctx.fn(hidden, *ctx.args)
        torch.autograd.backward(out, grad_out)
        ctx.saved = ctx.fn = ctx.args = None
        return (None, hidden.grad) + (None,) * ctx.n_args


def offloaded_checkpoint(fn: Callable, hidden: torch.Tensor, *args: Any) -> torch.Tensor:
    """Checkpoint function with the signature transformers' layers call."""
    if not hidden.requires_grad:
        # The LoRA weights live inside fn; the output must require grad for backward to reach them.
        hidden = hidden.detach().requires_grad_(True)
    return _OffloadedCheckpoint.apply(fn, hidden, *args)


def plain_checkpoint(fn: Callable, *args: Any) -> torch.Tensor:
    from torch.utils.checkpoint import checkpoint

    return checkpoint(fn, *args, use_reentrant=False)


def set_checkpointing(model: torch.nn.Module, mode: bool | str) -> str:
    """Enable ``mode`` (True / False / "unsloth") on every decoder layer. Returns what was applied."""
    if mode not in (True, False, "unsloth"):
        raise ValueError(
            f"use_gradient_checkpointing={mode!r}: use True (recompute), \"unsloth\" "
            "(recompute, layer inputs kept in CPU memory on a GPU) or False (keep all activations)"
        )
    on_gpu = any(p.is_cuda for p in model.parameters())
    applied = "off" if mode is False else ("offload" if mode == "unsloth" and on_gpu else "recompute")
    func = offloaded_checkpoint if applied == "offload" else plain_checkpoint
    found = False
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = applied != "off"
            module._gradient_checkpointing_func = func
            found = True
    if not found and applied != "off":
        raise ValueError(
            f"{type(model).__name__} has no layers that support checkpointing; "
            "pass use_gradient_checkpointing=False"
        )
    if applied != "off":
        # checkpointed layers need an input that requires grad for their LoRA gradients to flow
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()
        if hasattr(base, "config"):
            base.config.use_cache = False
    return applied

