"""``hizli train RECIPE [--set key=value ...] [--resume [CHECKPOINT]] [--dry-run] [--gpus N]
[--parallel ddp|fsdp] [--keep-global-batch] [--reshard]``.

``--gpus N`` starts ``torchrun --nproc-per-node N`` over this same command (one process per GPU);
started by torchrun (or accelerate) directly, the command trains as one of its ranks.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train",
        help="fine-tune a model from a recipe YAML",
        description="Train LoRA adapters as a recipe file says. The resolved recipe is saved "
        "beside the outputs as recipe.yaml.",
    )
    t.add_argument("recipe", nargs="?", help="recipe YAML (configs/reference.yaml, configs/demo-cpu.yaml, ...)")
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one recipe value, e.g. --set train.max_steps=10 (repeatable)",
    )
    t.add_argument(
        "--resume",
        nargs="?",
        const="true",
        default=None,
        metavar="CHECKPOINT",
        help="resume from the latest checkpoint in the output folder, or from CHECKPOINT",
    )
    t.add_argument(
        "--dry-run", action="store_true", help="validate the recipe and print it resolved, without loading anything"
    )
    t.add_argument(
        "--gpus",
        type=int,
        default=None,
        metavar="N",
        help="train on N GPUs of this host (starts torchrun --nproc-per-node N for you)",
    )
    t.add_argument(
        "--parallel",
        choices=("ddp", "fsdp"),
        default=None,
        help="with several processes: ddp (each GPU holds the model; default) or fsdp (the frozen base "
        "weights are sharded over the GPUs, for models one GPU cannot hold)",
    )
    t.add_argument(
        "--keep-global-batch",
        action="store_true",
        help="divide gradient_accumulation_steps by the number of GPUs: the same optimizer steps on 1 or N",
    )
    t.add_argument(
        "--reshard", action="store_true", help="allow resuming a checkpoint written by another number of GPUs"
    )


def run(args: argparse.Namespace) -> int:
    from hizli.run import run_recipe_cli

    overrides = list(args.overrides)
    if args.parallel:
        overrides.append(f"train.parallel={args.parallel}")
    if args.keep_global_batch:
        overrides.append("train.keep_global_batch=true")
    if args.reshard:
        overrides.append("train.reshard=true")
    if args.gpus is not None and "LOCAL_RANK" not in os.environ:
        return _launch(args.gpus, shlex.split(args.command_line)[1:])
    return run_recipe_cli(args.recipe, overrides, resume=args.resume, dry_run=args.dry_run)


def _launch(gpus: int, argv: list[str]) -> int:
    """Run this command again under torchrun, one process per GPU (``--gpus`` is kept: each rank
    sees LOCAL_RANK and trains)."""
    import torch

    if gpus < 1:
        raise ValueError(f"--gpus {gpus}: give a number of GPUs >= 1")
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > have:
        raise ValueError(
            f"--gpus {gpus}: this host has {have} GPU(s). "
            + (
                f"Use --gpus {have} at most"
                if have
                else "On CPUs, start processes with torchrun --nproc-per-node N -m hizli.cli train ..."
            )
        )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]
    command += ["-m", "hizli.cli", *argv]
    return subprocess.call(command)
