"""The HTTP front: standard-library threads, one per connection, over the batching engines.

Why the standard library: it needs no extra install, and everything the OpenAI protocol needs
here is small (JSON in, JSON or server-sent events out). Each connection's thread validates its
request, hands it to the engine and forwards the engine's events; while it waits it watches its
socket, so a client that goes away (closed tab, killed script) cancels its request within one
decode step even when no text is being written.
"""

from __future__ import annotations

import json
import queue
import select
import socket
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from hizli import _log
from hizli.serve import protocol
from hizli.serve.engine import Engine, Event, QueueFull, Request, next_id
from hizli.serve.kv_forward import BASE_ADAPTER
from hizli.serve.protocol import APIError, Limits


@dataclass
class ServedModel:
    """One name in ``/v1/models``: an engine, and the LoRA adapter to apply (or none)."""

    name: str
    engine: Engine
    tokenizer: Any
    adapter: str = BASE_ADAPTER
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class ServerState:
    models: dict[str, ServedModel]
    limits: Limits
    cors_origin: str | None = None
    started: float = field(default_factory=time.time)

    def model(self, name: str) -> ServedModel:
        if not name:
            return next(iter(self.models.values()))
        if name not in self.models:
            raise APIError(
                404,
                f"model '{name}' is not served here; GET /v1/models lists {', '.join(self.models)}",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )
        return self.models[name]


# Bodies over the limit but below this are read and dropped before the 413, so that a client still
# sending sees the answer instead of a connection reset; larger ones are cut off.
DRAIN_BYTES = 64 * 1024 * 1024


