"""Shared test helpers (importable as ``helpers`` from any test file; tests/conftest.py puts this
folder on sys.path)."""

from __future__ import annotations

import torch


def tiny_llama_config(vocab_size: int = 49152, **overrides):
    """A 2-layer Llama small enough for CPU tests (GQA, tied embeddings, like Llama 3.2)."""
    from transformers import LlamaConfig

    values = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=0,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_lora_model(dtype=torch.float32, seed: int = 0, checkpointing=False, vocab: int = 512,
                    lora_seed: int = 3407):
    """A 2-layer Llama (base weights from ``seed``) with LoRA r=8 whose B is random (``lora_seed``)."""
    from transformers import LlamaForCausalLM

    from hizli.models import lora
    from hizli.models.patch import use_hizli_attention

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=vocab)).to(dtype)
    use_hizli_attention(model)
    model = lora.add_lora(model, r=8, lora_alpha=16, use_gradient_checkpointing=checkpointing,
                          init_lora_weights=False, random_state=lora_seed)  # random B: the adapter matters from step 0
    return model


def token_rows(n: int, seed: int = 0, vocab: int = 512, lo: int = 5, hi: int = 40, masked_prefix: bool = True):
    """Rows of varying length; the first few tokens of each are not trained (like a prompt)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        cut = int(torch.randint(1, max(2, length // 2), (1,), generator=g)) if masked_prefix else 0
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return rows


class FakeTokenizer:
    """Enough of a tokenizer for trainer tests on pre-tokenized rows."""

    pad_token_id = 0
    eos_token_id = 2
    pad_token = "<pad>"
    eos_token = "</s>"

    def save_pretrained(self, path):
        pass
