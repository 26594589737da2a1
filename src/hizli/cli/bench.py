"""``hizli bench [SUITE]``: speed and memory as the project measures them (recipe, compare, longest, kernels)."""

from __future__ import annotations

import argparse

from hizli.bench.recipe import LEVERS, LEVERS_OFF_BY_DEFAULT

BENCH_EXAMPLES = """suites (without one: recipe, so `hizli bench --model llama-3.2-3b` works as before):
  hizli bench recipe --model llama-3.2-3b            the recipe's loop on random weights of a shape (GPU)
  hizli bench recipe --cpu-demo                      the CPU demo recipe (configs/demo-cpu.yaml) measured
  torchrun --nproc-per-node 2 -m hizli.cli bench recipe --model llama-3.1-70b --parallel fsdp
                                                     sharded over 2 GPUs (figures per GPU and for the group)
  hizli bench compare --steps 20                     hizli next to the peers at matched memory (GPU)
  hizli bench longest --caps 8,whole                 longest trainable sequence at batch 1 (GPU)
  hizli bench kernels [--counts | --compile]         kernels at the recipe's shapes
  hizli bench serve --clients 1,16,32                concurrent streaming clients against a running server
add --results benchmarks/results to append the record(s) to benchmarks/results/<suite>.jsonl
"""


def _add_recipe_options(b: argparse.ArgumentParser) -> None:
    b.add_argument(
        "--model",
        default="llama-3.2-3b",
        help="shape name (llama-3.2-1b, llama-3.2-3b, llama-3.1-8b, qwen2.5-3b, tiny; random weights), "
        "config path, or a model to load as is (e.g. smollm2-135m-instruct, a folder)",
    )
    b.add_argument(
        "--cpu-demo",
        action="store_true",
        help="the demo recipe's settings (configs/demo-cpu.yaml: smollm2-135m-instruct, seq 512, "
        "20 steps, smollm2 template, packaged sample); other options below are ignored but --steps",
    )
    b.add_argument(
        "--tokenizer",
        help="tokenizer folder or tokenizer.json, saved into a model folder that has "
        "none (default: the embedded model's); a folder's own tokenizer is used as is",
    )
    b.add_argument("--data", help="conversations file (.jsonl); default: the packaged sample")
    b.add_argument("--steps", type=int, default=None, help="optimizer steps (default 40; --cpu-demo: 20)")
    b.add_argument("--batch", type=int, default=2)
    b.add_argument("--grad-accum", type=int, default=4)
    b.add_argument("--seq-len", type=int, default=2048)
    b.add_argument("--no-4bit", action="store_true", help="bf16 base weights instead of NF4")
    b.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 where the GPU has it")
    b.add_argument("--template", default="llama-3.1", help="chat template (default llama-3.1)")
    b.add_argument(
        "--lever",
        action="append",
        default=[],
        metavar="NAME=on|off",
        help=f"turn one speed lever on or off ({', '.join(LEVERS)}; off by default: "
        f"{', '.join(LEVERS_OFF_BY_DEFAULT)}); repeatable",
    )
    b.add_argument("--max-memory-gib", type=float, help="memory cap for the memory plan")
    b.add_argument(
        "--parallel",
        choices=("ddp", "fsdp"),
        help="under torchrun: ddp (each GPU holds the model) or fsdp (the base sharded; a shape is then "
        "built in place, each GPU quantizing only its own rows)",
    )
    b.add_argument("--profile", metavar="DIR", help="profile optimizer steps 11-13 into DIR/profile.txt")
    b.add_argument("--json", help="write the full result (record and memory plan) here as JSON")
    b.add_argument("--results", metavar="DIR", help="append the record to DIR/recipe.jsonl")
    b.add_argument("--note", help="a note stored with the record")


