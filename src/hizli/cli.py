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

    _add_bench_parser(sub)

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
        "data": _data, "templates": _templates,
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


BENCH_EXAMPLES = """suites (without one: recipe, so `hizli bench --model llama-3.2-3b` works as before):
  hizli bench recipe --model llama-3.2-3b            the recipe's loop on random weights of a shape (GPU)
  hizli bench recipe --cpu-demo                      the CPU demo recipe (configs/demo-cpu.yaml) measured
  hizli bench compare --steps 20                     hizli next to the peers at matched memory (GPU)
  hizli bench longest --caps 8,whole                 longest trainable sequence at batch 1 (GPU)
  hizli bench kernels [--counts | --compile]         kernels at the recipe's shapes
add --results benchmarks/results to append the record(s) to benchmarks/results/<suite>.jsonl
"""


def _add_recipe_options(b: argparse.ArgumentParser) -> None:
    b.add_argument("--model", default="llama-3.2-3b",
                   help="shape name (llama-3.2-1b, llama-3.2-3b, llama-3.1-8b, qwen2.5-3b, tiny; random weights), "
                        "config path, or a model to load as is (e.g. smollm2-135m-instruct, a folder)")
    b.add_argument("--cpu-demo", action="store_true",
                   help="the demo recipe's settings (configs/demo-cpu.yaml: smollm2-135m-instruct, seq 512, "
                        "20 steps, smollm2 template, packaged sample); other options below are ignored but --steps")
    b.add_argument("--tokenizer", help="tokenizer folder or tokenizer.json, saved into a model folder that has "
                                       "none (default: the embedded model's); a folder's own tokenizer is used as is")
    b.add_argument("--data", help="conversations file (.jsonl); default: the packaged sample")
    b.add_argument("--steps", type=int, default=None, help="optimizer steps (default 40; --cpu-demo: 20)")
    b.add_argument("--batch", type=int, default=2)
    b.add_argument("--grad-accum", type=int, default=4)
    b.add_argument("--seq-len", type=int, default=2048)
    b.add_argument("--no-4bit", action="store_true", help="bf16 base weights instead of NF4")
    b.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 where the GPU has it")
    b.add_argument("--template", default="llama-3.1", help="chat template (default llama-3.1)")
    b.add_argument("--lever", action="append", default=[], metavar="NAME=on|off",
                   help="turn one speed lever on or off (padding_free, fused_ce, kernels, merge_micro, "
                        "checkpointing, cast_cache); repeatable")
    b.add_argument("--max-memory-gib", type=float, help="memory cap for the memory plan")
    b.add_argument("--profile", metavar="DIR", help="profile optimizer steps 11-13 into DIR/profile.txt")
    b.add_argument("--json", help="write the full result (record and memory plan) here as JSON")
    b.add_argument("--results", metavar="DIR", help="append the record to DIR/recipe.jsonl")
    b.add_argument("--note", help="a note stored with the record")


