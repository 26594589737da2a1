"""An Ollama ``Modelfile`` beside an exported GGUF file: the chat template in Ollama's Go-template
form, the default system message and the stop tokens of the model's chat template.

Each TEMPLATE renders, under Ollama's semantics, the prompt the tokenizer's Jinja template renders
(what the model was trained on). Ollama (server/routes.go, server/prompt.go, template/template.go):

- adds the Modelfile's ``SYSTEM`` as a system message when the first message is not one;
- merges consecutive messages of the same role with a blank line, then passes every system message
  twice: joined as ``.System`` and in place inside ``.Messages``. So the templates print system
  messages from ``.Messages`` only (``.System`` just for DeepSeek, whose template joins them the
  same way);
- tokenizes the prompt adding BOS itself when the GGUF file says so (``tokenizer.ggml.add_bos_token``),
  so a TEMPLATE leaves out a leading BOS the chat template writes in that case;
- always generates after the prompt: a conversation ending in a user message gets the generation
  prompt, one ending in an assistant message renders as the chat template does without it.

Go templates have no ``trim``: where a Jinja template trims message contents (Llama 2/3, Gemma),
a content with leading or trailing whitespace renders with it under Ollama.
"""

from __future__ import annotations

import re

from hizli import _log

BOS, EOS, DEFAULT = "⟦bos⟧", "⟦eos⟧", "⟦default-system⟧"  # placeholders filled per tokenizer
# Per message: $last marks the final one; the generation prompt follows a final non-assistant message.
_EACH = "{{range $i, $_ := .Messages}}{{$last := eq (len (slice $.Messages $i)) 1}}"
_FIRST_SYSTEM = '{{if and (eq $i 0) (eq .Role "system")}}'


def _gen(prompt: str) -> str:
    return '{{if and $last (ne .Role "assistant")}}' + prompt + "{{end}}"


def _simple(open_: str, close: str, gen: str, bos: str = "") -> str:
    """A template that writes every message as open_ + content + close, roles named as they are."""
    return bos + _EACH + open_ + "{{.Content}}" + close + _gen(gen) + "{{end}}"


def _preamble(system_then: str, user: str, assistant: str, gen: str, bos: str = "") -> str:
    """A first system message (else the default one) written as system_then, then user/assistant turns."""
    return (
        bos
        + _EACH
        + _FIRST_SYSTEM
        + "{{.Content}}"
        + system_then
        + "{{else}}"
        + "{{if eq $i 0}}"
        + DEFAULT
        + system_then
        + "{{end}}"
        + '{{if eq .Role "user"}}'
        + user
        + '{{else if eq .Role "assistant"}}'
        + assistant
        + "{{end}}{{end}}"
        + _gen(gen)
        + "{{end}}"
    )


