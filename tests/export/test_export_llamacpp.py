"""Exported GGUF files in llama.cpp itself (through llama-cpp-python). Marked ``llamacpp``: the default
run deselects it; ``pytest -m llamacpp tests/export`` runs it where ``llama_cpp`` is importable. It
builds nothing: without llama-cpp-python every test here skips.

llama-cpp-python ships no wheels on PyPI; ``pip install llama-cpp-python`` builds llama.cpp from
source (about half an hour on 2 cores). Where it is installed, this checks what only llama.cpp can:

- tokenization: token ids identical to the tokenizer hizli builds from the same GGUF file, on a
  mixed corpus (every turn of the packaged ShareGPT sample, 1,137 strings, plus Unicode numerals,
  emoji, code and whitespace probes), for the embedded SmolLM2 file (``smollm`` pre-tokenizer) and
  for a GGUF exported by hizli with Llama 3's tokenizer (``llama-bpe``);
- the chat template stored in the file renders, through llama-cpp-python's Jinja formatter, exactly
  what the tokenizer renders;
- greedy answers of the f16 export identical to the fp32 adapter model's on 3 chat prompts
  (32 tokens), and its teacher-forced logits within the f16 bounds of test_export_gguf.py.
"""

from __future__ import annotations

import importlib.util
import re

import pytest

from tokenizer_corpus import llama3_gguf as make_llama3_gguf
from tokenizer_corpus import mixed_corpus

pytestmark = pytest.mark.llamacpp
if importlib.util.find_spec("llama_cpp") is None:  # before any (session-scoped) export fixture is built
    pytest.skip("llama-cpp-python is not installed", allow_module_level=True)

FIBONACCI = "Continue the Fibonacci sequence: 1, 1, 2, 3, 5, 8,"
CONVERSATIONS = (
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Count: 1, 2, ½, ③."},
    ],
)


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except Exception as e:  # not installed, or installed without its shared library
        pytest.skip(f"llama-cpp-python is not usable here ({type(e).__name__}: {e})")
    # Plain CPU buffers only: on a CPU with AMX-INT8, llama.cpp's extra buffer types (AMX, repacked
    # weights) crash in decode on quantized files (the packaged Q4_1 one too), and these tests check
    # the files, not llama.cpp's fastest kernels
    default_params = llama_cpp.llama_model_default_params

    def plain_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    with pytest.MonkeyPatch.context() as mp:
        if hasattr(default_params(), "use_extra_bufts"):
            mp.setattr(llama_cpp.llama_cpp, "llama_model_default_params", plain_buffers)
        yield llama_cpp


def _vocab(llama_cpp, path):
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def _mismatches(vocab, tokenizer, corpus):
    bad = []
    for text in corpus:
        want = tokenizer(text, add_special_tokens=False)["input_ids"]
        got = vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if got != want:
            bad.append(text)
    return bad


def test_embedded_gguf_tokenizes_the_corpus_like_hizli(llama_cpp, smol_tokenizer):
    from hizli.models.embedded import embedded_path

    vocab = _vocab(llama_cpp, embedded_path("smollm2-135m-instruct"))
    assert vocab.metadata["tokenizer.ggml.pre"] == "smollm"
    corpus = mixed_corpus()
    bad = _mismatches(vocab, smol_tokenizer, corpus)
    print(f"embedded SmolLM2 GGUF: {len(corpus) - len(bad)}/{len(corpus)} strings tokenized identically")
    assert bad == [], f"{len(bad)} differ, first: {bad[0]!r}"


@pytest.fixture(scope="module")
def llama3_gguf(tmp_path_factory, llama_cpp):
    """(f16 GGUF with Llama 3's tokenizer exported by hizli, that tokenizer)."""
    return make_llama3_gguf(tmp_path_factory.mktemp("llama3"))


def test_llama3_gguf_tokenizes_the_corpus_like_the_tokenizer_and_hizli(llama_cpp, llama3_gguf, tmp_path, monkeypatch):
    from hizli.models.loader import load_tokenizer, resolve_source

    path, original = llama3_gguf
    vocab = _vocab(llama_cpp, path)
    assert vocab.metadata["tokenizer.ggml.pre"] == "llama-bpe"
    monkeypatch.setenv("HIZLI_CACHE", str(tmp_path))
    from_gguf = load_tokenizer(resolve_source(str(path)).path)  # what hizli trains with, given this file
    corpus = mixed_corpus()
    for name, tokenizer in (("the exported tokenizer", original), ("hizli's tokenizer from the GGUF", from_gguf)):
        bad = _mismatches(vocab, tokenizer, corpus)
        print(f"Llama 3 GGUF vs {name}: {len(corpus) - len(bad)}/{len(corpus)} strings tokenized identically")
        assert bad == [], f"{name}: {len(bad)} differ, first: {bad[0]!r}"


