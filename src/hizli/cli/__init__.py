"""``hizli`` command line: a thin layer over the same functions the Python API uses.

One module per subcommand, each with ``add_parser(subparsers)`` and ``run(args) -> int``: parse the
arguments, turn them into typed settings, call the library. Errors a user can fix become one
``hizli: error: ...`` line and exit code 2 (1 for a run stopped by out-of-memory or a NaN loss).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from types import ModuleType
from typing import Sequence

from hizli.cli import bench, chat, data, export, serve, templates, train
from hizli.cli import eval as eval_cmd

EXAMPLES = """examples:
  hizli train configs/demo-cpu.yaml                  the CPU demo: train, report, save, answer
  hizli train configs/reference.yaml --set train.max_steps=100
  hizli train configs/demo-cpu.yaml --resume         continue its last checkpoint (raise train.max_steps to extend)
  hizli chat outputs/demo-cpu/lora_model --prompt "Continue the Fibonacci sequence: 1, 1, 2, 3, 5, 8,"
  hizli data check data.jsonl --template llama-3.1 --map-role robot=assistant
  hizli eval outputs/demo-cpu/lora_model --data held_out.jsonl --generate 3 --out eval/
  hizli export outputs/demo-cpu/lora_model --to gguf --quant q8_0 --out exported/
  hizli templates llama-3.1
  hizli serve outputs/demo-cpu/lora_model            OpenAI-compatible API + chat page on 127.0.0.1:8000
"""

COMMANDS: dict[str, ModuleType] = {
    "train": train,
    "chat": chat,
    "eval": eval_cmd,
    "export": export,
    "serve": serve,
    "bench": bench,
    "data": data,
    "templates": templates,
}


def build_parser() -> argparse.ArgumentParser:
    from hizli import __version__

    p = argparse.ArgumentParser(
        prog="hizli",
        description="Fast LoRA/QLoRA fine-tuning of chat models (the Unsloth recipe, on GPU or CPU).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"hizli {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from hizli import _log

    _log.setup()
    parser = build_parser()
    args = parser.parse_args(argv)
    # the command as typed, for benchmark records (argv is given when called from Python)
    args.command_line = shlex.join(["hizli", *(sys.argv[1:] if argv is None else argv)])
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "data" and getattr(args, "data_command", None) is None:
        parser.parse_args(["data", "--help"])
    try:
        return int(COMMANDS[args.command].run(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"hizli: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from hizli.train.context import NonFiniteLossError
        from hizli.train.oom import GPUOutOfMemoryError

        if not isinstance(e, (GPUOutOfMemoryError, NonFiniteLossError)):
            raise
        print(f"hizli: error: {e}", file=sys.stderr)  # the message says what happened and what to change
        return 1
