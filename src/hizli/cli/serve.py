"""``hizli serve PATH``: an OpenAI-compatible HTTP server with continuous batching and a chat page."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with a chat page",
        description="Serve a model over the OpenAI API (/v1/chat/completions, /v1/completions, "
        "/v1/models, /health) with continuous batching, and a chat page at /. "
        "Listens on loopback only unless --host says otherwise.",
    )
    sv.add_argument(
        "path",
        help="adapter folder (served on its 4-bit base, not merged), merged folder, .gguf "
        "file, hub id, or an embedded model name (smollm2-135m-instruct)",
    )
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument(
        "--adapter",
        dest="adapters",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also serve this LoRA adapter on the same base under model name NAME (repeatable)",
    )
    sv.add_argument("--template", help="chat template name to use instead of the tokenizer's own")
    sv.add_argument(
        "--load-in-4bit",
        choices=["auto", "on", "off"],
        default="auto",
        help="NF4 base weights; auto: on for an adapter folder's base, off otherwise",
    )
    sv.add_argument("--context", type=int, default=2048, help="longest prompt + answer in tokens (default 2048)")
    sv.add_argument("--max-tokens", type=int, default=4096, help="largest max_tokens a request may ask for")
    sv.add_argument("--max-batch", type=int, default=32, help="most requests decoded together (default 32)")
    sv.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="most requests waiting for a slot; more get 503 at once (default 256)",
    )
    sv.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024, help="largest request body (default 2 MiB)")
    sv.add_argument("--threads", type=int, help="CPU threads for torch (default: one per core)")
    sv.add_argument(
        "--cors-origin",
        help="allow browser pages from this origin (e.g. http://localhost:3000); default: no CORS headers",
    )


def run(args: argparse.Namespace) -> int:
    from hizli.serve.app import parse_adapters, serve

    return serve(
        args.path,
        args.host,
        args.port,
        adapters=parse_adapters(args.adapters),
        load_in_4bit={"auto": None, "on": True, "off": False}[args.load_in_4bit],
        template=args.template,
        context=args.context,
        max_tokens=args.max_tokens,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        cors_origin=args.cors_origin,
        threads=args.threads,
    )
