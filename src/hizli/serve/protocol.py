"""The OpenAI wire format: request validation into typed settings, and response bodies.

Every problem with a request becomes an :class:`APIError` that names the offending field
(``param``) the way OpenAI's API does, so clients show a useful message instead of a stack trace.
Fields this server does not act on (penalties, logit_bias, user, ...) are accepted and ignored,
as most OpenAI-compatible servers do, so that existing clients work unchanged.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from hizli.serve.sampling import SamplingParams

ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An error answer: HTTP ``status`` and OpenAI's ``{"error": {...}}`` body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """Server-wide bounds on what one request may ask for."""

    max_body_bytes: int = 2 * 1024 * 1024
    max_tokens: int = 4096  # largest max_tokens accepted
    context: int = 2048  # prompt + answer
    max_stop: int = 4


@dataclass
class GenerationRequest:
    """A validated chat or text completion request."""

    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None  # None: as much as the context allows, up to Limits.max_tokens
    params: SamplingParams
    messages: list[dict[str, str]] | None = None  # chat
    prompt: str | list[int] | None = None  # text completion


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(body).__name__}", code="invalid_json")
    return body


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise APIError(400, f"'{name}' must be a number, got {json.dumps(value)[:80]}", param=name, code="invalid_type")
    if value < lo or value > hi or (lo_open and value == lo):
        low = f"> {lo}" if lo_open else f">= {lo}"
        raise APIError(400, f"'{name}' is {value}; it must be {low} and <= {hi}", param=name, code="invalid_value")
    return float(value)


def _integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(
            400, f"'{name}' must be an integer, got {json.dumps(value)[:80]}", param=name, code="invalid_type"
        )
    return value


def _common(body: dict, limits: Limits) -> tuple[str, bool, bool, int | None, SamplingParams]:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "'model' must be a string (GET /v1/models lists them)", param="model", code="invalid_type")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", param="stream", code="invalid_type")
    options = body.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise APIError(
            400,
            "'stream_options.include_usage' must be true or false",
            param="stream_options.include_usage",
            code="invalid_type",
        )
    n = _integer(body, "n")
    if n not in (None, 1):
        raise APIError(
            400, f"'n' is {n}; this server returns one choice per request (n=1)", param="n", code="invalid_value"
        )
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name)
    if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens:
        raise APIError(
            400,
            f"'{name}' is {max_tokens}; it must be between 1 and {limits.max_tokens} (the server's --max-tokens)",
            param=name,
            code="invalid_value",
        )
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "'stop' must be a string or a list of strings", param="stop", code="invalid_type")
    if len(stop) > limits.max_stop or any(len(s) > 256 for s in stop):
        raise APIError(
            400,
            f"'stop' takes at most {limits.max_stop} strings of up to 256 characters",
            param="stop",
            code="invalid_value",
        )
    seed = _integer(body, "seed")
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise APIError(400, "'seed' must fit in 64 bits", param="seed", code="invalid_value")
    params = SamplingParams(
        max_tokens=max_tokens or 0,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        stop=stop,
        seed=None if seed is None else seed % 2**63,
    )
    return model or "", stream, include_usage, max_tokens, params


def _content(value: Any, where: str) -> str:
    """Message content: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(
                    400,
                    f"{where}.content[{j}] must be a text part ({{'type': 'text', 'text': ...}}); "
                    "this server reads text only",
                    param=f"{where}.content",
                    code="invalid_value",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(
        400, f"{where}.content must be a string or a list of text parts", param=f"{where}.content", code="invalid_type"
    )


def parse_chat(body: dict[str, Any], limits: Limits) -> GenerationRequest:
    model, stream, include_usage, max_tokens, params = _common(body, limits)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(
            400,
            "'messages' must be a non-empty list of {role, content} objects",
            param="messages",
            code="invalid_value" if isinstance(messages, list) else "invalid_type",
        )
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(
                400, f"{where} must be an object with 'role' and 'content'", param=where, code="invalid_type"
            )
        role = m.get("role")
        if role not in ROLES:
            raise APIError(
                400,
                f"{where}.role is {json.dumps(role)[:40]}; use one of {', '.join(ROLES)}",
                param=f"{where}.role",
                code="invalid_value",
            )
        content = m.get("content")
        if content is None and role != "assistant":
            raise APIError(400, f"{where} has no 'content'", param=f"{where}.content", code="invalid_value")
        out.append(
            {
                "role": "system" if role == "developer" else role,
                "content": "" if content is None else _content(content, where),
            }
        )
    return GenerationRequest(model, stream, include_usage, max_tokens, params, messages=out)


def parse_completion(body: dict[str, Any], limits: Limits) -> GenerationRequest:
    model, stream, include_usage, max_tokens, params = _common(body, limits)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    ok = isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    )
    if not ok:
        raise APIError(
            400,
            "'prompt' must be a string or a list of token ids (one prompt per request)",
            param="prompt",
            code="invalid_type",
        )
    if isinstance(prompt, str) and not prompt:
        raise APIError(400, "'prompt' is empty", param="prompt", code="invalid_value")
    if max_tokens is None:  # OpenAI's default for text completions
        max_tokens = 16
        params.max_tokens = 16
    return GenerationRequest(model, stream, include_usage, max_tokens, params, prompt=prompt)


# -- responses -----------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_response(
    rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(
    rid: str, model: str, created: int, delta: dict | None, finish: str | None, usage_counts: dict | None = None
) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage_counts is not None or delta is None:
        chunk["usage"] = usage_counts
    return chunk


def completion_response(
    rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(
    rid: str, model: str, created: int, text: str | None, finish: str | None, usage_counts: dict | None = None
) -> dict[str, Any]:
    choices = [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_counts is not None or text is None:
        chunk["usage"] = usage_counts
    return chunk
