"""``hizli serve``: load what PATH names, put one batching engine over it, and answer HTTP.

PATH may be an adapter folder (served hot on its base, not merged: the base loads in 4-bit as
in training unless told otherwise), a merged folder, a ``.gguf`` file, a hub id, or an embedded
model name. ``adapters`` adds LoRA adapters on the same base, each under its own model name;
requests for different names share one decode batch (PEFT applies each row's adapter).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

from hizli import _log
from hizli.serve.engine import Engine
from hizli.serve.http import Server, ServedModel, ServerState
from hizli.serve.kv_forward import BASE_ADAPTER
from hizli.serve.protocol import Limits

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """``["name=path", ...]`` -> ``{name: path}``, with errors that name the bad entry."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--adapter {spec!r}: write it as NAME=PATH (e.g. --adapter support=lora_model)")
        if name in out:
            raise ValueError(f"--adapter {spec!r}: the name {name!r} is given twice; give each adapter its own name")
        if not (Path(path) / "adapter_config.json").is_file():
            raise ValueError(f"--adapter {spec!r}: {path} is not an adapter folder (no adapter_config.json)")
        out[name.strip()] = path.strip()
    return out


def _served_name(path: str) -> str:
    from hizli.models.embedded import EMBEDDED

    if path.lower() in EMBEDDED:
        return path.lower()
    p = Path(path).expanduser()
    if p.is_file():
        return p.stem
    if p.is_dir():
        return p.resolve().name
    return path  # a hub id


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS ids of the generation config plus the chat template's end-of-turn tokens."""
    from hizli.data.templates import stop_token_ids

    ids: list[int] = []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    eos = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
    ids.extend([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    ids.extend(stop_token_ids(tokenizer))
    return list(dict.fromkeys(int(i) for i in ids))


def load_models(
    path: str,
    adapters: dict[str, str] | None = None,
    *,
    load_in_4bit: bool | None = None,
    template: str | None = None,
    context: int = 2048,
    max_batch: int = 32,
    max_queue: int = 256,
    prefill_tokens: int = 256,
) -> dict[str, ServedModel]:
    """Load PATH (and extra adapters on its base) and start one engine; return the served names.

    Args:
        path: adapter folder, merged folder, .gguf file, hub id or embedded model name.
        adapters: extra ``{name: adapter folder}`` served on the same base.
        load_in_4bit: NF4 base weights; None loads adapters' bases in 4-bit and everything else as is.
        template: chat template name to use instead of the tokenizer's own.
        context: longest prompt + answer in tokens.
        max_batch: most requests decoded together.
        max_queue: most requests waiting for a slot before the server answers 503.
        prefill_tokens: prompt tokens read per step.
    """
    from hizli.models import loader

    adapters = adapters or {}
    kind = loader.resolve_source(path).kind
    if load_in_4bit is None:
        load_in_4bit = kind == "adapter"
    model, tokenizer = loader.load(path, max_seq_length=context, load_in_4bit=load_in_4bit, adapter_trainable=False)
    model.eval()
    if template:
        from hizli.data.templates import get_chat_template

        tokenizer = get_chat_template(tokenizer, chat_template=template)
    if not getattr(tokenizer, "chat_template", None):
        _log.warn_once(
            "serve-no-template",
            "this tokenizer has no chat template: /v1/chat/completions will "
            "answer 400; pass --template NAME (`hizli templates` lists them)",
        )
    name = _served_name(path)
    entries: list[tuple[str, str]] = []  # (served name, PEFT adapter name)
    if kind == "adapter":
        entries.append((name, "default"))
    else:
        entries.append((name, BASE_ADAPTER))
    if adapters:
        from peft import PeftModel

        for i, (adapter_name, adapter_path) in enumerate(adapters.items()):
            if adapter_name in (e[0] for e in entries):
                raise ValueError(
                    f"--adapter {adapter_name}={adapter_path}: {adapter_name!r} is already a served "
                    "name; choose another"
                )
            if not hasattr(model, "peft_config"):
                model = PeftModel.from_pretrained(model, adapter_path, adapter_name=adapter_name, is_trainable=False)
            else:
                model.load_adapter(adapter_path, adapter_name=adapter_name, is_trainable=False)
            entries.append((adapter_name, adapter_name))
        model.eval()
    engine = Engine(
        model,
        tokenizer,
        stop_ids(model, tokenizer),
        max_slots=max_batch,
        max_queue=max_queue,
        context=context,
        prefill_tokens=prefill_tokens,
    )
    if len(entries) == 1 and entries[0][1] != BASE_ADAPTER:
        entries = [(entries[0][0], BASE_ADAPTER)]  # one adapter only: PEFT's active adapter applies
    elif len(entries) > 1:
        engine.slots.mixed = True
    return {n: ServedModel(n, engine, tokenizer, adapter) for n, adapter in entries}


def start(
    models: dict[str, ServedModel],
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    limits: Limits | None = None,
    cors_origin: str | None = None,
) -> Server:
    """Bind and serve in a background thread; ``server.server_address`` has the real port."""
    server = Server((host, port), ServerState(models, limits or Limits(), cors_origin))
    threading.Thread(target=server.serve_forever, name="hizli-http", daemon=True).start()
    return server


def serve(
    path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    adapters: dict[str, str] | None = None,
    load_in_4bit: bool | None = None,
    template: str | None = None,
    context: int = 2048,
    max_tokens: int = 4096,
    max_batch: int = 32,
    max_queue: int = 256,
    max_body_bytes: int = 2 * 1024 * 1024,
    cors_origin: str | None = None,
    threads: int | None = None,
) -> int:
    """Serve until Ctrl-C (what ``hizli serve`` runs); see :func:`load_models` for the model arguments.

    ``threads`` sets torch's CPU threads (default: torch's choice, one per core).
    """
    for name, value, low in (
        ("--port", port, 0),
        ("--context", context, 16),
        ("--max-tokens", max_tokens, 1),
        ("--max-batch", max_batch, 1),
        ("--max-queue", max_queue, 0),
        ("--max-body-bytes", max_body_bytes, 1024),
        ("--threads", threads or 1, 1),
    ):
        if value < low or (name == "--port" and value > 65535):
            raise ValueError(f"{name} {value} is out of range; it must be at least {low}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    if host not in LOOPBACK:
        _log.warn_once(
            "serve-public",
            f"listening on {host}: anyone who can reach this machine can use the model (there is no authentication)",
        )
    models = load_models(
        path,
        adapters,
        load_in_4bit=load_in_4bit,
        template=template,
        context=context,
        max_batch=max_batch,
        max_queue=max_queue,
    )
    limits = Limits(max_body_bytes=max_body_bytes, max_tokens=max_tokens, context=context)
    server = start(models, host, port, limits=limits, cors_origin=cors_origin)
    h, p = server.server_address[:2]
    shown = f"[{h}]" if ":" in str(h) else h
    print(
        f"hizli serve: {', '.join(models)} at http://{shown}:{p}/v1 (chat page: http://{shown}:{p}/)", file=sys.stderr
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        print("\nstopping", file=sys.stderr)
    finally:
        server.shutdown()
        for engine in {id(m.engine): m.engine for m in models.values()}.values():
            engine.close()
    return 0