# Go templates per Jinja body in src/hizli/data/templates (key: the body's file name).
GO_TEMPLATES = {
    "chatml": _simple("<|im_start|>{{.Role}}\n", "<|im_end|>\n", "<|im_start|>assistant\n"),
    "qwen-3": (
        _EACH + '{{if and (eq .Role "assistant") .Thinking}}<|im_start|>assistant\n<think>\n{{.Thinking}}\n</think>\n\n'
        "{{.Content}}<|im_end|>\n{{else}}<|im_start|>{{.Role}}\n{{.Content}}<|im_end|>\n{{end}}"
        + _gen("<|im_start|>assistant\n{{if and $.IsThinkSet (not $.Think)}}<think>\n\n</think>\n\n{{end}}")
        + "{{end}}"
    ),
    "phi-3": _simple("<|{{.Role}}|>\n", "<|end|>\n", "<|assistant|>\n"),
    "phi-4": _simple("<|im_start|>{{.Role}}<|im_sep|>", "<|im_end|>", "<|im_start|>assistant<|im_sep|>"),
    "zephyr": _simple("<|{{.Role}}|>\n", EOS + "\n", "<|assistant|>\n"),
    "granite": _simple(
        "<|start_of_role|>{{.Role}}<|end_of_role|>", "<|end_of_text|>\n", "<|start_of_role|>assistant<|end_of_role|>"
    ),
    "llama-3": _simple(
        "<|start_header_id|>{{.Role}}<|end_header_id|>\n\n",
        "<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        bos=BOS,
    ),
    "llama-4": _simple(
        "<|header_start|>{{.Role}}<|header_end|>\n\n", "<|eot|>", "<|header_start|>assistant<|header_end|>\n\n", bos=BOS
    ),
    "llama-3.1": (
        BOS + "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n" + _EACH + _FIRST_SYSTEM + "{{.Content}}<|eot_id|>{{else}}"
        "{{if eq $i 0}}<|eot_id|>{{end}}"
        '{{if or (eq .Role "tool") (eq .Role "ipython")}}<|start_header_id|>ipython<|end_header_id|>\n\n'
        "{{.Content}}<|eot_id|>{{else}}<|start_header_id|>{{.Role}}<|end_header_id|>\n\n{{.Content}}<|eot_id|>"
        "{{end}}{{end}}" + _gen("<|start_header_id|>assistant<|end_header_id|>\n\n") + "{{end}}"
    ),
    "command-r": (
        BOS + _EACH + "<|START_OF_TURN_TOKEN|>"
        '{{if eq .Role "system"}}<|SYSTEM_TOKEN|>{{else if eq .Role "assistant"}}<|CHATBOT_TOKEN|>'
        "{{else}}<|USER_TOKEN|>{{end}}{{.Content}}<|END_OF_TURN_TOKEN|>"
        + _gen("<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>")
        + "{{end}}"
    ),
    "deepseek-v3": (
        BOS + "{{.System}}" + _EACH + '{{if eq .Role "user"}}<｜User｜>{{.Content}}'
        '{{else if eq .Role "assistant"}}<｜Assistant｜>{{.Content}}<｜end▁of▁sentence｜>{{end}}'
        + _gen("<｜Assistant｜>")
        + "{{end}}"
    ),
    "mistral-v7": (
        BOS + _EACH + '{{if eq .Role "system"}}[SYSTEM_PROMPT]{{.Content}}[/SYSTEM_PROMPT]'
        '{{else if eq .Role "user"}}[INST]{{.Content}}[/INST]{{else if eq .Role "assistant"}}{{.Content}}'
        + EOS
        + "{{end}}{{end}}"
    ),
    # a first system message goes into the first turn after it (when that is a user turn)
    "mistral": (
        BOS + '{{$sys := ""}}' + _EACH + _FIRST_SYSTEM + "{{$sys = .Content}}{{else}}"
        '{{if eq .Role "user"}}[INST] {{if $sys}}{{$sys}}\n\n{{end}}{{.Content}} [/INST]'
        '{{else if eq .Role "assistant"}}{{.Content}}' + EOS + '{{end}}{{$sys = ""}}{{end}}{{end}}'
    ),
    "llama-2": (
        '{{$sys := ""}}{{$out := false}}' + _EACH + _FIRST_SYSTEM + "{{$sys = .Content}}{{else}}"
        '{{if eq .Role "user"}}' + "⟦turn-bos⟧" + "[INST] {{if $sys}}<<SYS>>\n{{$sys}}\n<</SYS>>\n\n{{end}}"
        '{{.Content}} [/INST]{{else if eq .Role "assistant"}} {{.Content}} ' + EOS + "{{end}}"
        '{{$sys = ""}}{{$out = true}}{{end}}{{end}}'
    ),
    "gemma": (
        BOS + '{{$sys := ""}}{{$has := false}}' + _EACH + _FIRST_SYSTEM + "{{$sys = .Content}}{{$has = true}}"
        '{{else}}<start_of_turn>{{if eq .Role "assistant"}}model{{else}}{{.Role}}{{end}}\n'
        "{{if $has}}{{$sys}}\n\n{{end}}{{.Content}}<end_of_turn>\n{{$has = false}}{{end}}"
        + _gen("<start_of_turn>model\n")
        + "{{end}}"
    ),
    "alpaca": _preamble(
        "\n\n", "### Instruction:\n{{.Content}}\n\n", "### Response:\n{{.Content}}" + EOS + "\n\n", "### Response:\n"
    ),
    "vicuna": _preamble(" ", "USER: {{.Content}} ", "ASSISTANT: {{.Content}}" + EOS, "ASSISTANT:"),
    "unsloth": _preamble(
        "\n", ">>> User: {{.Content}}\n", ">>> Assistant: {{.Content}}" + EOS + "\n", ">>> Assistant: ", bos=BOS
    ),
}
# Chat formats recognised in a model's own template (not one of hizli's) by its marker tokens.
_FAMILIES = (
    ("<|im_start|>", "chatml"),
    ("Cutting Knowledge Date", "llama-3.1"),
    ("<|start_header_id|>", "llama-3"),
    ("<start_of_turn>", "gemma"),
    ("<|user|>", "phi-3"),
    ("[INST]", "mistral"),
)


