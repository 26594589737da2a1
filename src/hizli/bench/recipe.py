"""``hizli bench recipe``: the recipe's training loop on a named model shape, measured.

Figures (DESIGN.md §5): steady tokens/s (trained tokens per second after the first steps), peak
reserved and allocated GPU memory (resident memory on a CPU), time from process start to the first
finished step (model load and data preparation included), useful MFU = tokens/s x (4 x matmul
params + attention FLOPs per token) / the measured bf16 matmul rate of this GPU, and the per-step loss.

A shape name (``llama-3.2-3b``, ...) trains random weights of that shape (speed and memory do not
depend on their values); any other name is loaded as the recipe would load it (an embedded model
such as ``smollm2-135m-instruct``, a folder). ``CPU_DEMO`` is the demo recipe (``configs/demo-cpu.yaml``)
as a benchmark: the figure the README quotes for a CPU.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

LEVERS = (
    "padding_free",
    "merge_micro",
    "fused_ce",
    "kernels",
    "checkpointing",
    "cast_cache",
    "token_buckets",
    "defer_mlp",
    "layer_graphs",
    "direct_launch",
)
# levers of what the library does not do by default yet
LEVERS_OFF_BY_DEFAULT = ("defer_mlp", "layer_graphs", "direct_launch")


def default_levers() -> dict[str, bool]:
    return {name: name not in LEVERS_OFF_BY_DEFAULT for name in LEVERS}


@dataclass
class RecipeBench:
    """What ``hizli bench recipe`` trains; the defaults are the reference recipe (configs/reference.yaml)."""

    model: str = "llama-3.2-3b"
    tokenizer: str | None = None
    data: str | None = None
    steps: int = 40
    batch: int = 2
    grad_accum: int = 4
    seq_len: int = 2048
    load_in_4bit: bool = True
    dtype: str | None = None  # bf16, fp16 or fp32; None: bf16 where the GPU has it, else fp16 (fp32 on a CPU)
    chat_template: str = "llama-3.1"
    max_memory_gib: float | None = None
    levers: dict[str, bool] = field(default_factory=default_levers)
    profile_dir: str | None = None
    skip_steps: int = 10  # steps left out of the steady rate (at most a third of the run)
    parallel: str | None = None  # under torchrun: "ddp" or "fsdp" (random shapes built sharded, in place)


# configs/demo-cpu.yaml's settings (tests/bench/test_bench_compare.py keeps them equal)
CPU_DEMO = RecipeBench(
    model="smollm2-135m-instruct", data="hizli:sharegpt", steps=20, seq_len=512, chat_template="smollm2"
)


def parse_levers(items: list[str]) -> dict[str, bool]:
    """``["fused_ce=off"]`` -> the defaults (``default_levers``) but fused_ce off."""
    levers = default_levers()
    for item in items:
        name, _, value = item.partition("=")
        if name not in LEVERS or value not in ("on", "off"):
            raise ValueError(f"--lever {item!r}: use NAME=on|off with NAME one of {', '.join(LEVERS)}")
        levers[name] = value == "on"
    return levers


def process_start_time() -> float:
    """Wall-clock time this process started (so interpreter start and imports count too)."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return boot + start_ticks / ticks
    except (OSError, StopIteration, ValueError, IndexError):
        return time.time()


