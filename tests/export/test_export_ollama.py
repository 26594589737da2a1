"""The Modelfile's TEMPLATE renders, under Ollama's semantics, the prompt the tokenizer's chat template
renders: for every template hizli exports, user only, system + user, multi-turn, with the generation
prompt (a conversation ending in a user turn) and without it (ending in an assistant turn).

Ollama's side is ``ollama_sim`` (its message handling and Go-template subset); where Go is installed,
the same TEMPLATEs are also executed by Go's own text/template and must agree byte for byte.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from hizli.data.templates import registry, render
from hizli.export.ollama import ollama_modelfile, ollama_template

from ollama_sim import parse_modelfile  # tests/export (its conftest puts the folder on the path)
from ollama_sim import render as ollama_render

SYSTEM = "You are a terse assistant.\nAnswer in one line."
CONVERSATIONS = {
    "user only": [{"role": "user", "content": "What is 2 + 2?"}],
    "system + user": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": 'Name a "quoted" colour.'}],
    "multi-turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Count: 1, 2, ½, ③.\nThen stop."},
    ],
    "system multi-turn": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye 🙂"},
    ],
    "no generation prompt": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}],
    "system, no generation prompt": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
    ],
}


class StubTokenizer:
    """What ollama_template reads from a tokenizer: the template, BOS/EOS texts, whether BOS is added."""

    def __init__(self, chat_template: str, bos: str, eos: str, add_bos: bool):
        self.chat_template, self.bos_token, self.eos_token, self._add_bos = chat_template, bos, eos, add_bos
        self.bos_token_id = 1 if bos else None
        self.special_tokens_map = {"bos_token": bos, "eos_token": eos}

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if self._add_bos and self.bos_token_id else []) + [7]}

    def get_vocab(self):
        return {}


def expected_prompt(tokenizer, messages, **extra) -> str:
    """The tokenizer's render, less a leading BOS that llama.cpp/Ollama add as a token themselves."""

    def text(bos: str) -> str:
        return render(
            tokenizer.chat_template,
            messages,
            add_generation_prompt=messages[-1]["role"] != "assistant",
            bos_token=bos,
            eos_token=tokenizer.eos_token,
            **extra,
        )

    if tokenizer._add_bos and text("\x00").startswith("\x00"):  # the template writes BOS first
        return text(tokenizer.bos_token)[len(tokenizer.bos_token) :]
    return text(tokenizer.bos_token)


def _cases():
    for name, info in registry().items():
        for add_bos in (False, True):
            if add_bos and not info.tokens.get("bos"):
                continue
            yield pytest.param(name, add_bos, id=f"{name}{'-addbos' if add_bos else ''}")


@pytest.mark.parametrize("name,add_bos", list(_cases()))
def test_template_renders_like_the_chat_template(name, add_bos):
    info = registry()[name]
    tok = StubTokenizer(info.jinja(), info.tokens.get("bos", ""), info.tokens.get("eos", ""), add_bos)
    go, system, _ = ollama_template(tok)
    assert system == info.default_system
    for case, messages in CONVERSATIONS.items():
        assert ollama_render(go, messages, modelfile_system=system) == expected_prompt(tok, messages), case


def test_qwen3_thinking_history_and_think_off():
    info = registry()["qwen-3"]
    tok = StubTokenizer(info.jinja(), "", "<|im_end|>", False)
    go, _, _ = ollama_template(tok)
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Two and two."},
        {"role": "user", "content": "3+3?"},
    ]
    assert ollama_render(go, messages) == expected_prompt(tok, messages)
    assert ollama_render(go, messages, think=False) == expected_prompt(tok, messages, enable_thinking=False)
    assert "<think>\n\n</think>" in ollama_render(go, messages, think=False)