class ClientGone(Exception):
    """The client closed its connection."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hizli"
    timeout = 30  # seconds to wait for a request's bytes before dropping the connection

    server: "Server"

    # -- plumbing ------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # one line per request would drown the console under load

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":
            self.send_error(400, "HTTP/0.9 requests are not served; send HTTP/1.0 or 1.1")
            return False
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Malformed request lines and headers: answer in the API's error shape, then close."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # we answer with a status line, whatever was asked
            self.request_version = "HTTP/1.1"
        try:
            self._json(code, APIError(code, message or explain or "bad request").body())
        except OSError:
            pass

    def _cors(self) -> None:
        origin = self.server.state.cors_origin
        if origin:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")

    def _json(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self._cors()
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: APIError) -> None:
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        self._json(e.status, e.body(), headers)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise APIError(
                411,
                "send the body with a Content-Length header (chunked uploads are not accepted)",
                code="length_required",
            )
        raw_length = self.headers.get("Content-Length")
        try:
            length = int(raw_length) if raw_length is not None else 0
        except ValueError:
            self.close_connection = True
            raise APIError(400, f"Content-Length {raw_length!r} is not a number", code="invalid_header") from None
        limit = self.server.state.limits.max_body_bytes
        if length < 0:
            self.close_connection = True
            raise APIError(400, f"Content-Length {length} is negative", code="invalid_header")
        if length > limit:
            self.close_connection = True
            if length <= DRAIN_BYTES:  # read it, so that the client sees the answer rather than a reset
                left = length
                while left > 0 and (got := self.rfile.read(min(left, 1 << 16))):
                    left -= len(got)
            raise APIError(
                413,
                f"the request body is {length} bytes; this server accepts up to {limit} (--max-body-bytes)",
                code="request_too_large",
            )
        data = self.rfile.read(length)
        if len(data) < length:
            self.close_connection = True
            raise ClientGone()
        return data

    def _client_gone(self) -> bool:
        """True when the peer has closed its end (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _events(self, request: Request):
        """The request's events as they come; cancels it if the client disconnects meanwhile."""
        while True:
            try:
                event: Event = request.events.get(timeout=0.2)
            except queue.Empty:
                if self._client_gone():
                    request.cancel()
                    raise ClientGone() from None
                continue
            yield event
            if event.finish_reason is not None:
                return

    # -- routes --------------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        state = self.server.state
        if path in ("/", "/index.html"):
            page = resources.files("hizli.serve").joinpath("chat.html").read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.send_header(
                "Content-Security-Policy", "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
            )
            self.end_headers()
            self.wfile.write(page)
        elif path == "/health":
            engines = {id(m.engine): m.engine for m in state.models.values()}.values()
            load = [e.load() for e in engines]
            self._json(
                200,
                {
                    "status": "ok",
                    "models": list(state.models),
                    "running": sum(x["running"] for x in load),
                    "waiting": sum(x["waiting"] for x in load),
                    "uptime_s": round(time.time() - state.started, 1),
                },
            )
        elif path == "/v1/models":
            self._json(
                200,
                {
                    "object": "list",
                    "data": [
                        {"id": m.name, "object": "model", "created": m.created, "owned_by": "hizli"}
                        for m in state.models.values()
                    ],
                },
            )
        elif path.startswith("/v1/models/"):
            try:
                m = state.model(path[len("/v1/models/") :] or "?")
            except APIError as e:
                return self._error(e)
            self._json(200, {"id": m.name, "object": "model", "created": m.created, "owned_by": "hizli"})
        else:
            self._error(APIError(404, f"no route GET {path}", type="not_found_error", code="not_found"))

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        try:
            if path not in ("/v1/chat/completions", "/v1/completions"):
                self._read_body()
                raise APIError(404, f"no route POST {path}", type="not_found_error", code="not_found")
            body = protocol.parse_json(self._read_body())
            chat = path == "/v1/chat/completions"
            req = (
                protocol.parse_chat(body, self.server.state.limits)
                if chat
                else protocol.parse_completion(body, self.server.state.limits)
            )
            self._generate(req, chat)
        except APIError as e:
            self._error(e)
        except ClientGone:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a bug answers 500 and the server goes on
            self.close_connection = True
            _log.warn_once(f"serve-{type(e).__name__}", f"request failed: {e!r}")
            try:
                self._error(APIError(500, f"internal error: {e!r}", type="server_error", code="internal_error"))
            except OSError:
                pass

    def do_OPTIONS(self) -> None:  # noqa: N802 - CORS preflight, only when --cors-origin is set
        if not self.server.state.cors_origin:
            return self._error(
                APIError(405, "OPTIONS is not allowed (start the server with --cors-origin)", code="method_not_allowed")
            )
        self.send_response(204)
        self._cors()
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Content-Type, Authorization")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _not_allowed(self) -> None:
        self.close_connection = True
        self._error(
            APIError(
                405, f"method {self.command} is not allowed on {self.path.split('?', 1)[0]}", code="method_not_allowed"
            )
        )

    do_PUT = do_DELETE = do_PATCH = do_HEAD = _not_allowed  # noqa: N815

    # -- generation ----------------------------------------------------------------------------

    def _prompt_ids(self, served: ServedModel, req: protocol.GenerationRequest) -> list[int]:
        tok = served.tokenizer
        if req.messages is None:
            if isinstance(req.prompt, list):
                if any(not 0 <= t < len(tok) for t in req.prompt):
                    raise APIError(
                        400, f"'prompt' holds token ids outside 0..{len(tok) - 1}", param="prompt", code="invalid_value"
                    )
                return list(req.prompt)
            return tok(req.prompt, add_special_tokens=True, verbose=False)["input_ids"]
        try:  # verbose=False: the length check against the served context is _generate's, not the tokenizer's
            ids = tok.apply_chat_template(
                req.messages,
                tokenize=True,
                add_generation_prompt=True,
                return_dict=True,
                tokenizer_kwargs={"verbose": False},
            )["input_ids"]
        except Exception as e:  # noqa: BLE001 - templates raise whatever jinja raises (role order, ...)
            raise APIError(
                400, f"the chat template rejected these messages: {e}", param="messages", code="invalid_value"
            ) from None
        return list(ids)

    def _generate(self, req: protocol.GenerationRequest, chat: bool) -> None:
        state = self.server.state
        served = state.model(req.model)
        prompt = self._prompt_ids(served, req)
        limits = state.limits
        room = limits.context - len(prompt)
        if req.max_tokens is None:
            req.params.max_tokens = min(limits.max_tokens, room)
        if room < 1 or req.params.max_tokens > room:
            param = "messages" if chat else "prompt"
            raise APIError(
                400,
                f"the prompt is {len(prompt)} tokens and {req.params.max_tokens} more were asked "
                f"for; the context is {limits.context} tokens (--context). Shorten the "
                "prompt or lower max_tokens",
                param=param,
                code="context_length_exceeded",
            )
        try:
            request = served.engine.submit(Request(prompt=prompt, params=req.params, adapter=served.adapter))
        except QueueFull as e:
            raise APIError(
                503, f"the server is at capacity ({e}); retry shortly", type="server_error", code="server_overloaded"
            ) from None
        rid = next_id("chatcmpl" if chat else "cmpl")
        try:
            if req.stream:
                self._stream(request, rid, served.name, chat, req.include_usage)
            else:
                self._whole(request, rid, served.name, chat)
        finally:
            request.cancel()  # a no-op when it finished; frees the slot when we leave early

    def _whole(self, request: Request, rid: str, model: str, chat: bool) -> None:
        text = []
        for ev in self._events(request):
            text.append(ev.text)
            if ev.finish_reason == "error":
                raise APIError(500, ev.error or "generation failed", type="server_error", code="internal_error")
            if ev.finish_reason:
                make = protocol.chat_response if chat else protocol.completion_response
                return self._json(
                    200, make(rid, model, "".join(text), ev.finish_reason, ev.prompt_tokens, ev.completion_tokens)
                )

    def _stream(self, request: Request, rid: str, model: str, chat: bool, include_usage: bool) -> None:
        created = int(time.time())
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Accel-Buffering", "no")
        self._cors()
        self.end_headers()

        def send(payload: dict | str) -> None:
            data = f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        if chat:
            send(protocol.chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, None))
        for ev in self._events(request):
            if ev.finish_reason == "error":
                send({"error": APIError(500, ev.error or "generation failed", type="server_error").body()["error"]})
                break
            if ev.text or ev.finish_reason:
                if chat:
                    delta = {"content": ev.text} if ev.text else {}
                    send(protocol.chat_chunk(rid, model, created, delta, ev.finish_reason))
                else:
                    send(protocol.completion_chunk(rid, model, created, ev.text, ev.finish_reason))
            if ev.finish_reason and include_usage:
                counts = protocol.usage(ev.prompt_tokens, ev.completion_tokens)
                make = protocol.chat_chunk if chat else protocol.completion_chunk
                send(make(rid, model, created, None, None, counts))
        send("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], state: ServerState) -> None:
        self.state = state
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a connection that breaks mid-answer is the client's business; the server goes on