def measured_bf16_tflops(device: Any) -> float | None:
    """The rate of an 8192^3 bf16 matmul on random data (median of 10 after warm-up), in TFLOP/s."""
    import torch

    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del a, b
    torch.cuda.empty_cache()
    return 2 * 8192**3 / sorted(times)[len(times) // 2] / 1e12


def run_recipe_bench(bench: RecipeBench) -> dict[str, Any]:
    """Train ``bench`` once; returns every figure (see the module docstring) and the run's settings."""
    t_process = process_start_time()
    levers = bench.levers
    if not levers["kernels"]:
        os.environ["HIZLI_KERNELS"] = "reference"
    from hizli.kernels.launch import ENV as LAUNCH_ENV

    # set either way, so that the record's lever says how this run launched its NF4 dequantization
    os.environ[LAUNCH_ENV] = "direct" if levers["direct_launch"] else "jit"
    import torch

    from hizli import FastLanguageModel, SFTTrainer, TrainingArguments, get_chat_template  # as the recipe does
    from hizli.models.record import state_of
    from hizli.bench.shapes import (
        attention_flops,
        config_for,
        is_shape,
        load_tokenizer,
        matmul_params,
        random_model_folder,
    )
    from hizli.models.loader import default_device, resolve_dtype
    from hizli.models.sharding import RandomRows, sharded_model
    from hizli.data.load import load_conversations
    from hizli.data.sample import dataset_source

    from hizli.train.ranks import Ranks

    marks = {"imports": time.time()}
    ranks = Ranks.current()  # under torchrun: this process's rank; every rank runs the benchmark
    device = torch.device(default_device())
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}
    if bench.dtype not in dtypes:
        raise ValueError(f"dtype={bench.dtype!r}: use bf16, fp16, fp32 or leave it unset for the automatic choice")
    checkpointing = "unsloth" if levers["checkpointing"] else False
    lora = dict(r=16, lora_alpha=16, lora_dropout=0, bias="none", use_gradient_checkpointing=checkpointing)
    in_place = is_shape(bench.model) and bench.parallel == "fsdp" and ranks.grouped
    folder = bench.model
    if is_shape(bench.model) and not in_place:
        if ranks.is_main:
            folder = random_model_folder(bench.model)
            if not (Path(folder) / "tokenizer_config.json").is_file():  # random weights come without one
                load_tokenizer(bench.tokenizer).save_pretrained(folder)
        ranks.barrier()
        folder = random_model_folder(bench.model)  # made by rank 0: every rank finds it
        if device.type == "cuda":
            torch.cuda.empty_cache()  # making random weights cached GBs the run must not be charged for
    t_load = time.time()
    if in_place:  # no rank holds the whole base, nothing is written: each quantizes its own rows
        model = sharded_model(
            config_for(bench.model),
            RandomRows(),
            device=str(device),
            dtype=resolve_dtype(dtypes[bench.dtype], str(device)),
            lora={**lora, "random_state": 3407},
            max_seq_length=bench.seq_len,
        )
        tokenizer = load_tokenizer(bench.tokenizer)
        marks["model_load"] = marks["tokenizer"] = time.time()
    else:
        model, tokenizer = FastLanguageModel.from_pretrained(
            folder, max_seq_length=bench.seq_len, dtype=dtypes[bench.dtype], load_in_4bit=bench.load_in_4bit
        )
        marks["model_load"] = time.time()
    tokenizer = get_chat_template(tokenizer, chat_template=bench.chat_template)
    marks["tokenizer"] = time.time()
    if not in_place:
        model = FastLanguageModel.get_peft_model(model, **lora, random_state=3407)
    marks["lora"] = time.time()
    rows = load_conversations(dataset_source(bench.data or "hizli:sharegpt"), bad_rows="skip")
    marks["data_read"] = time.time()
    cuda = device.type == "cuda"
    bf16 = cuda and (bench.dtype == "bf16" or (bench.dtype is None and torch.cuda.is_bf16_supported()))
    fp16 = cuda and not bf16 and bench.dtype != "fp32"
    targs = TrainingArguments(
        per_device_train_batch_size=bench.batch,
        gradient_accumulation_steps=bench.grad_accum,
        warmup_steps=5,
        max_steps=bench.steps,
        learning_rate=2e-4,
        fp16=fp16,
        bf16=bf16,
        logging_steps=1,
        optim="adamw_8bit",
        weight_decay=0.01,
        lr_scheduler_type="linear",
        seed=3407,
        output_dir=os.path.join("/tmp", f"hizli-bench-out-{os.getpid()}"),
        save_strategy="no",
        # merge lever on: the memory plan decides how many micro-batches a step runs as; off: the recipe's own
        padding_free=levers["padding_free"],
        merge_micro_batches=None if levers["merge_micro"] else False,
        max_memory_gib=bench.max_memory_gib,
        disable_tqdm=True,
        bad_rows="skip",
        fused_cross_entropy=levers["fused_ce"],
        parallel=bench.parallel or "ddp",
    )
    first_step: list[float] = []
    # CPU seconds of this process at every step end: on a shared machine the wall-clock rate depends on
    # the other work, tokens per CPU second much less
    cpu_at_step: list[float] = []
    callbacks: list[Any] = [lambda e: first_step.append(time.time()), lambda e: cpu_at_step.append(time.process_time())]
    if bench.profile_dir:
        callbacks.append(_Profiler(bench.profile_dir, device))
    trainer = SFTTrainer(
        model=model,
        tokenizer=tokenizer,
        train_dataset=rows,
        max_seq_length=bench.seq_len,
        dataset_num_proc=2,
        args=targs,
        callbacks=callbacks,
    )
    trainer.keep_lora_copies = levers["cast_cache"]  # off: cast the LoRA weights at every use
    trainer.token_buckets = None if levers["token_buckets"] else False  # off: micro-batches keep their lengths
    trainer.defer_offloaded_mlp = levers["defer_mlp"]
    trainer.graph_offloaded_layers = levers["layer_graphs"]
    marks["data_prep"] = time.time()
    prep_s = time.time() - t_load
    stats = trainer.train()
    log = [e for e in stats.log_history if "tokens" in e]
    skip = min(bench.skip_steps, max(1, len(log) // 3))
    steady = log[skip:]
    tokens_per_s = sum(e["tokens"] for e in steady) / sum(e["step_time_s"] for e in steady) if steady else None
    config = model.get_base_model().config
    lengths = trainer.train_dataset.lengths
    flops_per_token = 4 * matmul_params(config) + attention_flops(config, list(lengths)) / max(1, sum(lengths))
    peak = measured_bf16_tflops(device)
    per_step = [e["tokens"] / e["step_time_s"] for e in log if e["step_time_s"]]
    peaks = ranks.gather(round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None)
    metrics = {
        "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None,
        "overall_tokens_per_s": round(sum(e["tokens"] for e in log) / stats.metrics["train_runtime"], 1),
        "step_tokens_per_s_min": round(min(per_step), 1) if per_step else None,
        "step_tokens_per_s_max": round(max(per_step), 1) if per_step else None,
        "steady_steps": [skip + 1, len(log)],
        "tokens_per_cpu_s": round(sum(e["tokens"] for e in steady) / (cpu_at_step[-1] - cpu_at_step[skip - 1]), 1)
        if steady and len(cpu_at_step) == len(log) and cpu_at_step[-1] > cpu_at_step[skip - 1]
        else None,
        "threads": torch.get_num_threads(),
        "load_average": _load_average(),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
        "peak_reserved_gib_per_rank": peaks if ranks.grouped else None,
        "ranks": ranks.world_size,
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "peak_rss_gib": None if cuda else stats.memory.figures()["peak_reserved_gib"],
        "first_step_s": round(first_step[0] - t_process, 2) if first_step else None,
        "load_and_prep_s": round(prep_s, 2),
        "startup_s": startup_parts(
            t_process, t_load, marks, first_step[0] if first_step else None, log[0]["step_time_s"] if log else None
        ),
        "model_load_s": state_of(model).load_seconds or None,
        "train_runtime_s": stats.metrics["train_runtime"],
        "useful_tflops_per_token": flops_per_token / 1e12,
        "measured_bf16_tflops": round(peak, 1) if peak else None,
        "mfu": round(tokens_per_s / ranks.world_size * flops_per_token / (peak * 1e12), 4)
        if peak and tokens_per_s
        else None,
        "losses": [round(e["loss"], 5) for e in log],
        "predicted_peak_gib": (trainer.memory_plan or {}).get("predicted_peak_gib"),
        "layer_graphs": trainer.layer_graph_counts,
        **_allocator_counts(cuda),
    }
    settings = {
        **asdict(bench),
        "weights": "random" if is_shape(bench.model) else "pretrained",
        "dtype": "bf16" if bf16 else "fp16" if fp16 else "fp32",
    }
    return {
        "settings": settings,
        "metrics": metrics,
        "memory_plan": trainer.memory_plan,
        "command": " ".join(shlex.quote(a) for a in [*_launcher(ranks), *sys.argv[1:]]),
    }


def _launcher(ranks: Any) -> list[str]:
    """How this process was started, for the record: ``hizli``, or torchrun with its process count."""
    if not ranks.grouped:
        return ["hizli"]
    per_host = os.environ.get("LOCAL_WORLD_SIZE", str(ranks.world_size))
    return ["torchrun", f"--nproc-per-node={per_host}", "-m", "hizli.cli"]


def _allocator_counts(cuda: bool) -> dict[str, int | None]:
    """How often the CUDA allocator met its limit: ``num_alloc_retries`` counts allocations that failed,
    flushed the allocator's cache and were tried again, work a capped run pays for on the host."""
    import torch

    stats = torch.cuda.memory_stats() if cuda else {}
    return {
        "alloc_retries": stats.get("num_alloc_retries"),
        "device_allocs": stats.get("num_device_alloc"),
        "device_frees": stats.get("num_device_free"),
    }


def _load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages at the end of the run (what else the machine was doing)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def startup_parts(
    t_process: float, t_load: float, marks: dict[str, float], first_step_end: float | None, first_step_s: float | None
) -> dict[str, float]:
    """Where the time from process start to the first finished step went, in seconds per phase.

    ``benchmark_setup`` is the bench's own work before the recipe starts (making random weights,
    clearing the cache); ``train_setup`` is train() before its first step (memory plan, optimizer).
    """
    parts, before = {}, t_process
    names = [("imports", marks["imports"]), ("benchmark_setup", t_load)] + [
        (name, marks[name]) for name in ("model_load", "tokenizer", "lora", "data_read", "data_prep")
    ]
    if first_step_end is not None and first_step_s is not None:
        names += [("train_setup", first_step_end - first_step_s), ("first_step", first_step_end)]
    for name, at in names:
        parts[name] = round(at - before, 2)
        before = at
    return parts


class _Profiler:
    """torch.profiler over optimizer steps 11-13; writes the kernel table to DIR/profile.txt and the
    host's (self CPU time: where a host-bound step spends its time) to DIR/profile_host.txt."""

    def __init__(self, folder: str, device: Any) -> None:
        self.folder, self.device, self.prof = Path(folder), device, None

    def __call__(self, entry: dict) -> None:
        from torch.profiler import ProfilerActivity, profile

        if entry["step"] == 10:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=acts)
            self.prof.start()
        elif entry["step"] == 13 and self.prof is not None:
            self.prof.stop()
            self.folder.mkdir(parents=True, exist_ok=True)
            key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            table = self.prof.key_averages().table(sort_by=key, row_limit=45, max_name_column_width=70)
            (self.folder / "profile.txt").write_text(table)
            host = self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=60, max_name_column_width=70)
            (self.folder / "profile_host.txt").write_text(host)
            self.prof = None