def _body_name(template: str) -> tuple[str | None, object]:
    """(key of GO_TEMPLATES, registry entry) for the tokenizer's chat template; the entry is None
    for a model's own template, whose format is then recognised by its markers."""
    from hizli.data.templates import registry

    # ours, maybe after a key-mapping prelude: the entry whose own prelude (default system) starts the text
    ours = [
        info
        for info in registry().values()
        if template.endswith(info.body) and template.startswith(info.jinja()[: len(info.jinja()) - len(info.body)])
    ]
    if ours:
        info = max(ours, key=lambda i: len(i.jinja()) - len(i.body))
        body = next(n for n in GO_TEMPLATES if n in registry() and registry()[n].body == info.body)
        return body, info
    for marker, name in _FAMILIES:
        if marker in template:
            return name, None
    return None, None


def _own_default_system(template: str, tokenizer) -> str | None:
    """The system message a ChatML template writes when a conversation has none, read off its
    render of a user-only conversation (however the template spells or quotes it)."""
    from hizli.data.templates import render

    try:
        text = render(template, [{"role": "user", "content": "hi"}], tokenizer=tokenizer)
    except Exception:  # a template that needs other variables: no default to report
        return None
    head = "<|im_start|>system\n"
    if text.startswith(head) and "<|im_end|>" in text:
        return text[len(head) : text.index("<|im_end|>")]
    return None


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer (so the exported GGUF's ``add_bos_token``) adds BOS to an encoding."""
    bos = getattr(tokenizer, "bos_token_id", None)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(bos is not None and probe and probe[0] == bos)


def ollama_template(tokenizer) -> tuple[str, str | None, list[str]] | None:
    """(TEMPLATE, default SYSTEM or None, stop texts) for the tokenizer's chat template in Ollama's
    Go-template form, or None when hizli does not know its format."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    if not template:
        return None
    body, info = _body_name(template)
    if body is None:
        return None
    if body == "chatml":  # read off the render: also right for a prelude of the user's own
        system = _own_default_system(template, tokenizer)
    else:
        system = info.default_system if info is not None else None
    if "{{" in (system or "") or '"""' in (system or ""):
        raise ValueError(
            f"the default system message {system!r} cannot be written into a Modelfile "
            "(it holds '{{' or '\"\"\"'); change it with get_chat_template or pass modelfile=False"
        )
    bos_text = getattr(tokenizer, "bos_token", None) or ""
    eos_text = getattr(tokenizer, "eos_token", None) or ""
    auto_bos = adds_bos(tokenizer)
    go = GO_TEMPLATES[body]
    go = go.replace(BOS, "" if auto_bos else bos_text).replace(EOS, eos_text)
    go = go.replace("⟦turn-bos⟧", "{{if $out}}" + bos_text + "{{end}}" if auto_bos else bos_text)
    go = go.replace(DEFAULT, system or "")
    return go, system, _stops(tokenizer, info, body)


def _stops(tokenizer, info, body: str) -> list[str]:
    from hizli.data.templates import lookup

    entry = info or lookup(body)
    vocab = tokenizer.get_vocab()
    texts = [entry.eot(tokenizer), *entry.stop]
    for part in (entry.instruction_part or "", entry.response_part or ""):  # a turn marker means the answer ended
        texts += re.findall(r"<[^<>\s]+>", part)
    return [t for t in dict.fromkeys(texts) if t and t in vocab]


def ollama_modelfile(gguf_name: str, tokenizer) -> str:
    """An Ollama Modelfile for ``gguf_name`` beside it: FROM, TEMPLATE, default SYSTEM, stop tokens."""
    lines = ["# Ollama: ollama create my-model -f Modelfile && ollama run my-model", f"FROM ./{gguf_name}", ""]
    found = ollama_template(tokenizer)
    if found is None:
        _log.warn_once(
            "ollama-template",
            "hizli does not know how to write this chat template in Ollama's format; the Modelfile has no "
            "TEMPLATE, so add one before `ollama create` (llama.cpp and LM Studio read the template from the GGUF)",
        )
        lines.append("# TEMPLATE: hizli could not translate this model's chat template; add one here")
        return "\n".join(lines) + "\n"
    go, system, stops = found
    lines.append(f'TEMPLATE """{go}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"
