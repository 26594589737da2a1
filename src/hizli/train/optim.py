"""Optimizer and learning-rate schedule, as the recipe names them (``optim``, ``lr_scheduler_type``)."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from hizli import _log
from hizli.train.args import TrainingArguments


def build_optimizer(params: Iterable[torch.nn.Parameter], args: TrainingArguments) -> torch.optim.Optimizer:
    """``adamw_8bit``: bitsandbytes' 8-bit AdamW (it runs on CPU too since bitsandbytes 0.49);
    without bitsandbytes, torch's AdamW with one warning. ``adamw_torch``: torch's AdamW."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: call FastLanguageModel.get_peft_model first")
    kw = dict(
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
    )
    name = "adamw_8bit" if args.optim == "paged_adamw_8bit" else args.optim
    if name == "adamw_8bit":
        try:
            from hizli._startup import import_bitsandbytes

            return import_bitsandbytes().optim.AdamW8bit(params, **kw)
        except Exception as e:  # ImportError or a native library that will not load
            _log.warn_once(
                "no-8bit-adam",
                f"optim='adamw_8bit' needs bitsandbytes ({type(e).__name__}: {e}); "
                "using torch.optim.AdamW (32-bit state) instead",
            )
            name = "adamw_torch"
    if name == "adamw_torch_fused":
        fused = all(p.is_cuda for p in params)
        return torch.optim.AdamW(params, fused=fused, **kw)
    if name == "adamw_torch":
        return torch.optim.AdamW(params, **kw)
    if name == "sgd":
        return torch.optim.SGD(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    raise AssertionError(f"unhandled optim {args.optim!r}")  # TrainingArguments validated it


def warmup_steps(args: TrainingArguments, total_steps: int) -> int:
    return args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArguments, total_steps: int):
    """The schedules of transformers' ``get_scheduler``, with the same step convention: the factor
    for optimizer step ``s`` (0-based) is ``lr_lambda(s)``, so the first step of a warmup has lr 0."""
    warm = warmup_steps(args, total_steps)
    kind = args.lr_scheduler_type

    def lr_lambda(step: int) -> float:
        if kind == "constant":
            return 1.0
        if step < warm:
            return step / max(1, warm)
        if kind == "constant_with_warmup":
            return 1.0
        progress = (step - warm) / max(1, total_steps - warm)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        raise AssertionError(kind)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
