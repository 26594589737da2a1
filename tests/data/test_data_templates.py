"""Chat templates: golden renders (the spec), Meta's llama-3.1 format byte for byte, the registry."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hizli.data.templates import (
    SAMPLE_CONVERSATION,
    get_chat_template,
    lookup,
    registry,
    render,
    stop_token_ids,
    template_info,
)

THREE_TURNS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
]
PROMPT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]

# Each template's exact output, written from the model's published format (the spec; rendered
# with the family's own BOS/EOS from the registry's `tokens`).
GOLDEN_3TURN = {
    "llama-3.1": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>"
        "assistant<|end_header_id|>\n\n4.<|eot_id|>"
    ),
    "llama-3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>"
        "assistant<|end_header_id|>\n\n4.<|eot_id|>"
    ),
    "llama-4": (
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\nYou are terse.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nWhat is 2+2?<|eot|><|header_start|>"
        "assistant<|header_end|>\n\n4.<|eot|>"
    ),
    "llama-2": "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4. </s>",
    "chatml": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4.<|im_end|>\n"
    ),
    "qwen-2": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4.<|im_end|>\n"
    ),
    "qwen-2.5": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4.<|im_end|>\n"
    ),
    "qwen-3": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4.<|im_end|>\n"
    ),
    "smollm2": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4.<|im_end|>\n"
    ),
    "mistral": "<s>[INST] You are terse.\n\nWhat is 2+2? [/INST]4.</s>",
    "mistral-v7": "<s>[SYSTEM_PROMPT]You are terse.[/SYSTEM_PROMPT][INST]What is 2+2?[/INST]4.</s>",
    "zephyr": "<|system|>\nYou are terse.</s>\n<|user|>\nWhat is 2+2?</s>\n<|assistant|>\n4.</s>\n",
    "alpaca": "You are terse.\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\n4.</s>\n\n",
    "vicuna": "You are terse. USER: What is 2+2? ASSISTANT: 4.</s>",
    "gemma": (
        "<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4.<end_of_turn>\n"
    ),
    "phi-3": ("<|system|>\nYou are terse.<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n4.<|end|>\n"),
    "phi-4": (
        "<|im_start|>system<|im_sep|>You are terse.<|im_end|><|im_start|>user<|im_sep|>"
        "What is 2+2?<|im_end|><|im_start|>assistant<|im_sep|>4.<|im_end|>"
    ),
    "deepseek-v3": "<｜begin▁of▁sentence｜>You are terse.<｜User｜>What is 2+2?<｜Assistant｜>4.<｜end▁of▁sentence｜>",
    "granite": (
        "<|start_of_role|>system<|end_of_role|>You are terse.<|end_of_text|>\n<|start_of_role|>"
        "user<|end_of_role|>What is 2+2?<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"
        "4.<|end_of_text|>\n"
    ),
    "command-r": (
        "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are terse.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>What is 2+2?<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>4.<|END_OF_TURN_TOKEN|>"
    ),
    "unsloth": ("<|begin_of_text|>You are terse.\n>>> User: What is 2+2?\n>>> Assistant: 4.<|end_of_text|>\n"),
}

GOLDEN_PROMPT = {
    "llama-3.1": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>"
        "assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Bye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "llama-3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>"
        "user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "llama-4": (
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\nHi<|eot|><|header_start|>"
        "assistant<|header_end|>\n\nHello!<|eot|><|header_start|>user<|header_end|>\n\nBye<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n"
    ),
    "llama-2": "<s>[INST] Hi [/INST] Hello! </s><s>[INST] Bye [/INST]",
    "chatml": (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>"
        "user\nBye<|im_end|>\n<|im_start|>assistant\n"
    ),
    "qwen-2": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>"
        "\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>"
        "assistant\n"
    ),
    "qwen-2.5": (
        "<|im_start|>system\n"
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>"
        "user\nBye<|im_end|>\n<|im_start|>assistant\n"
    ),
    "qwen-3": (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>"
        "user\nBye<|im_end|>\n<|im_start|>assistant\n"
    ),
    "smollm2": (
        "<|im_start|>system\n"
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>"
        "user\nBye<|im_end|>\n<|im_start|>assistant\n"
    ),
    "mistral": "<s>[INST] Hi [/INST]Hello!</s>[INST] Bye [/INST]",
    "mistral-v7": "<s>[INST]Hi[/INST]Hello!</s>[INST]Bye[/INST]",
    "zephyr": "<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\nBye</s>\n<|assistant|>\n",
    "alpaca": (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n"
        "\n### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n### Instruction:\nBye\n\n"
        "### Response:\n"
    ),
    "vicuna": (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: Hi ASSISTANT: Hello!</s>"
        "USER: Bye ASSISTANT:"
    ),
    "gemma": (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    ),
    "phi-3": "<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\nBye<|end|>\n<|assistant|>\n",
    "phi-4": (
        "<|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant<|im_sep|>Hello!<|im_end|>"
        "<|im_start|>user<|im_sep|>Bye<|im_end|><|im_start|>assistant<|im_sep|>"
    ),
    "deepseek-v3": (
        "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜><｜User｜>Bye<｜Assistant｜>"
    ),
    "granite": (
        "<|start_of_role|>user<|end_of_role|>Hi<|end_of_text|>\n<|start_of_role|>"
        "assistant<|end_of_role|>Hello!<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>"
        "Bye<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"
    ),
    "command-r": (
        "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hello!<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>"
        "<|USER_TOKEN|>Bye<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
    ),
    "unsloth": (
        "<|begin_of_text|>You are a helpful assistant to the user\n>>> User: Hi\n>>>"
        " Assistant: Hello!<|end_of_text|>\n>>> User: Bye\n>>> Assistant: "
    ),
}

LLAMA31_HI = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
)


def test_registry_has_at_least_20_templates_and_every_one_has_a_golden():
    assert len(registry()) >= 20
    assert set(registry()) == set(GOLDEN_3TURN) == set(GOLDEN_PROMPT)


@pytest.mark.parametrize("name", sorted(GOLDEN_3TURN))
def test_golden_three_turns(name):
    assert render(lookup(name), THREE_TURNS) == GOLDEN_3TURN[name]


@pytest.mark.parametrize("name", sorted(GOLDEN_PROMPT))
def test_golden_generation_prompt(name):
    assert render(lookup(name), PROMPT, add_generation_prompt=True) == GOLDEN_PROMPT[name]


def test_llama31_hi_hello_is_metas_format_byte_for_byte(llama31):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert llama31.apply_chat_template(messages, tokenize=False) == LLAMA31_HI


def test_llama31_user_system_message_follows_the_date_lines(llama31):
    messages = [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": "Hi"}]
    text = llama31.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
        "December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user"
        "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def metas_llama31(messages, add_generation_prompt=False, date="26 Jul 2024"):
    """Meta's published Llama 3.1 rules for plain conversations, restated in Python."""
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"].strip(), messages[1:]
    out = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        f"Today Date: {date}\n\n{system}<|eot_id|>"
    )
    for m in messages:
        out += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
    if add_generation_prompt:
        out += "<|start_header_id|>assistant<|end_header_id|>\n\n"
    return out


