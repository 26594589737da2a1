"""``hizli`` command line: a thin layer over the same functions the Python API uses."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

EXAMPLES = """examples:
  hizli train configs/demo-cpu.yaml                  the CPU demo: train, report, save, answer
  hizli train configs/reference.yaml --set train.max_steps=100
  hizli chat lora_model --prompt "Continue the Fibonacci sequence: 1, 1, 2, 3, 5, 8,"
  hizli data check data.jsonl --template llama-3.1
  hizli export lora_model --to gguf --quant q8_0 --out exported/
  hizli templates llama-3.1
  hizli serve lora_model                             OpenAI-compatible API + chat page on 127.0.0.1:8000
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hizli",
        description="Fast LoRA/QLoRA fine-tuning of chat models (the Unsloth recipe, on GPU or CPU).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from hizli import __version__

    p.add_argument("--version", action="version", version=f"hizli {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune a model from a recipe YAML",
                       description="Train LoRA adapters as a recipe file says. Without a file, the CPU demo "
                                   "recipe runs (embedded model, packaged data). The resolved recipe is saved "
                                   "beside the outputs as recipe.yaml.")
    t.add_argument("recipe", nargs="?", help="recipe YAML (configs/reference.yaml, configs/demo-cpu.yaml, ...)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one recipe value, e.g. --set train.max_steps=10 (repeatable)")
    t.add_argument("--resume", nargs="?", const="true", default=None, metavar="CHECKPOINT",
                   help="resume from the latest checkpoint in the output folder, or from CHECKPOINT")
    t.add_argument("--dry-run", action="store_true",
                   help="validate the recipe and print it resolved, without loading anything")

    c = sub.add_parser("chat", help="talk to a model, adapter folder or GGUF file",
                       description="Chat through the model's chat template. Interactive by default "
                                   "(/reset clears the history, /exit quits); --prompt answers once and exits.")
    c.add_argument("path", help="adapter folder (lora_model), merged folder, .gguf file, hub id, or "
                                "an embedded model name (smollm2-135m-instruct)")
    c.add_argument("--prompt", help="answer this one message and exit")
    c.add_argument("--system", help="system message to start the conversation with")
    c.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    c.add_argument("--temperature", type=float, default=0.0,
                   help="0 answers greedily, reproducibly (default); the recipe samples with 1.5")
    c.add_argument("--min-p", type=float, default=0.1, help="min-p sampling cut-off when temperature > 0")
    c.add_argument("--template", help="chat template name to use instead of the tokenizer's own")
    c.add_argument("--load-in-4bit", action="store_true", help="load the base weights in 4-bit (NF4)")
    c.add_argument("--max-seq-length", type=int, default=2048)

    e = sub.add_parser("export", help="merge an adapter into its base, or write GGUF for llama.cpp/Ollama",
                       description="Export a trained adapter folder as merged weights or a GGUF file.")
    e.add_argument("path", help="adapter folder (e.g. lora_model)")
    e.add_argument("--to", required=True, choices=["merged", "merged-4bit", "gguf"], help="what to write")
    e.add_argument("--quant", default="q8_0",
                   help="GGUF type: f32, f16, bf16, q8_0 (built in); q4_k_m, q5_k_m, ... need llama-quantize")
    e.add_argument("--out", required=True, help="output folder (must be empty or new unless --force)")
    e.add_argument("--push", metavar="ORG/NAME", help="also upload to the Hugging Face Hub (private)")
    e.add_argument("--token", help="Hugging Face token (default: HF_TOKEN from the environment)")
    e.add_argument("--force", action="store_true", help="write into a non-empty output folder")

    b = sub.add_parser("bench", help="measure training speed and memory on this GPU",
                       description="Run the recipe's training loop on random weights of a named model shape "
                                   "and report steady tokens/s, peak memory, time to first step and MFU.")
    b.add_argument("--model", default="llama-3.2-3b",
                   help="shape name (llama-3.2-1b, llama-3.2-3b, llama-3.1-8b, qwen2.5-3b, tiny) or config path")
    b.add_argument("--tokenizer", help="tokenizer folder or tokenizer.json, saved into a model folder that has "
                                       "none (default: the embedded model's); a folder's own tokenizer is used as is")
    b.add_argument("--data", help="conversations file (.jsonl); default: the packaged sample")
    b.add_argument("--steps", type=int, default=40)
    b.add_argument("--batch", type=int, default=2)
    b.add_argument("--grad-accum", type=int, default=4)
    b.add_argument("--seq-len", type=int, default=2048)
    b.add_argument("--no-4bit", action="store_true", help="bf16 base weights instead of NF4")
    b.add_argument("--lever", action="append", default=[], metavar="NAME=on|off",
                   help="turn one speed lever on or off (padding_free, fused_ce, kernels, merge_micro, "
                        "checkpointing, cast_cache); repeatable")
    b.add_argument("--json", help="write the result here as JSON")
    b.add_argument("--max-memory-gib", type=float, help="memory cap for the memory plan")
    b.add_argument("--profile", metavar="DIR", help="profile optimizer steps 11-13 into DIR/profile.txt")

    d = sub.add_parser("data", help="check a dataset before training")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    dc = dsub.add_parser("check", help="report every problem in a data file at once",
                         description="Read the whole file and list every unusable row with its line number "
                                     "(invalid JSON, no conversation, unknown roles, empty turns, no assistant "
                                     "turn, over-long rows, rows with no trained token), then token-length "
                                     "statistics. Exit code 1 if any row is unusable, else 0.")
    dc.add_argument("file", help=".jsonl, .json or .parquet file (ShareGPT, OpenAI messages or Alpaca schema)")
    dc.add_argument("--template", default="llama-3.1", help="chat template to render with (default llama-3.1)")
    dc.add_argument("--max-seq-length", type=int, default=2048)
    dc.add_argument("--tokenizer", help="tokenizer to count tokens with (folder, tokenizer.json or model name); "
                                        "default: the embedded model's")
    dc.add_argument("--schema", default="auto", choices=["auto", "sharegpt", "messages", "alpaca"])
    dc.add_argument("--responses-only", action="store_true",
                    help="count trained tokens as in training on assistant turns only")

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a chat page",
                        description="Serve a model over the OpenAI API (/v1/chat/completions, /v1/completions, "
                                    "/v1/models, /health) with continuous batching, and a chat page at /. "
                                    "Listens on loopback only unless --host says otherwise.")
    sv.add_argument("path", help="adapter folder (served on its 4-bit base, not merged), merged folder, .gguf "
                                 "file, hub id, or an embedded model name (smollm2-135m-instruct)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="NAME=PATH",
                    help="also serve this LoRA adapter on the same base under model name NAME (repeatable)")
    sv.add_argument("--template", help="chat template name to use instead of the tokenizer's own")
    sv.add_argument("--load-in-4bit", choices=["auto", "on", "off"], default="auto",
                    help="NF4 base weights; auto: on for an adapter folder's base, off otherwise")
    sv.add_argument("--context", type=int, default=2048, help="longest prompt + answer in tokens (default 2048)")
    sv.add_argument("--max-tokens", type=int, default=4096, help="largest max_tokens a request may ask for")
    sv.add_argument("--max-batch", type=int, default=32, help="most requests decoded together (default 32)")
    sv.add_argument("--max-queue", type=int, default=256,
                    help="most requests waiting for a slot; more get 503 at once (default 256)")
    sv.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024, help="largest request body (default 2 MiB)")
    sv.add_argument("--threads", type=int, help="CPU threads for torch (default: one per core)")
    sv.add_argument("--cors-origin", help="allow browser pages from this origin (e.g. http://localhost:3000); "
                                          "default: no CORS headers")

    tp = sub.add_parser("templates", help="list chat templates, or render one",
                        description="Without NAME, list the registered chat templates; with NAME, render a "
                                    "sample conversation through it.")
    tp.add_argument("name", nargs="?")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from hizli import _log

    _log.setup()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "data" and getattr(args, "data_command", None) is None:
        parser.parse_args(["data", "--help"])
    handler = {
        "train": _train, "chat": _chat, "export": _export, "bench": _bench,
        "data": _data, "templates": _templates, "serve": _serve,
    }[args.command]
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"hizli: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from hizli.train.oom import GPUOutOfMemoryError
        from hizli.train.trainer import NonFiniteLossError

        if not isinstance(e, (GPUOutOfMemoryError, NonFiniteLossError)):
            raise
        print(f"hizli: error: {e}", file=sys.stderr)  # the message says what happened and what to change
        return 1


def _train(args) -> int:
    from hizli.train.run import run_recipe_cli

    return run_recipe_cli(args.recipe, args.overrides, resume=args.resume, dry_run=args.dry_run)


def _chat(args) -> int:
    from hizli.models.chat import run_chat

    return run_chat(args)


def _export(args) -> int:
    from hizli.export.api import export_cli

    return export_cli(args)


def _bench(args) -> int:
    from hizli.bench.run import bench_cli

    return bench_cli(args)


def _data(args) -> int:
    from hizli.data.check import check_cli

    return check_cli(args)


def _serve(args) -> int:
    from hizli.serve.app import parse_adapters, serve

    return serve(args.path, args.host, args.port, adapters=parse_adapters(args.adapters),
                 load_in_4bit={"auto": None, "on": True, "off": False}[args.load_in_4bit], template=args.template,
                 context=args.context, max_tokens=args.max_tokens, max_batch=args.max_batch, max_queue=args.max_queue,
                 max_body_bytes=args.max_body_bytes, cors_origin=args.cors_origin, threads=args.threads)


def _templates(args) -> int:
    from hizli.data.templates import templates_cli

    return templates_cli(args)


if __name__ == "__main__":
    sys.exit(main())
