"""The tokenizer inside a GGUF file: byte-level BPE tokens, merges, token types, special token ids,
the chat template, and the pre-tokenizer name that selects llama.cpp's split regex (learned from
llama.cpp's src/llama-vocab.cpp and its converter; the code is ours)."""

from __future__ import annotations

import json
from pathlib import Path

from hizli import _log
from hizli.models.gguf_tokenizer import pre_name_of, read_gguf_string  # noqa: F401  (read_gguf_string: re-exported)


def _pre_tokenizer_name(tok_json: dict, model) -> str:
    """The llama.cpp pre-tokenizer name, which selects its regex split before BPE.

    A model hizli loaded from a GGUF file keeps that file's name. Otherwise it is read off the
    tokenizer.json pre-tokenizer: the Llama 3 and Qwen2 split regexes, digits-then-byte-level
    (SmolLM/StarCoder) and plain GPT-2 byte-level are recognised; anything else gets "default"
    with a warning, since llama.cpp may then split some text differently from transformers.
    """
    source = _gguf_source(model)
    if source is not None:
        name = read_gguf_string(source, "tokenizer.ggml.pre")
        if name:
            return name
    pre = tok_json.get("pre_tokenizer") or {}
    built = pre_name_of(pre)  # one hizli built from a GGUF name (models/gguf_tokenizer.py)
    if built is not None:
        return built
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    patterns = [p.get("pattern", {}).get("Regex", "") for p in parts if p.get("type") == "Split"]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if patterns and kinds[-1] == "ByteLevel":
        p = patterns[0]
        if r"\p{N}{1,3}" in p and r"[^\r\n\p{L}\p{N}]?\p{L}+" in p:
            return "llama-bpe"
        if r"|\p{N}|" in p and r"[^\r\n\p{L}\p{N}]?\p{L}+" in p:
            return "qwen2"
    _log.warn_once(
        "gguf-pre",
        f"the tokenizer's pre-tokenizer ({kinds}) is not one hizli maps to a llama.cpp name; writing "
        "'default', so llama.cpp may split some text differently from transformers",
    )
    return "default"


def _gguf_source(model) -> Path | None:
    """The .gguf file the base model was loaded from, if hizli loaded it from one."""
    from hizli.export.merge import unwrap
    from hizli.models.record import load_info

    info = load_info(model) or load_info(unwrap(model))
    if info is None:
        return None
    if info.kind == "gguf" and str(info.source).lower().endswith(".gguf"):
        return Path(info.source) if Path(info.source).is_file() else None
    if info.kind == "embedded":
        from hizli.models.embedded import embedded_path

        try:
            return embedded_path(info.source)
        except FileNotFoundError:
            return None
    return None


def tokenizer_metadata(tokenizer, model) -> dict:
    """Vocabulary, merges, token types, special ids and chat template for the GGUF metadata."""
    import gguf

    from hizli.export.merge import unwrap

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            "GGUF export needs a fast (tokenizers-backed) tokenizer; load it with AutoTokenizer "
            "(use_fast=True) or FastLanguageModel.from_pretrained"
        )
    tok_json = json.loads(backend.to_str())
    bpe = tok_json.get("model", {})
    if bpe.get("type") != "BPE" or bpe.get("byte_fallback"):
        raise ValueError(
            f"GGUF export supports byte-level BPE tokenizers (Llama 3, SmolLM, Qwen, GPT-2 style); this one "
            f"is {bpe.get('type')}{' with byte fallback (SentencePiece style)' if bpe.get('byte_fallback') else ''}. "
            "Save with save_pretrained_merged and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    config = unwrap(model).config
    vocab = tokenizer.get_vocab()
    n_vocab = max(int(config.vocab_size), max(vocab.values()) + 1)
    if n_vocab > int(config.vocab_size):
        raise ValueError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {config.vocab_size}; "
            "resize the model's embeddings (model.resize_token_embeddings(len(tokenizer))) before exporting"
        )
    by_id = {i: t for t, i in vocab.items()}
    added = {int(i): tok for i, tok in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    T = gguf.TokenType
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")  # embedding rows with no token, as llama.cpp's converter writes them
            types.append(T.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(T.CONTROL if added[i].special else T.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(T.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    return {
        "pre": _pre_tokenizer_name(tok_json, model),
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "bos": bos,
        "eos": eos,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
        "add_bos": bool(bos is not None and probe and probe[0] == bos),
        "add_eos": bool(eos is not None and probe and probe[-1] == eos and len(probe) > 1),
        "chat_template": template,
    }


def add_tokenizer(writer, vocab: dict) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types([int(t) for t in vocab["types"]])
    writer.add_token_merges(vocab["merges"])
    for key, adder in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        if vocab[key] is not None:
            adder(int(vocab[key]))
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
    if vocab["chat_template"]:
        writer.add_chat_template(vocab["chat_template"])
    else:
        _log.warn_once("gguf-no-template", "the tokenizer has no chat template; the GGUF file has none either")
