"""Turn a .gguf file into a cached transformers folder once, so later loads take about a second.

transformers reads GGUF (``gguf_file=``) but converts the tokenizer and de-quantizes every tensor
on each load (about 20-45 s for SmolLM2-135M on a 2-core CPU), and refuses ``save_pretrained`` on
the result. A fresh model built from the same config without ``quantization_config``, given the
loaded state dict, saves to safetensors; that folder is what we cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from hizli import _log

CACHE_ENV = "HIZLI_CACHE"
# What a cached folder holds depends on hizli's conversion as well as on the file: raising this
# rebuilds every folder converted before (2: the tokenizer splits text as llama.cpp does).
CONVERSION_VERSION = 2


def cache_root() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hizli"
    )
    return Path(root)


def _key(gguf: Path) -> str:
    import transformers

    st = gguf.stat()
    # path + size + mtime identify the file without reading 100s of MB; the transformers major
    # version and hizli's conversion version are part of the key because the conversion belongs to them
    raw = (
        f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}|{transformers.__version__.split('.')[0]}"
        f"|v{CONVERSION_VERSION}"
    )
    return f"{gguf.stem[:60]}-{hashlib.sha256(raw.encode()).hexdigest()[:12]}"


def converted_folder(gguf: Path) -> Path:
    """Return a transformers folder (safetensors + tokenizer) equivalent to ``gguf``, converting once.

    The folder is written under a temporary name and renamed when complete, so an interrupted
    conversion is never mistaken for a finished one.
    """
    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    final = cache_root() / "gguf" / _key(gguf)
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _log.info(f"converting {gguf.name} to a cached transformers folder (once; later loads are fast)")
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        _convert(gguf, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log.info(f"cached at {final}")
    return final


@contextmanager
def _parse_once() -> Iterator[None]:
    """transformers parses the same GGUF file three times (tokenizer, config, weights; 4.3 s each
    for SmolLM2's 49k-token vocabulary on a 2-core CPU) and rebuilds the same tensor-name map once
    per tensor (397 times, 5.8 s). Both are pure functions of their arguments: remember them for the
    duration of one conversion (31 s -> 17 s measured). transformers imports both from ``gguf`` at
    call time, which is where they are swapped."""
    import functools

    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def cached_reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = reader(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = cached_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from hizli.models.gguf_tokenizer import PRE_KEY, apply_gguf_pre_tokenizer, read_gguf_string

    folder, name = str(gguf.parent), gguf.name
    with _parse_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if read_gguf_string(gguf, "tokenizer.ggml.model") == "gpt2":  # byte-level BPE: split as llama.cpp does
        apply_gguf_pre_tokenizer(tokenizer, read_gguf_string(gguf, PRE_KEY))
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = str(gguf)
    state = loaded.state_dict()
    del loaded
    fresh_config = AutoConfig.for_model(**config.to_dict())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(fresh_config, dtype=torch.float32)
    model.load_state_dict(state, assign=True)
    if getattr(fresh_config, "tie_word_embeddings", False):
        model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
