"""From a collated batch to the summed token loss: decoder forward, then cross-entropy on trained rows.

The loss is a *sum* over trained tokens; the trainer divides by the trained-token count of the whole
optimizer step, which makes gradient accumulation exact (2 x 4 rows == 8 x 1 rows).

The language-model head is never applied to all positions: only the rows whose target is not -100
go through a fused linear cross-entropy that works in chunks, so the ``[tokens, vocab]`` logits never
exist at once (for Llama 3's 128,256-token vocabulary they would be the largest tensor of the step).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from hizli.data.collate import IGNORE


@dataclass
class DeviceBatch:
    """A batch moved to the model's device, with the trained positions precomputed on the host."""

    inputs: dict[str, Any]  # what the decoder takes
    rows: torch.Tensor  # [n] flat positions whose target is trained
    targets: torch.Tensor  # [n] their target token ids
    n_trained: int
    n_tokens: int  # real (non-pad) tokens


def to_device(batch: dict[str, Any], device: torch.device) -> DeviceBatch:
    """Shift labels into targets and select trained positions on the CPU (no GPU->host sync later)."""
    labels = batch["labels"]
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    flat = targets.reshape(-1)
    rows = (flat != IGNORE).nonzero().squeeze(1)
    picked = flat[rows]
    non_blocking = device.type == "cuda"
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"].to(device, non_blocking=non_blocking)}
    if "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"].to(device, non_blocking=non_blocking)
        n_tokens = int(batch["attention_mask"].sum())
    else:  # padding-free: every token is real except a bucket's filler
        n_tokens = int(batch["input_ids"].numel()) - int(batch.get("filler_tokens", 0))
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"].to(device, non_blocking=non_blocking)
    if "cu_seqlens" in batch:
        cu = batch["cu_seqlens"].to(device, non_blocking=non_blocking)
        m = int(batch["max_seqlen"])
        # the names transformers passes through to attention functions for packed sequences
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)
    return DeviceBatch(
        inputs=inputs,
        rows=rows.to(device, non_blocking=non_blocking),
        targets=picked.to(device, non_blocking=non_blocking),
        n_trained=int(rows.numel()),
        n_tokens=n_tokens,
    )


def causal_lm(model):
    """The transformers ``*ForCausalLM`` inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def loss_sum(model, batch: DeviceBatch, ce_chunk_rows: int | None = None, fused_ce: bool = True) -> torch.Tensor:
    """Sum of cross-entropy over the batch's trained tokens (a 0-dim float32 tensor).
    ``ce_chunk_rows``: rows per chunk of the fused loss (the memory plan lowers it on tight budgets).
    ``fused_ce=False`` materialises the logits of every trained row (benchmarks measure the lever)."""
    from hizli.models.patch import padding_free

    lm = causal_lm(model)
    decoder = lm.get_decoder()
    from hizli.models.checkpointing import new_forward_pass

    varlen = padding_free() if "cu_seq_lens_q" in batch.inputs else nullcontext()
    new_forward_pass()
    with varlen:
        hidden = decoder(**batch.inputs, use_cache=False).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.rows)
    if batch.n_trained == 0:
        return hidden.sum() * 0.0  # keeps the graph (and DDP) consistent for an empty batch
    head = lm.get_output_embeddings()
    config = lm.config
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None) or 1.0
    if not fused_ce:
        logits = head(hidden).float() * scale
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        return torch.nn.functional.cross_entropy(logits, batch.targets, reduction="sum")
    if type(head) is torch.nn.Linear and head.bias is None:
        from hizli.kernels.cross_entropy import fused_linear_cross_entropy

        # norms kept in fp32 give fp32 hidden states while the head is bf16: meet in the head's dtype
        return fused_linear_cross_entropy(
            hidden.to(head.weight.dtype),
            head.weight,
            batch.targets,
            reduction="sum",
            logit_scale=scale,
            softcap=softcap or None,
            chunk_size=ce_chunk_rows,
        )
    return _chunked_module_loss(head, hidden, batch.targets, scale, softcap)


def _chunked_module_loss(head, hidden, targets, scale, softcap, chunk: int = 4096) -> torch.Tensor:
    """For heads that are not a plain Linear (LoRA on lm_head, modules_to_save): same loss, the
    head module applied chunk by chunk under checkpointing so only one chunk's logits are alive."""
    from torch.utils.checkpoint import checkpoint

    def piece(h, t):
        logits = head(h).float() * scale
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        return torch.nn.functional.cross_entropy(logits, t, reduction="sum", ignore_index=IGNORE)

    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(piece, hidden[i : i + chunk], targets[i : i + chunk], use_reentrant=False)
    return total
