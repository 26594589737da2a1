"""Per-request sampling settings, next-token choice, and streamed text with stop strings."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """What one request asks of generation (already validated by the protocol layer).

    Attributes:
        max_tokens: most tokens to generate.
        temperature: 0 picks the most likely token (greedy, reproducible).
        top_p: nucleus sampling mass (1 keeps the whole distribution).
        stop: strings that end the answer; they are not part of the returned text.
        seed: makes sampling reproducible for the same prompt and the same batch neighbours.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(self.seed if self.seed is not None else random.getrandbits(63))
        return g


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """Next token for each row of ``logits [rows, vocab]`` (fp32) under that row's settings."""
    out: list[int] = []
    greedy = logits.argmax(dim=-1).tolist()
    for row, (p, g) in enumerate(zip(params, generators)):
        if p.temperature <= 0:
            out.append(int(greedy[row]))
            continue
        probs = torch.softmax(logits[row] / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop = (sorted_p.cumsum(0) - sorted_p) >= p.top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        out.append(int(torch.multinomial(probs, 1, generator=g)))
    return out


class TextStream:
    """Turns generated token ids into text deltas, holding back what may be a stop string's start.

    Decoding token by token breaks multi-byte characters and merges spaces differently from
    decoding the whole answer, so the text is decoded from a window that starts a few tokens back
    and only the part past what was already sent is emitted; an incomplete character (U+FFFD at
    the end) waits for the next token.
    """

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already accounted for
        self.read = 0
        self.text = ""  # all text decoded so far
        self.sent = 0  # characters of self.text already emitted
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Add one token; return the new text that is safe to send (may be empty)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return "" if after.endswith("\ufffd") else self._release(final=False)
        self.text += after[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The end of the answer: whatever was held back (and is not a stop string)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        for s in self.stop:
            at = self.text.find(s, max(0, self.sent - len(s) + 1))
            if at >= 0:
                self.text = self.text[:at]
                self.stopped = True
                break
        end = len(self.text)
        if not final and not self.stopped:
            for s in self.stop:  # hold back a tail that could grow into a stop string
                for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        delta = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta
