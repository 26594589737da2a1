"""``hizli eval PATH --data FILE``: loss, perplexity and token count of a model on held-out conversations."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "eval",
        help="loss and perplexity of a model on held-out conversations",
        description="Score a model on a file of conversations with the training loss itself "
        "(rendered and labelled as in training): mean loss per trained token, "
        "perplexity, token count. --generate N also answers the first N "
        "conversations greedily (prompt: the turns before the last assistant turn).",
    )
    ev.add_argument(
        "path",
        help="adapter folder (lora_model), merged folder, .gguf file, or an embedded model "
        "name (smollm2-135m-instruct)",
    )
    ev.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help=".jsonl, .json or .parquet file of conversations, or hizli:sharegpt (the packaged sample)",
    )
    ev.add_argument(
        "--template",
        help="chat template to render with (default: the tokenizer's own; an adapter "
        "folder keeps the one it was trained with)",
    )
    ev.add_argument("--max-seq-length", type=int, default=2048, help="rows are cut to this many tokens (default 2048)")
    ev.add_argument(
        "--responses-only",
        action="store_true",
        help="score assistant turns only (as training with train_on_responses_only)",
    )
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.add_argument(
        "--generate",
        type=int,
        default=0,
        metavar="N",
        help="also answer the first N conversations greedily (written to OUT/samples.jsonl)",
    )
    ev.add_argument("--max-new-tokens", type=int, default=256, help="longest generated answer (default 256)")
    ev.add_argument("--out", metavar="DIR", help="write eval.json (and samples.jsonl) into DIR")
    ev.add_argument("--force", action="store_true", help="replace eval.json / samples.jsonl in DIR")
    ev.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    ev.add_argument(
        "--load-in-4bit",
        action="store_true",
        help="load the base weights in 4-bit (NF4), as an adapter trained with load_in_4bit was",
    )


def run(args: argparse.Namespace) -> int:
    from hizli.train.eval_run import run_eval

    report = run_eval(
        args.path,
        args.data,
        template=args.template,
        max_seq_length=args.max_seq_length,
        train_on="assistant" if args.responses_only else "all",
        batch_size=args.batch_size,
        load_in_4bit=args.load_in_4bit,
        generate=args.generate,
        max_new_tokens=args.max_new_tokens,
        out_dir=args.out,
        overwrite=args.force,
        show_progress=sys.stderr.isatty(),
    )
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json else "\n".join(report.lines()))
    return 0
