"""Chat templates kept as data: a registry of Jinja files plus a small metadata table.

``templates/NAME.jinja`` holds each template body; ``templates/registry.yaml`` says, per template,
its aliases, the text that ends a turn (trained with every assistant answer), the markers that open
a user turn and an assistant answer (used by ``train_on_responses_only`` on rendered text), extra
stop texts, and a default system message where the model has one.

``get_chat_template(tokenizer, "llama-3.1")`` sets ``tokenizer.chat_template`` to a self-contained
Jinja text (the default system message and any key ``mapping`` are written into it), so the
tokenizer renders the same way after ``save_pretrained`` in any tool that reads chat templates.
Templates are rendered with transformers' own sandboxed Jinja environment, so what hizli renders
for labels is exactly what ``tokenizer.apply_chat_template`` returns.
"""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from hizli import _log

TEMPLATE_DIR = Path(__file__).with_name("templates")
EOS = "{eos}"  # registry placeholder: "the tokenizer's EOS token"

# The conversation `hizli templates NAME` renders (also used in docs/DATA.md).
SAMPLE_CONVERSATION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


@dataclass(frozen=True)
class TemplateInfo:
    """One registry entry (see ``templates/registry.yaml`` for what each field means)."""

    name: str
    body: str
    aliases: tuple[str, ...] = ()
    end_of_turn: str = EOS
    instruction_part: str | None = None
    response_part: str | None = None
    stop: tuple[str, ...] = ()
    default_system: str | None = None
    tokens: Mapping[str, str] = field(default_factory=dict)
    source: str = ""

    def eot(self, tokenizer=None) -> str | None:
        """The end-of-turn text with ``{eos}`` resolved against ``tokenizer`` (or the family's EOS)."""
        if self.end_of_turn != EOS:
            return self.end_of_turn
        if tokenizer is not None and getattr(tokenizer, "eos_token", None):
            return tokenizer.eos_token
        return self.tokens.get("eos") or None

    def jinja(self, mapping: Mapping[str, str] | None = None) -> str:
        """The self-contained template text: a short prelude (default system, key mapping) + body."""
        prelude = []
        if self.default_system is not None:
            prelude.append("{%- set default_system = " + _jinja_str(self.default_system) + " -%}\n")
        if mapping:
            prelude.append(_mapping_prelude(mapping))
        return "".join(prelude) + self.body


@functools.lru_cache(maxsize=None)
def registry() -> dict[str, TemplateInfo]:
    """Template name -> TemplateInfo, read once from ``templates/registry.yaml``."""
    import yaml

    table = yaml.safe_load((TEMPLATE_DIR / "registry.yaml").read_text(encoding="utf-8"))
    out: dict[str, TemplateInfo] = {}
    for name, entry in table.items():
        body = (TEMPLATE_DIR / f"{entry.get('file', name)}.jinja").read_text(encoding="utf-8")
        out[name] = TemplateInfo(
            name=name,
            body=body,
            aliases=tuple(entry.get("aliases") or ()),
            end_of_turn=entry.get("end_of_turn", EOS),
            instruction_part=entry.get("instruction_part"),
            response_part=entry.get("response_part"),
            stop=tuple(entry.get("stop") or ()),
            default_system=entry.get("default_system"),
            tokens=dict(entry.get("tokens") or {}),
            source=entry.get("source", ""),
        )
    return out


@functools.lru_cache(maxsize=None)
def _names() -> dict[str, str]:
    """Every accepted spelling (names and aliases, lower case) -> registry name."""
    names: dict[str, str] = {}
    for info in registry().values():
        for n in (info.name, *info.aliases):
            names[_key(n)] = info.name
    return names