def add_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "bench",
        help="measure speed and memory (recipe, compare, longest, kernels)",
        description="Benchmarks as the project runs them; every figure is written as a record "
        "with its device, commit, settings and command (benchmarks/results/README.md).",
        epilog=BENCH_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    c.add_argument(
        "--t4-first-batch",
        type=int,
        help="batch the search tries first (default: from a seed mode's peak measured in this compare, else 1)",
    )
    c.add_argument("--hizli-args", default="", help="extra arguments for every hizli run (e.g. '--lever x=off')")
    c.add_argument("--timeout", type=int, default=400, help="seconds per run")
    c.add_argument("--results", metavar="DIR", help="append the records to DIR/compare.jsonl")
    lo = suites.add_parser("longest", help="longest trainable sequence at batch 1 under a memory cap")
    lo.add_argument("--systems", default="hizli,unsloth")
    lo.add_argument("--caps", default="8,whole", help="GiB numbers and/or 'whole', comma-separated")
    lo.add_argument(
        "--model",
        default="/tmp/hizli-compare/llama-3.2-3b",
        help="model folder; made from --shape and --tokenizer if it holds no tokenizer",
    )
    lo.add_argument("--shape", default="llama-3.2-3b")
    lo.add_argument("--tokenizer", default=".gpu-bundle/tok/tokenizer.json")
    lo.add_argument("--data", default=".gpu-bundle/data/sharegpt.jsonl")
    lo.add_argument("--start", type=int, default=4096)
    lo.add_argument("--max-len", type=int, help="default: the model's max_position_embeddings")
    lo.add_argument("--resolution", type=int, default=1024)
    lo.add_argument(
        "--trial-timeout",
        type=float,
        default=90.0,
        help="a successful trial slower than this (s) stops the search upwards",
    )
    lo.add_argument("--search-budget", type=float, help="seconds of searching per (system, cap)")
    lo.add_argument("--recheck", choices=("auto", "always", "never"), default="auto")
    lo.add_argument(
        "--free-memory",
        choices=("cap", "card"),
        default="cap",
        help="under a cap, what torch.cuda.mem_get_info reports: a card of the cap's size, or the real one",
    )
    lo.add_argument("--worker-timeout", type=float, default=900.0)
    lo.add_argument("--work", default="/tmp/hizli-compare")
    lo.add_argument("--results", metavar="DIR", help="append the records to DIR/longest.jsonl")
    sv = suites.add_parser("serve", help="N concurrent streaming chat clients against an OpenAI-compatible server")
    sv.add_argument("--url", default="http://127.0.0.1:8000")
    sv.add_argument("--model", default="smollm2-135m-instruct")
    sv.add_argument("--clients", default="1,16,32", help="comma-separated concurrency levels")
    sv.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    sv.add_argument("--max-tokens", type=int, default=64)
    sv.add_argument("--temperature", type=float, default=0.0)
    sv.add_argument("--label", default="", help="name of the server under test, stored with the results")
    sv.add_argument("--json", help="append the results here (one JSON object per level)")
    sv.add_argument("--results", metavar="DIR", help="append schema records to DIR/serve.jsonl (system: --label)")
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


def run(args: argparse.Namespace) -> int:
    suite = args.suite or "recipe"
    if suite == "recipe":
        from dataclasses import replace

        from hizli.bench.recipe import RecipeBench, bench_recipe, cpu_demo, parse_levers

        if args.cpu_demo:
            bench = cpu_demo(args.steps)
        else:
            bench = RecipeBench(
                model=args.model,
                tokenizer=args.tokenizer,
                data=args.data,
                batch=args.batch,
                grad_accum=args.grad_accum,
                seq_len=args.seq_len,
                load_in_4bit=not args.no_4bit,
                dtype=args.dtype,
                chat_template=args.template,
                max_memory_gib=args.max_memory_gib,
                levers=parse_levers(args.lever),
                profile_dir=args.profile,
                parallel=args.parallel,
            )
            bench = replace(bench, steps=args.steps) if args.steps else bench
        return bench_recipe(bench, json_path=args.json, results_dir=args.results, note=args.note)
    if suite == "compare":
        import shlex

        from hizli.bench.compare import SYSTEMS, CompareBench, bench_compare

        systems = tuple(s.strip() for s in args.systems.split(",") if s.strip()) if args.systems else SYSTEMS
        return bench_compare(
            CompareBench(
                shape=args.shape,
                steps=args.steps,
                systems=systems,
                data=args.data,
                tokenizer=args.tokenizer,
                work=args.work,
                t4_cap_gib=args.t4_cap_gib,
                t4_max_tries=args.t4_max_tries,
                t4_first_batch=args.t4_first_batch,
                hizli_args=shlex.split(args.hizli_args),
                timeout_s=args.timeout,
            ),
            results_dir=args.results,
        )
    if suite == "serve":
        from hizli.serve.load import measure

        levels = [int(x) for x in args.clients.split(",") if x.strip()]
        rows = measure(
            args.url,
            model=args.model,
            levels=levels,
            requests=args.requests,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            label=args.label,
            json_path=args.json,
        )
        if args.results:
            from hizli.bench import results
            from hizli.serve.load import serve_records

            records = serve_records(
                rows,
                system=args.label or "server",
                requests=args.requests,
                temperature=args.temperature,
                command=args.command_line,
            )
            print(f"records appended to {results.append(args.results, records)}")
        return 0
    if suite == "longest":
        from hizli.bench.longest.run import LongestBench, bench_longest
        from hizli.bench.longest.search import parse_caps

        systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
        return bench_longest(
            LongestBench(
                systems=systems,
                caps=tuple(parse_caps(args.caps)),
                model=args.model,
                shape=args.shape,
                tokenizer=args.tokenizer,
                data=args.data,
                start=args.start,
                max_len=args.max_len,
                resolution=args.resolution,
                trial_timeout=args.trial_timeout,
                search_budget=args.search_budget,
                recheck=args.recheck,
                free_memory=args.free_memory,
                worker_timeout=args.worker_timeout,
                work=args.work,
            ),
            results_dir=args.results,
        )
    if args.compile:
        from hizli.bench.kernels_compile import bench_compile

        return bench_compile(args.json)
    from hizli.bench.kernels import KernelsBench, bench_kernels

    return bench_kernels(
        KernelsBench(
            tokens=args.tokens,
            bandwidth=args.bandwidth,
            flops=args.flops,
            skip=tuple(args.skip),
            quick=args.quick,
            counts_only=args.counts,
        ),
        results_dir=args.results,
    )