SUMMARY = (
    "tokens_per_s",
    "overall_tokens_per_s",
    "step_tokens_per_s_min",
    "step_tokens_per_s_max",
    "peak_reserved_gib",
    "peak_allocated_gib",
    "peak_reserved_gib_per_rank",
    "ranks",
    "peak_rss_gib",
    "first_step_s",
    "mfu",
    "alloc_retries",
)


def bench_recipe(
    bench: RecipeBench, json_path: str | None = None, results_dir: str | None = None, note: str | None = None
) -> int:
    """Run, print the headline figures, and write the full result (``json_path``) and the record
    (``results_dir``/recipe.jsonl)."""
    import json

    from hizli.bench import results

    from hizli.train.ranks import Ranks

    out = run_recipe_bench(bench)
    if not Ranks.current().is_main:  # rank 0 prints and writes the figures of the whole group
        return 0
    device = results.device_info()
    record = results.make_record(
        "recipe", "hizli", out["settings"], out["metrics"], command=out["command"], device=device, note=note
    )
    print(f"{'device':<22}  {device['name']} ({device['type']})")
    print(f"{'model':<22}  {bench.model}")
    for key in SUMMARY:
        if out["metrics"].get(key) is not None:
            print(f"{key:<22}  {out['metrics'][key]}")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps({**record, "memory_plan": out["memory_plan"]}, indent=1))
        print(f"written to {json_path}")
    if results_dir:
        print(f"record appended to {results.append(results_dir, [record])}")
    return 0


def cpu_demo(steps: int | None = None) -> RecipeBench:
    """The demo recipe as a benchmark, optionally with another step count."""
    return replace(CPU_DEMO, steps=steps) if steps else CPU_DEMO