def test_modelfile_of_the_embedded_model(smol_tokenizer):
    """SmolLM2's own template (single-quoted default system message) and hizli's smollm2 and
    qwen-2.5 templates (double-quoted ``{%- set default_system = "..." -%}``) all get their SYSTEM line."""
    from hizli.data.templates import lookup

    own = parse_modelfile(ollama_modelfile("m.gguf", smol_tokenizer))
    assert own["SYSTEM"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert own["stop"] == ["<|im_end|>", "<|endoftext|>", "<|im_start|>"]
    for case, messages in CONVERSATIONS.items():
        want = render(
            smol_tokenizer.chat_template,
            messages,
            tokenizer=smol_tokenizer,
            add_generation_prompt=messages[-1]["role"] != "assistant",
        )
        assert ollama_render(own["TEMPLATE"], messages, modelfile_system=own["SYSTEM"]) == want, case
    saved = smol_tokenizer.chat_template
    try:
        for name in ("smollm2", "qwen-2.5"):
            smol_tokenizer.chat_template = lookup(name).jinja()
            text = ollama_modelfile("m.gguf", smol_tokenizer)
            assert parse_modelfile(text)["SYSTEM"] == lookup(name).default_system
            assert text.count('"""') == 4  # TEMPLATE and SYSTEM, each closed
    finally:
        smol_tokenizer.chat_template = saved


def test_system_message_is_rendered_once():
    info = registry()["chatml"]
    go, _, _ = ollama_template(StubTokenizer(info.jinja(), "", "<|im_end|>", False))
    prompt = ollama_render(go, CONVERSATIONS["system + user"])
    assert prompt.count(SYSTEM) == 1


def test_llama31_has_the_knowledge_date_preamble():
    info = registry()["llama-3.1"]
    go, _, _ = ollama_template(StubTokenizer(info.jinja(), "<|begin_of_text|>", "<|eot_id|>", True))
    prompt = ollama_render(go, CONVERSATIONS["user only"])
    assert prompt.startswith("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n")


def test_go_text_template_agrees_with_the_simulation(tmp_path):
    """Every TEMPLATE above, executed by Go's text/template (where Go is installed)."""
    go_bin = shutil.which("go")
    if go_bin is None:
        pytest.skip("Go is not installed (apt-get install golang-go)")
    cases, want = [], []
    for name, info in registry().items():
        for add_bos in (False, True):
            tok = StubTokenizer(info.jinja(), info.tokens.get("bos", ""), info.tokens.get("eos", ""), add_bos)
            go, system, _ = ollama_template(tok)
            for messages in CONVERSATIONS.values():
                cases.append({"template": go, "system": system or "", "messages": messages, "think": None})
                want.append(ollama_render(go, messages, modelfile_system=system))
    qwen3 = ollama_template(StubTokenizer(registry()["qwen-3"].jinja(), "", "<|im_end|>", False))[0]
    thinking = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "reasoning_content": "c"},
        {"role": "user", "content": "d"},
    ]
    for think in (None, False, True):
        cases.append({"template": qwen3, "system": "", "messages": thinking, "think": think})
        want.append(ollama_render(qwen3, thinking, think=think))
    main = Path(__file__).with_name("go_render") / "main.go"
    env = {
        "GOCACHE": str(tmp_path / "gocache"),
        "GOPATH": str(tmp_path / "gopath"),
        "GOFLAGS": "-mod=mod",
        "GO111MODULE": "off",
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
    }
    run = subprocess.run(
        [go_bin, "run", str(main)], input=json.dumps(cases), capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert len(got) == len(want)
    for case, g, w in zip(cases, got, want):
        assert g == w, (case["messages"], case["template"][:80])


def test_default_system_that_cannot_go_into_a_modelfile_is_explained():
    from hizli.data.templates import TemplateInfo

    info = registry()["chatml"]
    text = TemplateInfo(name="x", body=info.body, default_system='Say """hi""".').jinja()
    with pytest.raises(ValueError, match="cannot be written into a Modelfile.*modelfile=False"):
        ollama_template(StubTokenizer(text, "", "<|im_end|>", False))
