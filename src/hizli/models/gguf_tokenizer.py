"""The pre-tokenizer llama.cpp uses for a GGUF vocabulary, rebuilt on a transformers tokenizer.

A GGUF file names its pre-tokenizer in ``tokenizer.ggml.pre``; llama.cpp turns that name into a
list of split regexes, applied one after the other (each regex cuts every piece the previous one
left, keeping both the matches and the text between them), and then runs byte-level BPE on each
piece. transformers' GGUF conversion rebuilds only some of these (not ``smollm``, whose split puts
every digit, including Unicode numerals such as ``½ ² ① Ⅻ`` and Arabic-Indic digits, in a piece of
its own, nor ``default``). A tokenizer that splits differently trains on token ids that llama.cpp
never produces at inference, so hizli sets the split itself from the name.

The regexes per name follow llama.cpp's ``src/llama-vocab.cpp`` (``llm_tokenizer_bpe``), written
in the form the ``tokenizers`` library reads (``(?i:...)`` instead of spelled-out case pairs).
"""

from __future__ import annotations

import os

from hizli import _log

PRE_KEY = "tokenizer.ggml.pre"

# GPT-2's split (also what ByteLevel(use_regex=True) applies); llama.cpp's copy leaves out the last
# "|\s+" alternative, but text it does not match becomes a piece of its own anyway, which is the same.
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's fallback for the name "default" (and for a file without a name)
DEFAULT = (
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
)

# name in the file -> the kind of split llama.cpp applies (names from llama.cpp's name table)
KINDS = {
    "default": "default",
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "dbrx", "smaug-bpe"),
        "llama3",
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2"), "qwen2"),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), "digits"),
    **dict.fromkeys(("gpt-2", "phi-2", "jina-es", "jina-de", "mpt", "olmo", "jais", "exaone4"), "gpt2"),
}
# llama.cpp looks a whole piece up in the vocabulary before merging for these (``ignore_merges``)
IGNORE_MERGES = {"llama3"}


def pre_tokenizer_for(name: str | None):
    """The ``tokenizers`` pre-tokenizer that splits text as llama.cpp does for ``name``.

    Args:
        name: the file's ``tokenizer.ggml.pre`` (``None`` or empty: llama.cpp's ``default``).

    Returns:
        A ``tokenizers.pre_tokenizers.PreTokenizer``, or ``None`` for a name hizli has no split for.
    """
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    kind = KINDS.get(name or "default")
    if kind is None:
        return None
    if kind == "gpt2":
        return pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if kind == "digits":
        # every Unicode numeral on its own (Rust's is_numeric: Nd, Nl, No = \p{N}), then GPT-2's split;
        # the same two steps SmolLM2's and StarCoder's own tokenizer.json files list
        return pt.Sequence(
            [pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]
        )
    regexes = {"llama3": (LLAMA3,), "qwen2": (QWEN2,), "default": DEFAULT}[kind]
    splits = [pt.Split(Regex(r), behavior="isolated", invert=False) for r in regexes]
    return pt.Sequence([*splits, pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])


def apply_gguf_pre_tokenizer(tokenizer, name: str | None) -> bool:
    """Set ``tokenizer``'s pre-tokenizer (and BPE ``ignore_merges``) to llama.cpp's for ``name``.

    Args:
        tokenizer: a fast (byte-level BPE) transformers tokenizer built from a GGUF file; changed in place.
        name: the file's ``tokenizer.ggml.pre``.

    Returns:
        True when it was set; False (with a warning) for a name hizli does not know, which keeps the
        split transformers chose.
    """
    pre = pre_tokenizer_for(name)
    if pre is None:
        _log.warn_once(
            f"gguf-pre-{name}",
            f"{PRE_KEY}={name!r} is not a pre-tokenizer hizli rebuilds; keeping transformers' split, so some "
            "text (digits, punctuation runs) may be tokenized differently from llama.cpp",
        )
        return False
    backend = tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre
    if type(backend.model).__name__ == "BPE":
        backend.model.ignore_merges = KINDS[name or "default"] in IGNORE_MERGES
    return True


def pre_name_of(pre_tokenizer_json: dict) -> str | None:
    """The llama.cpp name whose split ``pre_tokenizer_json`` (a tokenizer.json ``pre_tokenizer``) is,
    when it is exactly one that ``pre_tokenizer_for`` builds: "default", "smollm", "llama-bpe",
    "qwen2" or "gpt-2"; otherwise None."""
    import json

    from tokenizers import Tokenizer, models

    for name in ("smollm", "llama-bpe", "qwen2", "gpt-2", "default"):
        probe = Tokenizer(models.BPE())
        probe.pre_tokenizer = pre_tokenizer_for(name)
        if json.loads(probe.to_str())["pre_tokenizer"] == pre_tokenizer_json:
            return name
    return None


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value types


def read_gguf_string(path: str | os.PathLike, key: str) -> str | None:
    """One string value from a GGUF file's metadata, reading only as far as that key.

    gguf.GGUFReader parses every field (about 5 s for a 49k-token vocabulary on a busy 2-core
    machine); the tokenizer keys we need come before the token arrays in llama.cpp's files.
    """
    import struct

    with open(path, "rb") as f:

        def read(fmt: str):
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) != size:
                raise ValueError(f"{path}: truncated GGUF header")
            return struct.unpack(fmt, data)

        def read_str() -> bytes:
            (n,) = read("<Q")
            return f.read(n)

        def skip(vtype: int) -> None:
            if vtype == 8:
                (n,) = read("<Q")
                f.seek(n, 1)
            elif vtype == 9:
                etype, count = read("<IQ")
                if etype in _SCALAR_SIZES:
                    f.seek(_SCALAR_SIZES[etype] * count, 1)
                else:
                    for _ in range(count):
                        skip(etype)
            else:
                f.seek(_SCALAR_SIZES[vtype], 1)

        magic, _version, _n_tensors, n_kv = read("<4sIQQ")
        if magic != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        for _ in range(n_kv):
            name = read_str().decode("utf-8", "replace")
            (vtype,) = read("<I")
            if name == key and vtype == 8:
                return read_str().decode("utf-8")
            skip(vtype)
    return None
