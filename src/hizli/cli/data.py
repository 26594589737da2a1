"""``hizli data check FILE``: every problem of a data file at once, with line numbers."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
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


def run(args: argparse.Namespace) -> int:
    from hizli.data.check import check_file

    return check_file(args.file, template=args.template, max_seq_length=args.max_seq_length,
                      tokenizer=args.tokenizer, schema=args.schema, responses_only=args.responses_only)
