"""Held-out loss and perplexity, computed with the training loss itself.

``evaluate_loss`` runs the model over a tokenized dataset in batches and sums the same per-token
cross-entropy that training minimises (``hizli.train.step.loss_sum``: only the trained rows go
through the fused linear cross-entropy, so the ``[tokens, vocab]`` logits never exist). The result
is the mean over every trained token of the set (not a mean of batch means), and its perplexity
``exp(loss)``. The trainer's ``evaluate()`` and ``hizli eval`` both call it, so the two report the
same number for the same model and rows.
"""

from __future__ import annotations

from hizli import _log

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

from hizli.train.args import TrainingArguments

from hizli.train import step as step_mod


@dataclass
class EvalResult:
    """What one evaluation measured.

    Attributes:
        loss: mean cross-entropy per trained token (nats), as the training loss is defined.
        perplexity: ``exp(loss)`` (``inf`` past float range).
        trained_tokens: tokens that carry a loss (their target label is not -100).
        tokens: all tokens of the rows evaluated.
        rows: rows evaluated.
    """

    loss: float
    perplexity: float
    trained_tokens: int
    tokens: int
    rows: int

    def metrics(self, prefix: str = "eval_") -> dict[str, Any]:
        """Trainer-style keys: ``eval_loss``, ``eval_perplexity``, ``eval_tokens`` (trained), ``eval_rows``."""
        return {
            f"{prefix}loss": self.loss,
            f"{prefix}perplexity": self.perplexity,
            f"{prefix}tokens": self.trained_tokens,
            f"{prefix}rows": self.rows,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def perplexity(loss: float) -> float:
    """``exp(loss)``; ``inf`` where that overflows, ``nan`` for a ``nan`` loss."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@torch.no_grad()
def evaluate_loss(
    model,
    dataset: Sequence[dict[str, Any]],
    collate: Callable[[list], dict[str, Any]],
    *,
    batch_size: int = 8,
    amp_dtype: torch.dtype | None = None,
    ce_chunk_rows: int | None = None,
    show_progress: bool = False,
) -> EvalResult:
    """Mean training loss per trained token of ``dataset`` under ``model``, and its perplexity.

    Args:
        model: a causal LM (transformers or PEFT-wrapped). Put in eval mode for the call (dropout
            off) and back in its previous mode afterwards.
        dataset: rows ``{"input_ids": [...], "labels": [...]}`` (a ``TokenizedDataset``), labels
            aligned with input_ids, -100 where nothing is scored.
        collate: turns a list of rows into a batch (``PaddingFreeCollator`` or
            ``DataCollatorForSeq2Seq``; the loss does not depend on which).
        batch_size: rows per forward pass, taken in order.
        amp_dtype: autocast dtype (``torch.bfloat16``/``torch.float16``), or None for the model's own
            precision.
        ce_chunk_rows: rows per chunk of the fused loss (None: the kernel's choice).
        show_progress: a tqdm bar over the batches.

    Returns:
        An ``EvalResult``.

    Raises:
        ValueError: ``batch_size`` is not a positive integer, or no row has a trained token.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: use a positive integer (per_device_eval_batch_size)")
    n = len(dataset)
    if n == 0:
        raise ValueError("nothing to evaluate: the dataset has no rows")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    starts = range(0, n, batch_size)
    if show_progress and _log.first_rank():
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="evaluating", unit="batch", dynamic_ncols=True)
    # summed on the device in float64: one host sync at the end, and 10^6 tokens add up exactly enough
    total = torch.zeros((), dtype=torch.float64, device=device)
    trained = tokens = 0
    try:
        for i in starts:
            batch = step_mod.to_device(collate([dataset[j] for j in range(i, min(n, i + batch_size))]), device)
            with autocast:
                total += step_mod.loss_sum(model, batch, ce_chunk_rows=ce_chunk_rows).double()
            trained += batch.n_trained
            tokens += batch.n_tokens
    finally:
        if was_training:
            model.train()
    if trained == 0:
        raise ValueError(f"nothing to evaluate: none of the {n} rows has a scored token (every label is -100)")
    loss = float(total) / trained
    return EvalResult(loss=loss, perplexity=perplexity(loss), trained_tokens=trained, tokens=tokens, rows=n)


def eval_due(args: TrainingArguments, step_no: int, total: int, epoch_end: bool) -> bool:
    """Whether ``args.eval_strategy`` (``no``, ``steps`` every ``eval_steps`` or ``logging_steps``,
    ``epoch``) evaluates after step ``step_no`` of ``total``; the last step always evaluates."""
    if args.eval_strategy == "no":
        return False
    if args.eval_strategy == "epoch":
        return epoch_end or step_no == total
    every = args.eval_steps or args.logging_steps
    return step_no % every == 0 or step_no == total