def _add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="measure speed and memory (recipe, compare, longest, kernels)",
                       description="Benchmarks as the project runs them; every figure is written as a record "
                                   "with its device, commit, settings and command (benchmarks/results/README.md).",
                       epilog=BENCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_recipe_options(b)
    suites = b.add_subparsers(dest="suite", metavar="SUITE")
    _add_recipe_options(suites.add_parser("recipe", help="the recipe's training loop on a named shape"))
    c = suites.add_parser("compare", help="hizli next to its peers on one GPU, at matched memory")
    c.add_argument("--shape", default="llama-3.2-3b")
    c.add_argument("--steps", type=int, default=20)
    c.add_argument("--systems", help="comma-separated, in order (default: all; see hizli.bench.compare.SYSTEMS)")
    c.add_argument("--data", default=".gpu-bundle/data/sharegpt.jsonl")
    c.add_argument("--tokenizer", default=".gpu-bundle/tok/tokenizer.json")
    c.add_argument("--work", default="/tmp/hizli-compare")
    c.add_argument("--t4-cap-gib", type=float, default=15.0)
    c.add_argument("--t4-max-tries", type=int, default=6, help="Unsloth fp16 runs in the batch search")
    c.add_argument("--hizli-args", default="", help="extra arguments for every hizli run (e.g. '--lever x=off')")
    c.add_argument("--timeout", type=int, default=400, help="seconds per run")
    c.add_argument("--results", metavar="DIR", help="append the records to DIR/compare.jsonl")
    lo = suites.add_parser("longest", help="longest trainable sequence at batch 1 under a memory cap")
    lo.add_argument("--systems", default="hizli,unsloth")
    lo.add_argument("--caps", default="8,whole", help="GiB numbers and/or 'whole', comma-separated")
    lo.add_argument("--model", default="/tmp/hizli-compare/llama-3.2-3b",
                    help="model folder; made from --shape and --tokenizer if it holds no tokenizer")
    lo.add_argument("--shape", default="llama-3.2-3b")
    lo.add_argument("--tokenizer", default=".gpu-bundle/tok/tokenizer.json")
    lo.add_argument("--data", default=".gpu-bundle/data/sharegpt.jsonl")
    lo.add_argument("--start", type=int, default=4096)
    lo.add_argument("--max-len", type=int, help="default: the model's max_position_embeddings")
    lo.add_argument("--resolution", type=int, default=1024)
    lo.add_argument("--trial-timeout", type=float, default=90.0,
                    help="a successful trial slower than this (s) stops the search upwards")
    lo.add_argument("--search-budget", type=float, help="seconds of searching per (system, cap)")
    lo.add_argument("--recheck", choices=("auto", "always", "never"), default="auto")
    lo.add_argument("--free-memory", choices=("cap", "card"), default="cap",
                    help="under a cap, what torch.cuda.mem_get_info reports: a card of the cap's size, or the real one")
    lo.add_argument("--worker-timeout", type=float, default=900.0)
    lo.add_argument("--work", default="/tmp/hizli-compare")
    lo.add_argument("--results", metavar="DIR", help="append the records to DIR/longest.jsonl")
    k = suites.add_parser("kernels", help="hizli's kernels at the recipe's shapes")
    k.add_argument("--tokens", type=int, default=12_000, help="tokens per step (sequences scaled to it)")
    k.add_argument("--bandwidth", type=float, default=3.0e12, help="peak bytes/s for the floors")
    k.add_argument("--flops", type=float, default=790e12, help="peak bf16 FLOP/s for the floors")
    k.add_argument("--skip", nargs="*", default=[], help="ops or attention candidates to leave out")
    k.add_argument("--quick", action="store_true", help="shorter timing windows")
    k.add_argument("--counts", action="store_true", help="the FLOP and byte counts only (no GPU)")
    k.add_argument("--compile", action="store_true", help="compile every kernel for sm_90, report registers/spills")
    k.add_argument("--json", help="with --compile: write the table here")
    k.add_argument("--results", metavar="DIR", help="append the records to DIR/kernels.jsonl")


def _bench(args) -> int:
    suite = args.suite or "recipe"
    if suite == "recipe":
        from dataclasses import replace

        from hizli.bench.recipe import RecipeBench, bench_recipe, cpu_demo, parse_levers

        if args.cpu_demo:
            bench = cpu_demo(args.steps)
        else:
            bench = RecipeBench(model=args.model, tokenizer=args.tokenizer, data=args.data, batch=args.batch,
                                grad_accum=args.grad_accum, seq_len=args.seq_len, load_in_4bit=not args.no_4bit,
                                dtype=args.dtype, chat_template=args.template, max_memory_gib=args.max_memory_gib,
                                levers=parse_levers(args.lever), profile_dir=args.profile)
            bench = replace(bench, steps=args.steps) if args.steps else bench
        return bench_recipe(bench, json_path=args.json, results_dir=args.results, note=args.note)
    if suite == "compare":
        import shlex

        from hizli.bench.compare import SYSTEMS, CompareBench, bench_compare

        systems = tuple(s.strip() for s in args.systems.split(",") if s.strip()) if args.systems else SYSTEMS
        return bench_compare(CompareBench(shape=args.shape, steps=args.steps, systems=systems, data=args.data,
                                          tokenizer=args.tokenizer, work=args.work, t4_cap_gib=args.t4_cap_gib,
                                          t4_max_tries=args.t4_max_tries, hizli_args=shlex.split(args.hizli_args),
                                          timeout_s=args.timeout), results_dir=args.results)
    if suite == "longest":
        from hizli.bench.longest.run import LongestBench, bench_longest
        from hizli.bench.longest.search import parse_caps

        systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
        return bench_longest(LongestBench(
            systems=systems, caps=tuple(parse_caps(args.caps)), model=args.model, shape=args.shape,
            tokenizer=args.tokenizer, data=args.data, start=args.start, max_len=args.max_len,
            resolution=args.resolution, trial_timeout=args.trial_timeout, search_budget=args.search_budget,
            recheck=args.recheck, free_memory=args.free_memory, worker_timeout=args.worker_timeout,
            work=args.work), results_dir=args.results)
    if args.compile:
        from hizli.bench.kernels_compile import bench_compile

        return bench_compile(args.json)
    from hizli.bench.kernels import KernelsBench, bench_kernels

    return bench_kernels(KernelsBench(tokens=args.tokens, bandwidth=args.bandwidth, flops=args.flops,
                                      skip=tuple(args.skip), quick=args.quick, counts_only=args.counts),
                         results_dir=args.results)


def _data(args) -> int:
    from hizli.data.check import check_cli

    return check_cli(args)


def _templates(args) -> int:
    from hizli.data.templates import templates_cli

    return templates_cli(args)


if __name__ == "__main__":
    sys.exit(main())
