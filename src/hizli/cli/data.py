"""``hizli data check FILE``: every problem of a data file at once, with line numbers."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("data", help="check a dataset before training")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    dc = dsub.add_parser(
        "check",
        help="report every problem in a data file at once",
        description="Read the whole file and list every unusable row with its line number "
        "(invalid JSON, no conversation, unknown roles, empty turns, no user or no "
        "assistant turn, a conversation that starts with the assistant or ends with "
        "the user, rows with no trained token; over-long rows as warnings), then "
        "token-length statistics. Exit code 1 if the file has no row or any row is "
        "unusable, else 0.",
    )
    dc.add_argument("file", help=".jsonl, .json or .parquet file (ShareGPT, OpenAI messages or Alpaca schema)")
    dc.add_argument("--template", default="llama-3.1", help="chat template to render with (default llama-3.1)")
    dc.add_argument("--max-seq-length", type=int, default=2048)
    dc.add_argument(
        "--tokenizer",
        help="tokenizer to count tokens with (folder, tokenizer.json or model name); default: the embedded model's",
    )
    dc.add_argument("--schema", default="auto", choices=["auto", "sharegpt", "messages", "alpaca"])
    dc.add_argument(
        "--responses-only", action="store_true", help="count trained tokens as in training on assistant turns only"
    )
    dc.add_argument(
        "--map-role",
        action="append",
        default=[],
        metavar="NAME=ROLE",
        help="treat role NAME as ROLE (user, assistant, system or tool), e.g. --map-role robot=assistant (repeatable)",
    )
    dc.add_argument(
        "--unknown-roles",
        default="error",
        choices=["error", "assistant", "user", "drop"],
        help="what other unknown roles become; default error (an unusable row). Training's default "
        "(the recipe's data.unknown_roles) is assistant",
    )


def run(args: argparse.Namespace) -> int:
    from hizli.data.check import check_file

    role_map = {}
    for item in args.map_role:
        name, sep, role = item.partition("=")
        if not sep or not name.strip() or not role.strip():
            raise ValueError(f"--map-role {item!r}: expected NAME=ROLE, e.g. --map-role robot=assistant")
        role_map[name.strip()] = role.strip()
    return check_file(
        args.file,
        template=args.template,
        max_seq_length=args.max_seq_length,
        tokenizer=args.tokenizer,
        schema=args.schema,
        responses_only=args.responses_only,
        unknown_roles=args.unknown_roles,
        role_map=role_map or None,
    )
