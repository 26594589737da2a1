"""Padded, padding-free and packed batches of the same rows give every token the same loss.

Real rows (the packaged ShareGPT sample, SmolLM2's tokenizer and template, assistant-only labels) on
a tiny random Llama in fp32 with hizli's attention hook: per-token cross-entropy must agree to 1e-6
across the three layouts, and no token may attend across a sequence boundary.
"""

from __future__ import annotations

import torch

from hizli.data.collate import (
    IGNORE,
    DataCollatorForSeq2Seq,
    PaddingFreeCollator,
    best_fit_decreasing,
    bucket_length,
    pad_to_length,
)
from hizli.models.patch import padding_free, use_hizli_attention

from helpers import tiny_llama_config


def _rows(smol_tokenizer, n=10):
    from hizli.data.load import load_conversations
    from hizli.data.sample import sample_path
    from hizli.data.templates import get_chat_template
    from hizli.data.tokenize import tokenize_dataset

    tok = get_chat_template(smol_tokenizer, "smollm2", warn=False)
    conv = load_conversations(sample_path("sharegpt"), max_rows=n)
    ds = tokenize_dataset(
        conv, tok, max_seq_length=256, messages_field="messages", train_on="assistant", show_progress=False
    )
    return [ds[i] for i in range(len(ds))]


def _model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    use_hizli_attention(model)
    return model


def _token_losses(model, batch) -> dict[tuple[int, int], float]:
    """{(row, position): loss} for every trained target, from one forward over ``batch``."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if "cu_seqlens" in batch:
        inputs.update(
            cu_seq_lens_q=batch["cu_seqlens"],
            cu_seq_lens_k=batch["cu_seqlens"],
            max_length_q=batch["max_seqlen"],
            max_length_k=batch["max_seqlen"],
        )
    with torch.no_grad(), padding_free() if "cu_seqlens" in batch else torch.no_grad():
        logits = model(**inputs).logits.float()
    targets = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, reduction="none", ignore_index=IGNORE
    )
    return logits, targets, losses


def _by_row_padded(batch, losses, targets):
    out = {}
    for r in range(targets.shape[0]):
        n = int(batch["attention_mask"][r].sum())
        out[r] = [(t, float(losses[r, t])) for t in range(n - 1) if targets[r, t] != IGNORE]
    return out


def _by_row_flat(batch, losses, targets, order):
    bounds = batch["cu_seqlens"].tolist()
    out = {}
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        out[order[k]] = [(t - a, float(losses[0, t])) for t in range(a, b - 1) if targets[0, t] != IGNORE]
    return out


def test_three_layouts_give_every_token_the_same_loss(smol_tokenizer):
    rows = _rows(smol_tokenizer)
    assert len(rows) >= 8
    model = _model()
    padded = DataCollatorForSeq2Seq(smol_tokenizer)(rows)
    _, t, losses = _token_losses(model, padded)
    reference = _by_row_padded(padded, losses, t)

    flat = PaddingFreeCollator()(rows)
    _, t, losses = _token_losses(model, flat)
    free = _by_row_flat(flat, losses, t, list(range(len(rows))))

    bins = best_fit_decreasing([len(r["input_ids"]) for r in rows], capacity=400)
    assert 1 < len(bins) < len(rows)  # real packing: several rows share a bin
    packed = {}
    for b in bins:
        batch = PaddingFreeCollator()([rows[i] for i in b])
        _, t, losses = _token_losses(model, batch)
        packed.update(_by_row_flat(batch, losses, t, b))

    n_tokens = sum(len(v) for v in reference.values())
    assert n_tokens > 500
    for layout in (free, packed):
        assert layout.keys() == reference.keys()
        for r in reference:
            assert [p for p, _ in layout[r]] == [p for p, _ in reference[r]]
            a = torch.tensor([x for _, x in layout[r]])
            b = torch.tensor([x for _, x in reference[r]])
            # Each layout runs the matmuls and attention over other shapes, so fp32 sums are reduced in
            # another order: per-token losses near 11 then differ by a few ulp (1 ulp = 9.5e-7 there).
            # The bound allows about 12 ulp; a token attending across a boundary or a shifted label
            # moves its loss by O(1).
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"row {r}")


def test_a_bucket_filler_changes_no_real_token_and_trains_nothing(smol_tokenizer):
    rows = _rows(smol_tokenizer, n=6)
    model = _model()
    flat = PaddingFreeCollator()(rows)
    n = flat["input_ids"].shape[1]
    _, t, losses = _token_losses(model, flat)
    reference = _by_row_flat(flat, losses, t, list(range(len(rows))))

    length = bucket_length(n + 1)  # at least one filler token, whatever n is
    padded = pad_to_length(flat, length, pad_id=7)
    assert padded["input_ids"].shape == (1, length) and padded["filler_tokens"] == length - n
    assert (padded["labels"][0, n:] == IGNORE).all()  # nothing of the filler is trained
    assert padded["cu_seqlens"].tolist() == flat["cu_seqlens"].tolist() + [length]
    _, t, losses = _token_losses(model, padded)
    bucketed = _by_row_flat(padded, losses, t, list(range(len(rows))) + ["filler"])
    assert bucketed.pop("filler") == []
    for r in reference:
        # the same per-row sums over other shapes: a few ulp (see the layouts test above)
        a = torch.tensor([x for _, x in bucketed[r]])
        b = torch.tensor([x for _, x in reference[r]])
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"row {r}")

    from hizli.train.step import to_device

    assert to_device(padded, torch.device("cpu")).n_tokens == n  # tokens/s counts real tokens only


def test_bucket_lengths_repeat_and_stay_within_the_plan():
    lengths = [bucket_length(n) for n in range(1000, 16385)]
    assert all(0 <= b - n <= n / 16 + 64 for n, b in zip(range(1000, 16385), lengths))
    assert len(set(lengths)) <= 16 * 4 + 1  # about 16 lengths per doubling: shapes repeat
    assert bucket_length(4389, limit=4400) == 4400  # the plan's micro-batch size is never exceeded
    assert bucket_length(4389, limit=4389) == 4389
    assert bucket_length(5000, limit=4389) == 5000  # a batch already above it is left alone


def test_padding_free_labels_never_cross_a_boundary(smol_tokenizer):
    rows = _rows(smol_tokenizer, n=6)
    batch = PaddingFreeCollator()(rows)
    bounds = batch["cu_seqlens"].tolist()
    assert bounds[0] == 0 and bounds[-1] == batch["input_ids"].shape[1]
    for a in bounds[:-1]:
        assert batch["labels"][0, a] == IGNORE  # the previous sequence's last position predicts nothing
        assert batch["position_ids"][0, a] == 0
    assert batch["max_seqlen"] == max(b - a for a, b in zip(bounds, bounds[1:]))


def test_best_fit_decreasing_fills_bins_without_losing_rows():
    lengths = [700, 300, 500, 200, 100, 400, 600, 50]
    bins = best_fit_decreasing(lengths, capacity=1000)
    assert sorted(sum(bins, [])) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1000 for b in bins)
    assert len(bins) == 3  # 2,850 tokens: three bins is the fewest possible