def _key(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


def lookup(name: str) -> TemplateInfo:
    """The registry entry for ``name`` or one of its aliases.

    Raises:
        ValueError: unknown name; the message lists the closest valid names.
    """
    key = _key(name)
    names = _names()
    if key in names:
        return registry()[names[key]]
    if key.replace("-", "") in {n.replace("-", "") for n in names}:
        return registry()[next(v for n, v in names.items() if n.replace("-", "") == key.replace("-", ""))]
    close = difflib.get_close_matches(key, list(names), n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    raise ValueError(
        f"chat_template={name!r} is not a known template; {hint}`hizli templates` lists all {len(registry())}"
    )


def get_chat_template(
    tokenizer,
    chat_template: str = "llama-3.1",
    mapping: Mapping[str, str] | None = None,
    map_eos_token: bool = True,
    *,
    warn: bool = True,
):
    """Give ``tokenizer`` a chat template from hizli's registry (the recipe's step 5).

    Args:
        tokenizer: a transformers tokenizer; it is changed in place and returned.
        chat_template: a registry name or alias (``"llama-3.1"``, ``"chatml"``, ...; see
            ``hizli templates``), or a Jinja template text of your own.
        mapping: the keys and role names of your rows when they are not role/content, e.g.
            ``{"role": "from", "content": "value", "user": "human", "assistant": "gpt"}`` renders
            ShareGPT rows without ``standardize_sharegpt``. Rows in role/content form still render.
        map_eos_token: make the template's end-of-turn token the tokenizer's EOS (where it is one
            token of the vocabulary), so generation stops at the end of an answer.
        warn: say when the template's control tokens are not single tokens of this vocabulary.

    Returns:
        The same tokenizer, with ``chat_template`` set (its text identifies the entry again:
        :func:`template_info`).
    """
    if not isinstance(chat_template, str):
        raise ValueError(
            f"chat_template={chat_template!r}: pass a template name (see `hizli templates`) or a Jinja text"
        )
    if "{{" in chat_template or "{%" in chat_template:
        info = TemplateInfo(name="custom", body=chat_template, end_of_turn=EOS)
    else:
        info = lookup(chat_template)
    if mapping is not None:
        _check_mapping(mapping)
    tokenizer.chat_template = info.jinja(mapping)
    eot = info.eot(tokenizer)
    vocab = tokenizer.get_vocab()
    if map_eos_token and eot and eot in vocab and eot != tokenizer.eos_token:
        old = tokenizer.eos_token
        tokenizer.eos_token = eot
        _log.info(f"chat template {info.name}: EOS is now {eot} (was {old}), so answers stop at the end of a turn")
        if tokenizer.pad_token == eot:
            from hizli.models.loader import set_pad_token

            set_pad_token(tokenizer)
    if warn and info.name != "custom":
        missing = [t for t in _control_tokens(info, tokenizer) if t not in vocab]
        if missing:
            _log.warn_once(
                f"template-vocab-{info.name}-{id(tokenizer)}",
                f"chat template {info.name}: {', '.join(missing)} are not single tokens of this tokenizer, so "
                "they are split into pieces; pick the template made for this model (e.g. smollm2 for SmolLM2)",
            )
    return tokenizer


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids generation should stop at: EOS, the template's end of turn and its stop texts."""
    info = template_info(tokenizer)
    texts = [tokenizer.eos_token]
    if info is not None:
        texts += [info.eot(tokenizer), *info.stop]
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in texts if t and t in vocab]
    return list(dict.fromkeys(ids))


def template_info(tokenizer) -> TemplateInfo | None:
    """Which registry template this tokenizer renders with, or None when it is not one of ours.

    Known from the template text alone (nothing is written on the tokenizer), also after
    ``save_pretrained``/loading: exactly, by its body after a key-mapping prelude (templates that
    share a body, the ChatML family, share the turn markers read from the result), or by the
    markers it contains.
    """
    text = getattr(tokenizer, "chat_template", None)
    if not isinstance(text, str):
        return None
    for info in registry().values():
        if text == info.jinja():
            return info
    for info in registry().values():  # ours with a key mapping prelude
        if text.endswith(info.body):
            return info
    # A template of the model's own: recognise the family by its control texts (most specific first).
    best = None
    for info in registry().values():
        if (
            info.response_part
            and info.instruction_part
            and _literal_in(info.response_part, text)
            and _literal_in(info.instruction_part, text)
        ):
            if best is None or len(info.response_part) > len(best.response_part or ""):
                best = info
    return best


def render(
    info_or_text: TemplateInfo | str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    tokenizer=None,
    **extra: Any,
) -> str:
    """Render ``messages`` with a registry entry (or a Jinja text) outside any tokenizer.

    Special tokens come from ``tokenizer`` if given, else from the entry's ``tokens`` table.
    """
    if isinstance(info_or_text, TemplateInfo):
        text = info_or_text.jinja()
        tokens = {"bos_token": info_or_text.tokens.get("bos", ""), "eos_token": info_or_text.tokens.get("eos", "")}
    else:
        text, tokens = info_or_text, {}
    if tokenizer is not None:
        tokens = dict(tokenizer.special_tokens_map)
    return compile_template(text).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **{**tokens, **extra}
    )


