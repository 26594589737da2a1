"""An Ollama ``Modelfile`` beside an exported GGUF file: the chat template in Ollama's Go-template
form, the default system message and the stop tokens of the model's chat template."""

from __future__ import annotations

import re

from hizli import _log


# Ollama's Go-template equivalents of common chat templates (Ollama >= 0.3 ``.Messages`` form).
_OLLAMA = {
    "chatml": (
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n",
        ["<|im_end|>", "<|im_start|>"],
    ),
    "llama3": (
        "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
    ),
    "gemma": (
        "{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n"
        "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
        ["<end_of_turn>", "<start_of_turn>"],
    ),
    "phi3": (
        "{{- if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}"
        "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
        ["<|end|>", "<|user|>", "<|assistant|>"],
    ),
    "mistral": (
        "{{- range .Messages }}{{ if eq .Role \"user\" }}[INST] {{ .Content }}[/INST]"
        "{{ else if eq .Role \"assistant\" }}{{ .Content }}</s>{{ end }}{{ end }}",
        ["[INST]", "[/INST]", "</s>"],
    ),
}


def template_family(chat_template: str | None) -> str | None:
    """Which known chat format a Jinja chat template renders, by its marker tokens."""
    if not chat_template:
        return None
    if "<|im_start|>" in chat_template:
        return "chatml"
    if "<|start_header_id|>" in chat_template:
        return "llama3"
    if "<start_of_turn>" in chat_template:
        return "gemma"
    if "<|user|>" in chat_template and "<|end|>" in chat_template:
        return "phi3"
    if "[INST]" in chat_template:
        return "mistral"
    return None


def _default_system(chat_template: str, family: str) -> str | None:
    """A system message the Jinja template inserts when the conversation has none (chatml only)."""
    if family != "chatml":
        return None
    m = re.search(r"'<\|im_start\|>system\n([^'{}<]+)<\|im_end\|>", chat_template)
    return m.group(1) if m else None


def ollama_modelfile(gguf_name: str, tokenizer) -> str:
    """An Ollama Modelfile for ``gguf_name`` beside it: FROM, TEMPLATE, default SYSTEM, stop tokens."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    family = template_family(template)
    lines = ["# Ollama: ollama create my-model -f Modelfile && ollama run my-model", f"FROM ./{gguf_name}", ""]
    if family is None:
        _log.warn_once(
            "ollama-template",
            "hizli does not know how to write this chat template in Ollama's format; the Modelfile has no "
            "TEMPLATE, so add one before `ollama create` (llama.cpp and LM Studio read the template from the GGUF)",
        )
        lines.append("# TEMPLATE: hizli could not translate this model's chat template; add one here")
        return "\n".join(lines) + "\n"
    go_template, stops = _OLLAMA[family]
    lines.append(f'TEMPLATE """{go_template}"""')
    system = _default_system(template, family)
    if system:
        lines.append(f'SYSTEM """{system}"""')
    vocab = tokenizer.get_vocab()
    for stop in stops:
        if stop in vocab or family == "mistral":
            lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"
