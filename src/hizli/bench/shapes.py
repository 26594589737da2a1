"""Model shapes for benchmarks: published architectures, with random weights (speed and memory do not
depend on the weights' values, and the GPU machine cannot download them)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
    ),
    "llama-3.2-3b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
    ),
    "llama-3.1-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
        tie_word_embeddings=False,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
    ),
    "llama-3.1-70b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
        tie_word_embeddings=False,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
    ),
    "qwen2.5-3b": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        rope_theta=1e6,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
    ),
    # for CPU tests of the benchmark code itself
    "tiny": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
}


def config_for(shape: str):
    from transformers import AutoConfig

    if shape in SHAPES:
        values = dict(SHAPES[shape])
        return AutoConfig.for_model(values.pop("model_type"), **values)
    path = Path(shape)
    if path.is_dir() or path.suffix == ".json":
        return AutoConfig.from_pretrained(path if path.is_dir() else path.parent)
    raise ValueError(f"model shape {shape!r}: use one of {', '.join(SHAPES)} or a folder/config.json path")


def is_shape(name: str) -> bool:
    """A shape this module can make random weights for: a name in SHAPES, a config.json, or a folder
    holding a config and no weights (anything else is a model to load as it is)."""
    path = Path(name)
    if name in SHAPES or (path.suffix == ".json" and path.is_file()):
        return True
    return path.is_dir() and (path / "config.json").is_file() and not any(path.glob("*.safetensors"))


def load_tokenizer(path: str | None):
    """A tokenizer folder or a bare tokenizer.json (roles filled in for Llama 3); None: the embedded model's."""
    from hizli.models.loader import load_tokenizer as load_folder_tokenizer
    from hizli.models.loader import resolve_source, set_pad_token

    if path is None:
        return load_folder_tokenizer(resolve_source("smollm2-135m-instruct").path)
    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_file=str(p))
        if "<|begin_of_text|>" in tok.get_vocab():  # a Llama 3 tokenizer.json carries no special-token roles
            tok.bos_token, tok.eos_token = "<|begin_of_text|>", "<|eot_id|>"
        set_pad_token(tok)
        return tok
    return load_folder_tokenizer(str(p))


def recipe_model_folder(shape: str, tokenizer: str | None, cache: str | os.PathLike) -> Path:
    """``cache/shape``: random bf16 weights of ``shape`` plus a tokenizer with the llama-3.1 chat
    template, made once; the folder every system of a side-by-side run loads."""
    from hizli.data.templates import get_chat_template

    out = Path(cache) / Path(shape).name.replace(".json", "")
    if (out / "tokenizer_config.json").is_file():
        return out
    folder = Path(random_model_folder(shape, cache=cache))
    if folder != out:
        folder.replace(out)
    get_chat_template(load_tokenizer(tokenizer), chat_template="llama-3.1").save_pretrained(out)
    return out


def random_model_folder(shape: str, cache: str | os.PathLike | None = None) -> str:
    """A folder holding random bf16 weights of ``shape`` (made once, reused)."""
    if Path(shape).is_dir() and (Path(shape) / "config.json").is_file():
        if any(Path(shape).glob("*.safetensors")):
            return str(Path(shape))
    root = Path(cache or os.environ.get("HIZLI_BENCH_CACHE", "/tmp/hizli-bench"))
    out = root / Path(shape).name.replace(".json", "")
    if (out / "config.json").is_file():
        return str(out)
    import torch
    from transformers import AutoModelForCausalLM

    config = config_for(shape)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, out)
    return str(out)


def matmul_params(config) -> int:
    """Weights that take part in a matmul per token: every projection of every layer plus the head."""
    h, i = config.hidden_size, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // heads
    per_layer = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * i
    return config.num_hidden_layers * per_layer + config.vocab_size * h


def attention_flops(config, lengths: list[int]) -> float:
    """Useful causal-attention FLOPs (forward + backward = 3 x forward) for sequences of ``lengths``."""
    heads = config.num_attention_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    # forward: QK^T and PV, 2 FLOPs per multiply-add, over the causal half of each L x L score matrix
    fwd = sum(4 * heads * d * n * (n + 1) / 2 for n in lengths) * config.num_hidden_layers
    return 3 * fwd
