"""Which characters of a rendered conversation are trained, and which tokens that makes.

The label rule: when training on responses, a token carries a label only if it belongs to an
assistant turn's content or to that turn's end-of-turn token (llama-3.1 ``<|eot_id|>``, ChatML
``<|im_end|>``). Headers, the generation prompt and anything after the end-of-turn token (such as
ChatML's newline) stay at -100.

Two ways to find those spans, which agree wherever both apply (a test holds them to it):

- structure (from the message list): the turn starts where the render of the conversation up
  to it, with the generation prompt, ends; it ends where the render including it ends, cut right
  after its last end-of-turn text (or with trailing whitespace removed when the end-of-turn text is
  unknown). This needs each prefix render to be a prefix of the whole render, which holds for
  every registry template; where a template breaks it, the markers below are used instead.
- markers (for already-rendered text): every ``response_part`` opens a span, which ends at the
  first end-of-turn text after it, else at the next ``instruction_part``/``response_part``, else at
  the end, with trailing whitespace removed. This is Unsloth's ``train_on_responses_only`` rule
  made exact about the end of the turn.

Characters become tokens through the fast tokenizer's offset mapping: a token is trained when its
first character lies in a span.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from hizli.data.templates import compile_template, template_info


class LabelError(ValueError):
    """A conversation whose trained spans cannot be found (reported as a skipped row)."""


class Renderer:
    """A tokenizer's chat template, ready to render conversations and locate assistant turns."""

    def __init__(self, tokenizer, *, instruction_part: str | None = None, response_part: str | None = None) -> None:
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default")
        self.template: str | None = template if isinstance(template, str) else None
        self.tokens = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        self.bos: str | None = tokenizer.bos_token
        info = template_info(tokenizer)
        self.template_name = info.name if info else None
        self.eot: str | None = info.eot(tokenizer) if info else None
        self.instruction_part = (
            instruction_part if instruction_part is not None else (info.instruction_part if info else None)
        )
        self.response_part = response_part if response_part is not None else (info.response_part if info else None)

    @property
    def has_markers(self) -> bool:
        return bool(self.response_part)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        if self.template is None:
            raise ValueError(
                "the tokenizer has no chat template; set one with "
                "hizli.get_chat_template(tokenizer, 'llama-3.1') (`hizli templates` lists them)"
            )
        return compile_template(self.template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **self.tokens
        )

    def assistant_spans(self, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of its assistant turns (structure rule)."""
        full = self.render(messages)
        spans: list[tuple[int, int]] = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            try:
                head = self.render(messages[:i], add_generation_prompt=True)
                upto = self.render(messages[: i + 1])
            except Exception:  # a template that refuses a partial conversation: use the markers
                return full, self.marker_spans(full)
            if not (full.startswith(upto) and upto.startswith(head)):
                return full, self.marker_spans(full)
            spans.append((len(head), self._turn_end(full, len(head), len(upto), last=True)))
        return full, spans

    def marker_spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of assistant answers in rendered ``text`` (marker rule)."""
        if not self.response_part:
            raise LabelError(
                "cannot tell assistant turns apart in this text: the chat template is not one of "
                "hizli's; pass instruction_part= and response_part= to train_on_responses_only"
            )
        spans: list[tuple[int, int]] = []
        pos = 0
        while (r := text.find(self.response_part, pos)) >= 0:
            start = r + len(self.response_part)
            ends = [text.find(p, start) for p in (self.instruction_part, self.response_part) if p]
            stop = min([e for e in ends if e >= 0], default=len(text))
            end = self._turn_end(text, start, stop, last=False)
            if end > start:
                spans.append((start, end))
            pos = max(end, start)
        return spans

    def _turn_end(self, text: str, start: int, stop: int, *, last: bool) -> int:
        """End of the trained part of [start, stop): just after the end-of-turn text, else rstripped."""
        if self.eot:
            k = text.rfind(self.eot, start, stop) if last else text.find(self.eot, start, stop)
            if k >= 0:
                return k + len(self.eot)
        return start + len(text[start:stop].rstrip())

    def wants_special_tokens(self, text: str) -> bool:
        """Tokenize with the tokenizer's own special tokens unless the text already starts with BOS."""
        return not (self.bos and text.startswith(self.bos))


def span_mask(offsets: Any, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Boolean mask over tokens: True where the token's first character lies in one of ``spans``.

    Args:
        offsets: ``[n, 2]`` character offsets from the fast tokenizer (``return_offsets_mapping``).
        spans: ``(start, end)`` character ranges, end exclusive.
    """
    starts = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(offsets))
    mask = np.zeros(len(starts), dtype=bool)
    for s, e in spans:
        mask |= (starts >= s) & (starts < e)
    return mask
