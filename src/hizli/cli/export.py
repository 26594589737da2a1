"""``hizli export PATH --to merged|merged-4bit|gguf --quant TYPE --out DIR [--push ORG/NAME] [--force]``."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "export",
        help="merge an adapter into its base, or write GGUF for llama.cpp/Ollama",
        description="Export a trained adapter folder as merged weights or a GGUF file.",
    )
    e.add_argument("path", help="adapter folder (e.g. outputs/demo-cpu/lora_model)")
    e.add_argument("--to", required=True, choices=["merged", "merged-4bit", "gguf"], help="what to write")
    e.add_argument(
        "--quant",
        default="q8_0",
        help="GGUF type: f32, f16, bf16, q8_0 (built in); q4_k_m, q5_k_m, ... need llama-quantize",
    )
    e.add_argument("--out", required=True, help="output folder (must be empty or new unless --force)")
    e.add_argument("--push", metavar="ORG/NAME", help="also upload to the Hugging Face Hub (private)")
    e.add_argument("--token", help="Hugging Face token (default: HF_TOKEN from the environment)")
    e.add_argument("--force", action="store_true", help="write into a non-empty output folder")


def run(args: argparse.Namespace) -> int:
    from hizli.export.command import export_adapter

    export_adapter(
        args.path, to=args.to, out=args.out, quant=args.quant, push=args.push, token=args.token, force=args.force
    )
    return 0
