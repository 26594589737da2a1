"""Continuous batching: one thread runs decode steps; requests join and leave between steps.

A request first reads its prompt in chunks (a token budget per step, so a long prompt does not
stall everyone else's answers), then decodes one token per step together with every other running
request. A finished, stopped or abandoned request leaves at the next step boundary and its slot
goes to the next waiting one. Requests beyond the running slots wait in a bounded queue; past that,
``submit`` refuses at once (the server answers 503) instead of letting latency grow without bound.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from hizli import _log
from hizli.serve.kv_forward import BASE_ADAPTER, Chunk, SlotModel
from hizli.serve.sampling import SamplingParams, TextStream, choose_tokens


class QueueFull(Exception):
    """The engine's waiting queue is full; the client should retry later."""


@dataclass
class Event:
    """What a request's consumer receives: text as it is produced, then one final event."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "error" on the last event
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    adapter: str = BASE_ADAPTER
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # engine-side state
    pos: int = 0  # tokens of this sequence already in the KV cache
    generated: list[int] = field(default_factory=list)
    slot: int = -1
    stream: TextStream | None = None
    generator: Any = None

    @property
    def decoding(self) -> bool:
        return self.pos >= len(self.prompt)

    def cancel(self) -> None:
        """Called from the client's thread when it goes away; the engine frees the slot next step."""
        self.cancelled.set()


class Engine:
    """Runs a :class:`SlotModel` over whatever requests are running, in a background thread.

    Args:
        model: the loaded causal LM (plain or PEFT).
        tokenizer: its tokenizer (decodes the streamed text).
        stop_ids: token ids that end an answer (EOS, end of turn).
        max_slots: most requests decoded together.
        max_queue: most requests waiting for a slot; more are refused with :class:`QueueFull`.
        context: longest prompt + answer in tokens.
        prefill_tokens: prompt tokens read per step, shared by the requests that are starting.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        stop_ids: list[int],
        *,
        max_slots: int = 32,
        max_queue: int = 256,
        context: int = 2048,
        prefill_tokens: int = 256,
    ) -> None:
        self.slots = SlotModel(model, max_slots + 1, context)  # the last slot is scratch for moves
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.max_slots, self.max_queue, self.context = max_slots, max_queue, context
        self.prefill_tokens = prefill_tokens
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.lock = threading.Condition()
        self.steps = 0
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="hizli-engine", daemon=True)
        self._thread.start()

    # -- client side ---------------------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        """Queue ``request``; its events arrive on ``request.events``. Raises QueueFull."""
        assert len(request.prompt) + request.params.max_tokens <= self.context, "validated by the caller"
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(request)
            self.lock.notify()
        return request

    def load(self) -> dict[str, int]:
        with self.lock:
            return {"running": len(self.running), "waiting": len(self.waiting)}

    def close(self) -> None:
        with self.lock:
            self._stop = True
            self.lock.notify()
        self._thread.join(timeout=10)

    # -- engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self._stop and not self.waiting and not self.running:
                    if self.slots.capacity:
                        self.slots.release()  # idle: give the KV cache's memory back
                    self.lock.wait()
                if self._stop:
                    for r in self.waiting + self.running:
                        r.events.put(Event(finish_reason="error", error="the server is shutting down"))
                    return
                self._admit()
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - one bad step must not take the server down
                _log.warn_once("engine-error", f"generation step failed: {e!r}")
                for r in self.running:
                    r.events.put(Event(finish_reason="error", error=f"generation failed: {e}"))
                self.running = []
                self.slots.release()

    def _admit(self) -> None:
        """Move waiting requests into free slots (caller holds the lock)."""
        self.waiting = [r for r in self.waiting if not r.cancelled.is_set()]
        while self.waiting and len(self.running) < self.max_slots:
            r = self.waiting.pop(0)
            r.slot = len(self.running)
            r.stream = TextStream(self.tokenizer, r.params.stop)
            r.generator = r.params.generator()
            self.running.append(r)

    def _step(self) -> None:
        gone = [r for r in self.running if r.cancelled.is_set()]
        if gone:
            self._leave(gone)
        if not self.running:
            return
        decode = [r for r in self.running if r.decoding]
        budget = self.prefill_tokens
        prefill: list[Request] = []
        chunks: list[Chunk] = []
        for r in self.running:
            if r.decoding or budget <= 0:
                continue
            n = min(budget, len(r.prompt) - r.pos)
            chunks.append(Chunk(r.slot, r.pos, r.prompt[r.pos : r.pos + n], r.adapter))
            prefill.append(r)
            budget -= n
        dec_chunks = [
            Chunk(r.slot, r.pos, [r.generated[-1] if r.generated else r.prompt[-1]], r.adapter) for r in decode
        ]
        logits = self.slots.step(dec_chunks, chunks)
        self.steps += 1
        for r, c in zip(decode + prefill, dec_chunks + chunks):
            r.pos = c.start + len(c.tokens)
        # rows whose sequence now has its whole prompt (or more) in the cache pick a next token
        ready = [(i, r) for i, r in enumerate(decode + prefill) if r.decoding]
        if ready:
            rows = logits[[i for i, _ in ready]]
            picked = choose_tokens(rows, [r.params for _, r in ready], [r.generator for _, r in ready])
        finished: list[Request] = []
        for (_, r), token in zip(ready, picked if ready else []):
            if self._emit(r, token):
                finished.append(r)
        self._leave(finished)
        self._pack()

    def _emit(self, r: Request, token: int) -> bool:
        """Record ``token`` for ``r`` and send its text; True when ``r`` is done."""
        assert r.stream is not None
        r.generated.append(token)
        reason = None
        if token in self.stop_ids:
            reason = "stop"
            text = r.stream.finish()
        else:
            text = r.stream.add(token)
            if r.stream.stopped:
                reason = "stop"
            elif len(r.generated) >= r.params.max_tokens:
                reason = "length"
                text += r.stream.finish()
        if r.stream.stopped and reason is None:
            reason = "stop"
        if text:
            r.events.put(Event(text=text))
        if reason is not None:
            r.events.put(Event(finish_reason=reason, prompt_tokens=len(r.prompt), completion_tokens=len(r.generated)))
            return True
        return False

    def _leave(self, done: list[Request]) -> None:
        if not done:
            return
        ids = {id(r) for r in done}
        self.running = [r for r in self.running if id(r) not in ids]
        self._pack()

    def _pack(self) -> None:
        """Renumber slots so decoders hold 0..d-1 and prompt readers follow, moving cache rows."""
        order = [r for r in self.running if r.decoding] + [r for r in self.running if not r.decoding]
        self.running = order
        moves = {r.slot: (i, r) for i, r in enumerate(order) if r.slot != i}
        scratch = self.max_slots
        while moves:
            free = next((src for src, (dst, _) in moves.items() if dst not in moves), None)
            if free is None:  # only cycles left: park one sequence in the scratch slot
                src, (dst, r) = next(iter(moves.items()))
                self.slots.move_slot(src, scratch, r.pos)
                del moves[src]
                moves[scratch] = (dst, r)
                continue
            dst, r = moves.pop(free)
            self.slots.move_slot(free, dst, r.pos)
            r.slot = dst


_ids = itertools.count()


def next_id(prefix: str) -> str:
    """Unique response id, OpenAI-style (``chatcmpl-...``)."""
    return f"{prefix}-{int(time.time() * 1000):x}{next(_ids):06x}"