@functools.lru_cache(maxsize=64)
def compile_template(text: str):
    """The compiled template, from transformers' sandboxed environment (the one apply_chat_template uses)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # pragma: no cover - older/newer transformers: same settings, our own environment
        return _own_environment().from_string(text)
    return _compile_jinja_template(text)


# ---------------------------------------------------------------- helpers
def _jinja_str(s: str) -> str:
    # Jinja string literals accept JSON's escapes (\n, \", \\); non-ASCII is written as is.
    return json.dumps(s, ensure_ascii=False)


def _check_mapping(mapping: Mapping[str, str]) -> None:
    bad = [k for k, v in mapping.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ValueError(
            f"mapping={dict(mapping)!r}: keys and values must be strings, "
            'e.g. {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}'
        )


def _mapping_prelude(mapping: Mapping[str, str]) -> str:
    """Jinja that rebuilds ``messages`` as role/content from the row's own keys and role names."""
    role_key = mapping.get("role", "role")
    content_key = mapping.get("content", "content")
    roles = {v: k for k, v in mapping.items() if k not in ("role", "content")}
    return (
        "{#- hizli: rows may use " + role_key + "/" + content_key + " keys; read them as role/content -#}\n"
        "{%- set hz = namespace(turns=[]) -%}\n"
        "{%- set hz_roles = " + json.dumps(roles, ensure_ascii=False) + " -%}\n"
        "{%- for m in messages -%}\n"
        "    {%- set r = m[" + _jinja_str(role_key) + "] if " + _jinja_str(role_key) + " in m else m['role'] -%}\n"
        "    {%- set c = m["
        + _jinja_str(content_key)
        + "] if "
        + _jinja_str(content_key)
        + " in m else m['content'] -%}\n"
        "    {%- set hz.turns = hz.turns + [{'role': hz_roles[r] if r in hz_roles else r, 'content': c}] -%}\n"
        "{%- endfor -%}\n"
        "{%- set messages = hz.turns -%}\n"
    )


def _control_tokens(info: TemplateInfo, tokenizer) -> list[str]:
    """The special-token-looking texts a template writes (for the vocabulary check)."""
    texts = [info.eot(tokenizer) or ""]
    for part in (info.instruction_part, info.response_part):
        texts += _angle_tokens(part or "")
    return [t for t in dict.fromkeys(texts) if t.startswith("<") and t.endswith(">") and len(t) > 2]


def _angle_tokens(text: str) -> list[str]:
    out, i = [], 0
    while (j := text.find("<", i)) >= 0 and (k := text.find(">", j)) >= 0:
        out.append(text[j : k + 1])
        i = k + 1
    return out


def _literal_in(part: str, template_text: str) -> bool:
    """Whether a marker's control tokens all appear in a template text (as written in its literals)."""
    pieces = _angle_tokens(part) or [part.strip()]
    return all(p and p in template_text for p in pieces)


def _own_environment():  # pragma: no cover - used only where transformers lacks the helper
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env