_text = st.lists(st.sampled_from(list("ab \n\t.!?é漢") + ["<|eot_id|>", "{{", "%}"]), max_size=12).map("".join)


@settings(max_examples=60, deadline=None)
@given(system=st.one_of(st.none(), _text), turns=st.lists(_text, min_size=1, max_size=5), gen=st.booleans())
def test_llama31_matches_metas_rules_on_any_plain_conversation(system, turns, gen):
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    assert render(lookup("llama-3.1"), messages, add_generation_prompt=gen) == metas_llama31(messages, gen)


def test_llama31_date_can_be_set_like_metas_template(llama31):
    text = llama31.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, date_string="01 Jan 2025")
    assert "Today Date: 01 Jan 2025\n\n" in text


@pytest.mark.parametrize("alias", ["llama-3.2", "llama-3.3", "llama-31", "LLAMA_3.2"])
def test_llama31_aliases(alias):
    assert lookup(alias).name == "llama-3.1"


def test_every_alias_resolves_to_its_template():
    for info in registry().values():
        for alias in info.aliases:
            assert lookup(alias) is info


def test_unknown_template_names_the_nearest_valid_ones():
    with pytest.raises(ValueError, match=r"'llama-3\.1'") as e:
        lookup("llama-3.1x")
    assert "hizli templates" in str(e.value)
    with pytest.raises(ValueError, match="chatml"):
        lookup("chatmll")


