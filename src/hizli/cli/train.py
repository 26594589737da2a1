"""``hizli train RECIPE [--set key=value ...] [--resume [CHECKPOINT]] [--dry-run]``."""

from __future__ import annotations

import argparse


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


def run(args: argparse.Namespace) -> int:
    from hizli.run import run_recipe_cli

    return run_recipe_cli(args.recipe, args.overrides, resume=args.resume, dry_run=args.dry_run)
