"""``hizli bench``: speed and memory of the recipe's training loop on this machine."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
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


def run(args: argparse.Namespace) -> int:
    from hizli.bench.run import run as run_bench

    result = run_bench(args)
    width = max(len(k) for k in result)
    for key in ("gpu", "model", "tokens_per_s", "overall_tokens_per_s", "peak_reserved_gib", "peak_allocated_gib",
                "first_step_s", "mfu", "measured_bf16_tflops"):
        print(f"{key:<{width}}  {result[key]}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"written to {args.json}")
    return 0
