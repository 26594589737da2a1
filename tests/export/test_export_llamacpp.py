"""The exported GGUF file in llama.cpp itself (through llama-cpp-python). Marked ``llamacpp``: the
default run deselects it (CI has no llama.cpp); ``pytest -m llamacpp`` runs it where it is installed.

llama-cpp-python ships no wheels on PyPI; ``pip install llama-cpp-python`` builds llama.cpp from
source (several minutes on 2 cores). Where it is installed, this checks what only llama.cpp can:
that it accepts the file, tokenizes chat-templated text exactly as transformers does (vocabulary,
merges, pre-tokenizer and special tokens all agree), and answers coherently through the chat
template stored in the file.
"""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.llamacpp

FIBONACCI = "Continue the Fibonacci sequence: 1, 1, 2, 3, 5, 8,"


@pytest.fixture(scope="module")
def llama(request):
    try:
        import llama_cpp
    except Exception as e:  # not installed, or installed without its shared library
        pytest.skip(f"llama-cpp-python is not usable here ({type(e).__name__}: {e})")
    gguf_dir = request.getfixturevalue("gguf_dir")  # only once llama.cpp is known to be there
    return llama_cpp.Llama(model_path=str(gguf_dir / "smol-ft.Q8_0.gguf"), n_ctx=512, n_threads=1, seed=0,
                           verbose=False)


def test_llama_cpp_tokenizes_like_transformers(llama, chat, prompts):
    assert llama.metadata["tokenizer.ggml.pre"] == "smollm"
    for p in prompts + ("Numbers 12345 and   spaces\n\ttabs, émojis 🙂 and <|im_end|> inline",):
        text = chat.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                  tokenize=False)
        want = chat.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llama.tokenize(text.encode(), add_bos=False, special=True) == want, p


def test_llama_cpp_answers_the_fibonacci_prompt_coherently(llama, chat):
    result = llama.create_chat_completion(messages=[{"role": "user", "content": FIBONACCI}], temperature=0.0,
                                          max_tokens=64)
    answer = result["choices"][0]["message"]["content"]
    print(f"llama.cpp answer: {answer!r}")
    words = re.findall(r"[A-Za-z]+", answer)
    assert len(words) >= 12, answer
    assert sum(c.isascii() for c in answer) >= 0.95 * len(answer), answer
    # on topic: the numbers or the name of the sequence
    assert "Fibonacci" in answer or re.search(r"\b13\b.*\b21\b", answer), answer
    # it stopped at the template's end-of-turn token or ran to the limit, never leaking template tokens
    assert "<|im_start|>" not in answer and "<|im_end|>" not in answer