def test_tokenizer_render_equals_registry_render(smol_tok):
    """What a tokenizer's apply_chat_template gives is what hizli renders for labels."""
    for name in registry():
        tok = get_chat_template(smol_tok, name, map_eos_token=False, warn=False)
        expected = render(lookup(name), SAMPLE_CONVERSATION, add_generation_prompt=True, tokenizer=tok)
        assert tok.apply_chat_template(SAMPLE_CONVERSATION, tokenize=False, add_generation_prompt=True) == expected


def test_smollm2_template_is_the_models_own(smol_tok):
    cases = [(m, gen) for m in (PROMPT, THREE_TURNS, SAMPLE_CONVERSATION) for gen in (False, True)]
    own = [smol_tok.apply_chat_template(m, tokenize=False, add_generation_prompt=gen) for m, gen in cases]
    get_chat_template(smol_tok, "smollm2")
    assert [smol_tok.apply_chat_template(m, tokenize=False, add_generation_prompt=gen) for m, gen in cases] == own


def test_mapping_renders_sharegpt_rows_without_conversion(smol_tok):
    mapping = {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}
    tok = get_chat_template(smol_tok, "chatml", mapping=mapping)
    sharegpt = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Bye"}]
    expected = render(lookup("chatml"), PROMPT, add_generation_prompt=True)
    assert tok.apply_chat_template(sharegpt, tokenize=False, add_generation_prompt=True) == expected
    assert tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True) == expected  # still fine
    assert template_info(tok).name == "chatml"


def test_eos_becomes_the_end_of_turn_token(llama_tok, smol_tok):
    tok = llama_tok
    tok.eos_token = "<|end_of_text|>"  # a base model's EOS
    get_chat_template(tok, "llama-3.1")
    assert tok.eos_token == "<|eot_id|>"
    assert set(stop_token_ids(tok)) >= {
        tok.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
    }
    tok.eos_token = "<|end_of_text|>"
    get_chat_template(tok, "llama-3.1", map_eos_token=False)
    assert tok.eos_token == "<|end_of_text|>"
    # a template whose end token is not in the vocabulary leaves EOS alone
    eos = smol_tok.eos_token
    assert get_chat_template(smol_tok, "gemma", warn=False).eos_token == eos


def test_template_is_recognised_after_save_and_reload(tmp_path, smol_tok):
    from transformers import AutoTokenizer

    assert template_info(smol_tok).response_part == "<|im_start|>assistant\n"  # the model's own ChatML
    get_chat_template(smol_tok, "phi-4", warn=False).save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert template_info(again).name == "phi-4"
    for name in registry():  # every template is recognised from its text alone (shared bodies too)
        get_chat_template(smol_tok, name, map_eos_token=False, warn=False)
        assert template_info(smol_tok).name == name


def _hizli(*args):
    return subprocess.run([sys.executable, "-m", "hizli.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_lists_templates_with_aliases():
    out = _hizli("templates")
    assert out.returncode == 0, out.stderr
    for name in registry():
        assert name in out.stdout
    assert "llama-3.2" in out.stdout


def test_cli_renders_a_template_and_rejects_unknown_names():
    out = _hizli("templates", "llama-3.2")
    assert out.returncode == 0, out.stderr
    assert "Cutting Knowledge Date: December 2023" in out.stdout and "And of Italy?<|eot_id|>" in out.stdout
    bad = _hizli("templates", "lama-3.1")
    assert bad.returncode != 0 and "llama-3.1" in bad.stderr