def _formatter_prompt(llama_cpp, template, bos, eos, messages):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, add_generation_prompt=True)
    return formatter(messages=messages).prompt


def test_stored_chat_template_renders_like_the_tokenizer(llama_cpp, gguf_dir, chat, llama3_gguf):
    import gguf

    cases = [(gguf_dir / "smol-ft.F16.gguf", chat.tokenizer), llama3_gguf]
    for path, tokenizer in cases:
        reader = gguf.GGUFReader(str(path))
        stored = reader.fields["tokenizer.chat_template"].contents()
        assert stored == tokenizer.chat_template
        for messages in CONVERSATIONS:
            want = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            got = _formatter_prompt(llama_cpp, stored, tokenizer.bos_token, tokenizer.eos_token, messages)
            assert got == want, (path.name, messages)


@pytest.fixture(scope="module")
def f16_llama(llama_cpp, gguf_dir):
    return llama_cpp.Llama(
        model_path=str(gguf_dir / "smol-ft.F16.gguf"), n_ctx=512, n_threads=1, seed=0, logits_all=True, verbose=False
    )


def _llama_logits(llama, ids):
    import numpy as np
    import torch

    llama.reset()
    llama.eval(ids)
    return torch.from_numpy(np.array(llama.scores[: len(ids)], dtype=np.float64))


def _llama_greedy(llama, ids, eos_ids, n=32):
    seq, out = list(ids), []
    for _ in range(n):
        token = int(_llama_logits(llama, seq)[-1].argmax())
        out.append(token)
        if token in eos_ids:
            break
        seq.append(token)
    return out


def test_f16_greedy_answers_and_logits_match_transformers(f16_llama, adapter_model, chat, prompts):
    import torch

    model, tokenizer = adapter_model
    eos_ids = {tokenizer.eos_token_id}
    for p in prompts[:3]:
        want = chat.greedy(model, p)
        got = _llama_greedy(f16_llama, chat.ids(p)[0].tolist(), eos_ids)
        print(f"llama.cpp f16 greedy: {tokenizer.decode(got)!r}")
        assert got == want, p
    rel, agree, total, worst = 0.0, 0, 0, 0.0
    for p in prompts:
        seq = torch.cat([chat.ids(p), torch.tensor([chat.greedy(model, p)])], dim=1)
        with torch.no_grad():
            ref = model(input_ids=seq).logits[0].double()
        got = _llama_logits(f16_llama, seq[0].tolist())
        diff = (got - ref).abs()
        rel = max(rel, (diff.amax(-1) / ref.abs().amax(-1)).max().item())
        worst = max(worst, diff.max().item())
        agree += (got.argmax(-1) == ref.argmax(-1)).sum().item()
        total += seq.shape[1]
    print(
        f"llama.cpp f16 vs fp32 adapter model, teacher-forced over {total} positions: max |diff| {worst:.3f}, "
        f"largest diff / max |logit| {rel:.4f}, top-1 {agree / total:.2%}"
    )
    assert rel <= 0.02 and agree / total >= 0.99


def test_llama_cpp_answers_the_fibonacci_prompt_coherently(llama_cpp, gguf_dir):
    llama = llama_cpp.Llama(
        model_path=str(gguf_dir / "smol-ft.Q8_0.gguf"), n_ctx=512, n_threads=1, seed=0, verbose=False
    )
    result = llama.create_chat_completion(
        messages=[{"role": "user", "content": FIBONACCI}], temperature=0.0, max_tokens=64
    )
    answer = result["choices"][0]["message"]["content"]
    print(f"llama.cpp answer: {answer!r}")
    words = re.findall(r"[A-Za-z]+", answer)
    assert len(words) >= 12, answer
    assert sum(c.isascii() for c in answer) >= 0.95 * len(answer), answer
    assert "Fibonacci" in answer or re.search(r"\b13\b.*\b21\b", answer), answer
    assert "<|im_start|>" not in answer and "<|im_end|>" not in answer
