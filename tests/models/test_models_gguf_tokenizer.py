"""A tokenizer hizli builds from a GGUF file splits text as llama.cpp does for the file's
``tokenizer.ggml.pre``, so training sees the token ids llama.cpp produces at inference.

The oracle below is llama.cpp's procedure written out independently: its regex list per name
(copied in llama.cpp's own spelling, with case pairs instead of ``(?i:)``), each regex cutting every
piece the previous ones left, matches and the text between them both kept.
"""

from __future__ import annotations

import json

import pytest

from hizli.models import gguf_cache, gguf_tokenizer
from tokenizer_corpus import PROBES, llama3_gguf, mixed_corpus

_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA_CPP_REGEXES = {
    "gpt-2": [_GPT2],
    "smollm": [r"\p{N}", _GPT2],
    "llama-bpe": [
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"
    ],
    "qwen2": [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
}


def llama_cpp_pieces(text: str, regexes: list[str]) -> list[str]:
    import regex

    pieces = [text] if text else []
    for pattern in regexes:
        compiled, out = regex.compile(pattern), []
        for piece in pieces:
            at = 0
            for m in compiled.finditer(piece):
                if m.start() > at:
                    out.append(piece[at : m.start()])
                out.append(m.group())
                at = m.end()
            if at < len(piece):
                out.append(piece[at:])
        pieces = out
    return pieces


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte -> printable character table, inverted (printable bytes map to themselves,
    the other 68 to U+0100 onwards in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def hizli_pieces(text: str, pre) -> list[str]:
    unbyte = _byte_alphabet()
    return [bytes(unbyte[c] for c in piece).decode("utf-8") for piece, _ in pre.pre_tokenize_str(text)]


@pytest.mark.parametrize("name", list(LLAMA_CPP_REGEXES))
def test_split_is_llama_cpps_on_the_mixed_corpus(name):
    pre = gguf_tokenizer.pre_tokenizer_for(name)
    corpus = mixed_corpus()
    assert len(corpus) >= 1000
    wrong = [t for t in corpus if hizli_pieces(t, pre) != llama_cpp_pieces(t, LLAMA_CPP_REGEXES[name])]
    assert wrong == [], f"{len(wrong)} texts split differently, first: {wrong[0]!r}"


def test_names_llama_cpp_knows_and_unknown_names():
    assert gguf_tokenizer.KINDS["llama-bpe"] == gguf_tokenizer.KINDS["llama3"] == "llama3"
    assert gguf_tokenizer.KINDS["smollm"] == gguf_tokenizer.KINDS["starcoder"] == "digits"
    assert gguf_tokenizer.pre_tokenizer_for(None) is not None  # no name: llama.cpp's default
    assert gguf_tokenizer.pre_tokenizer_for("no-such-pre") is None


def test_embedded_gguf_tokenizer_splits_every_numeral(smol_tokenizer):
    """The embedded SmolLM2 file says ``smollm``: every Unicode numeral is a piece of its own."""
    pre_json = json.loads(smol_tokenizer.backend_tokenizer.to_str())["pre_tokenizer"]
    assert gguf_tokenizer.pre_name_of(pre_json) == "smollm"
    pre = smol_tokenizer.backend_tokenizer.pre_tokenizer
    for text in PROBES[:3]:
        assert hizli_pieces(text, pre) == llama_cpp_pieces(text, LLAMA_CPP_REGEXES["smollm"])
    ids = smol_tokenizer("x½²①Ⅻ٣4", add_special_tokens=False)["input_ids"]
    assert smol_tokenizer.decode(ids) == "x½²①Ⅻ٣4"
    # each numeral is tokenized alone: the ids are those of the characters tokenized one by one
    alone = [i for c in "x½²①Ⅻ٣4" for i in smol_tokenizer(c, add_special_tokens=False)["input_ids"]]
    assert ids == alone


def test_old_conversions_are_not_reused(tmp_path, monkeypatch):
    """A folder converted before the tokenizer fix has another key, so it is converted again."""
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    now = gguf_cache._key(f)
    monkeypatch.setattr(gguf_cache, "CONVERSION_VERSION", gguf_cache.CONVERSION_VERSION - 1)
    assert gguf_cache._key(f) != now


@pytest.mark.slow  # the 128k-token vocabulary: export, then transformers' GGUF conversion (minutes on 2 cores)
def test_llama3_gguf_tokenizer_is_the_original(tmp_path, monkeypatch):
    """A Llama 3 GGUF (``llama-bpe``) loaded by hizli tokenizes the corpus exactly as the tokenizer.json
    it was exported from (whose split llama.cpp's llama-bpe regex reproduces)."""
    from hizli.models.loader import load_tokenizer, resolve_source

    path, original = llama3_gguf(tmp_path)
    monkeypatch.setenv("HIZLI_CACHE", str(tmp_path / "cache"))
    from_gguf = load_tokenizer(resolve_source(str(path)).path)
    pre_json = json.loads(from_gguf.backend_tokenizer.to_str())["pre_tokenizer"]
    assert gguf_tokenizer.pre_name_of(pre_json) == "llama-bpe"
    bad = [
        t
        for t in mixed_corpus()
        if from_gguf(t, add_special_tokens=False)["input_ids"] != original(t, add_special_tokens=False)["input_ids"]
    ]
    assert bad == [], f"{len(bad)} texts differ, first: {bad[0]!r}"
