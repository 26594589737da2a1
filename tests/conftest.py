"""Shared fixtures: a tiny random Llama with a real tokenizer, the embedded model, the sample data.

Plain ``pytest`` is CPU-only and offline. GPU tests carry ``@pytest.mark.gpu`` and run with
``pytest -m gpu`` on a GPU machine; they skip cleanly where there is no GPU.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture(scope="session")
def tiny_config():
    return tiny_llama_config()


@pytest.fixture(scope="session")
def smol_folder() -> str:
    """The embedded SmolLM2-135M-Instruct as a cached transformers folder (converted once)."""
    from hizli.models.loader import resolve_source

    return resolve_source("smollm2-135m-instruct").path


@pytest.fixture(scope="session")
def smol_tokenizer(smol_folder):
    from hizli.models.loader import load_tokenizer

    return load_tokenizer(smol_folder)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_folder) -> str:
    """A random tiny Llama saved with the embedded model's tokenizer (real vocabulary and template)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(smol_folder).save_pretrained(out)
    return str(out)
