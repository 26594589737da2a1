"""Batch layouts: padded rows (the recipe's collator), padding-free one-row batches, and packing.

Rows are ``{"input_ids": [...], "labels": [...]}`` with labels aligned to input_ids (HF convention:
the model predicts ``labels[t + 1]`` at position ``t``) and ``-100`` where nothing is trained.

Every layout gives each real token the same prediction target, so the per-token loss is the same:
- padded: ``[B, T]`` tensors with ``attention_mask``; pads are never attended to and never trained.
- padding-free: one ``[1, N]`` row of all sequences end to end; ``position_ids`` restart at 0 for
  each sequence and ``cu_seqlens`` marks the boundaries so attention never crosses them. The first
  label of each sequence is set to -100: it is the target of the previous sequence's last position.
- packed: which rows share a micro-batch is chosen by best-fit-decreasing bins of at most
  ``max_tokens``; the bins are then laid out padding-free.

On a GPU the trainer pads each padding-free micro-batch to one of a few lengths (``bucket_length``)
with one filler sequence that attends only to itself and is never trained (``pad_to_length``): the
matmuls and kernels then see row counts they have run before, where a new one costs the host a fresh
kernel choice, and with PyTorch's default cuBLAS a wait for the GPU to drain.
"""

from __future__ import annotations

from typing import Any, Sequence

from hizli.data.tokenized import IGNORE


def pad_id_of(collator) -> int:
    """The pad token id of a collator's tokenizer (0 when it has none)."""
    return _pad_id(getattr(collator, "tokenizer", None))


def _pad_id(tokenizer) -> int:
    if tokenizer is None:
        return 0
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


class DataCollatorForSeq2Seq:
    """The recipe's padding collator: pads ``input_ids`` with the pad token and ``labels`` with -100.

    Accepts the arguments of ``transformers.DataCollatorForSeq2Seq`` that matter for causal LMs.
    On a GPU hizli's trainer lays the same rows out padding-free instead (identical loss, no compute
    on pads); ``TrainingArguments(padding_free=False)`` keeps them padded.
    """

    layout = "padded"

    def __init__(
        self,
        tokenizer=None,
        model=None,
        padding: bool | str = True,
        *,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        label_pad_token_id: int = IGNORE,
        return_tensors: str = "pt",
    ) -> None:
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r}: hizli collators return PyTorch tensors ('pt')")
        self.tokenizer = tokenizer
        self.pad_id = _pad_id(tokenizer)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.label_pad_token_id = label_pad_token_id
        self.max_length = max_length

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if not features:
            raise ValueError("cannot collate an empty batch")
        ids = [list(f["input_ids"]) for f in features]
        labels = [list(f["labels"]) if f.get("labels") is not None else list(f["input_ids"]) for f in features]
        longest = max(len(x) for x in ids)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        batch_ids = torch.full((len(ids), longest), self.pad_id, dtype=torch.long)
        batch_labels = torch.full((len(ids), longest), self.label_pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for i, (x, y) in enumerate(zip(ids, labels)):
            if len(x) != len(y):
                raise ValueError(f"row {i} of the batch has {len(x)} input_ids but {len(y)} labels")
            batch_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            batch_labels[i, : len(y)] = torch.tensor(y, dtype=torch.long)
            mask[i, : len(x)] = 1
        return {"input_ids": batch_ids, "attention_mask": mask, "labels": batch_labels}


class PaddingFreeCollator:
    """All rows of a batch end to end in one ``[1, N]`` row, with per-sequence ``position_ids``."""

    layout = "padding_free"

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = tokenizer

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if not features:
            raise ValueError("cannot collate an empty batch")
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        bounds = [0]
        for i, f in enumerate(features):
            x = list(f["input_ids"])
            y = list(f["labels"]) if f.get("labels") is not None else list(x)
            if len(x) != len(y):
                raise ValueError(f"row {i} of the batch has {len(x)} input_ids but {len(y)} labels")
            if not x:
                continue
            ids.extend(x)
            labels.append(IGNORE)  # never trained: the previous sequence's last position predicts it
            labels.extend(y[1:])
            positions.extend(range(len(x)))
            bounds.append(bounds[-1] + len(x))
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
            "max_seqlen": max(lengths),
        }


def bucket_length(n: int, limit: int | None = None, per_doubling: int | None = None) -> int:
    """The length a padding-free batch of ``n`` tokens is padded to: ``n`` rounded up to a multiple of
    ``1 / per_doubling`` (a power of two, 16 by default) of the power of two at or below it (at least
    64), so lengths fall on about ``per_doubling`` values per doubling and cost at most that fraction
    more tokens. Never above ``limit`` (the memory plan's micro-batch size) unless ``n`` itself is."""
    if n <= 0:
        return n
    per_doubling = per_doubling or 16
    if per_doubling & (per_doubling - 1):
        raise ValueError(f"bucket_length: per_doubling={per_doubling} is not a power of two")
    step = max(64, 1 << max(0, n.bit_length() - per_doubling.bit_length()))
    padded = -(-n // step) * step
    if limit is not None and padded > limit:
        padded = max(n, limit)
    return padded


def pad_to_length(batch: dict[str, Any], length: int, pad_id: int = 0) -> dict[str, Any]:
    """A padding-free batch (one ``[1, N]`` row with ``cu_seqlens``) made ``length`` tokens long by one
    filler sequence at the end: its own attention segment, positions from 0, nothing trained. The
    real tokens' loss and gradients are unchanged; ``filler_tokens`` says how many were added."""
    import torch

    n = batch["input_ids"].shape[1]
    extra = length - n
    if extra <= 0:
        return batch
    out = dict(batch)
    out["input_ids"] = torch.cat([batch["input_ids"], torch.full((1, extra), pad_id, dtype=torch.long)], dim=1)
    out["labels"] = torch.cat([batch["labels"], torch.full((1, extra), IGNORE, dtype=torch.long)], dim=1)
    out["position_ids"] = torch.cat([batch["position_ids"], torch.arange(extra, dtype=torch.long)[None]], dim=1)
    out["cu_seqlens"] = torch.cat([batch["cu_seqlens"], torch.tensor([length], dtype=torch.int32)])
    out["max_seqlen"] = max(int(batch["max_seqlen"]), extra)
    out["filler_tokens"] = extra
    return out


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group row indices into bins whose total length is at most ``capacity``.

    Longest rows first, each into the fullest bin that still has room (best fit), else a new bin.
    Rows longer than ``capacity`` get a bin of their own (truncation happens earlier).
    """
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # free space of each open bin, kept sorted with its bin index for O(log n) best-fit lookup
    free: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        pos = bisect.bisect_left(free, (n, -1))
        if pos < len(free):
            space, b = free.pop(pos)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (max(capacity - n, 0), len(bins) - 1))
    return bins


def count_trained(labels) -> int:
    """Tokens that carry a loss: positions t whose target labels[t + 1] is not -100, per row."""
    return int((labels[..., 1:] != IGNORE).sum())
