"""Shared fixtures: a tiny random Llama with a real tokenizer, the embedded model, the sample data.

Plain ``pytest`` is CPU-only and offline: the fast tier. GPU tests carry ``@pytest.mark.gpu`` and run with
``pytest -m gpu`` on a GPU machine; they skip cleanly where there is no GPU. The reliability tier
(``tests/reliability``, ``-m reliability``) runs with ``scripts/test --all``.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py, shared by every test folder
from helpers import tiny_llama_config  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser):
    parser.addoption(
        "--reliability-doc",
        action="store_true",
        help="rewrite docs/RELIABILITY.md from this session's reliability tests (scripts/reliability-report)",
    )


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
