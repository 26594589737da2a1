"""``hizli bench``: the recipe's training loop on random weights of a named shape, measured.

Figures (DESIGN.md §5): steady tokens/s (real, non-pad tokens per second after step 10), peak
reserved and allocated GPU memory during training, time from process start to the first finished
step (model load and data preparation included), useful MFU = tokens/s x (4 x matmul params +
attention FLOPs per token) / the measured bf16 matmul rate of this GPU, and the per-step loss.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

LEVERS = ("padding_free", "merge_micro", "fused_ce", "kernels", "checkpointing", "cast_cache")


def process_start_time() -> float:
    """Wall-clock time this process started (so interpreter start and imports count too)."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + start_ticks / ticks
    except (OSError, StopIteration, ValueError, IndexError):
        return time.time()


def parse_levers(items: list[str]) -> dict[str, bool]:
    levers = {name: True for name in LEVERS}
    for item in items:
        name, _, value = item.partition("=")
        if name not in LEVERS or value not in ("on", "off"):
            raise ValueError(f"--lever {item!r}: use NAME=on|off with NAME one of {', '.join(LEVERS)}")
        levers[name] = value == "on"
    return levers


def measured_bf16_tflops(device) -> float | None:
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


def load_tokenizer(path: str | None):
    from hizli.models.loader import load_tokenizer as load_folder_tokenizer, resolve_source, set_pad_token

    if path is None:
        return load_folder_tokenizer(resolve_source("smollm2-135m-instruct").path)
    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_file=str(p))
        vocab = tok.get_vocab()
        if "<|begin_of_text|>" in vocab:  # a Llama 3 tokenizer.json carries no special-token roles
            tok.bos_token, tok.eos_token = "<|begin_of_text|>", "<|eot_id|>"
        set_pad_token(tok)
        return tok
    return load_folder_tokenizer(str(p))


def run(args) -> dict[str, Any]:
    t_process = process_start_time()
    levers = parse_levers(args.lever)
    if not levers["kernels"]:
        os.environ["HIZLI_KERNELS"] = "reference"
    import torch

    from hizli import FastLanguageModel, SFTTrainer, TrainingArguments, get_chat_template  # as the recipe does
    from hizli.bench.shapes import attention_flops, matmul_params, random_model_folder
    from hizli.data.load import load_conversations
    from hizli.models.record import state_of

    marks = {"imports": time.time()}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = random_model_folder(args.model)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # making random weights cached GBs the run must not be charged for
    if not (Path(folder) / "tokenizer_config.json").is_file():  # random weights come without one
        load_tokenizer(args.tokenizer).save_pretrained(folder)
    t_load = time.time()
    # the recipe's way: the tokenizer from_pretrained returns, given the llama-3.1 template
    model, tokenizer = FastLanguageModel.from_pretrained(folder, max_seq_length=args.seq_len, dtype=None,
                                                         load_in_4bit=not args.no_4bit)
    marks["model_load"] = time.time()
    tokenizer = get_chat_template(tokenizer, chat_template="llama-3.1")
    marks["tokenizer"] = time.time()
    checkpointing = "unsloth" if levers["checkpointing"] else False
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                             use_gradient_checkpointing=checkpointing, random_state=3407)
    from hizli.train.run import dataset_source

    marks["lora"] = time.time()
    rows = load_conversations(dataset_source(args.data or "hizli:sharegpt"), bad_rows="skip")
    marks["data_read"] = time.time()
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    targs = TrainingArguments(
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.grad_accum, warmup_steps=5,
        max_steps=args.steps, learning_rate=2e-4, fp16=device.type == "cuda" and not bf16, bf16=bf16,
        logging_steps=1, optim="adamw_8bit", weight_decay=0.01, lr_scheduler_type="linear", seed=3407,
        output_dir=os.path.join("/tmp", f"hizli-bench-out-{os.getpid()}"), save_strategy="no",
        # merge lever on: the memory plan decides how many micro-batches a step runs as; off: the recipe's own
        padding_free=levers["padding_free"], merge_micro_batches=None if levers["merge_micro"] else False,
        max_memory_gib=args.max_memory_gib, disable_tqdm=True, bad_rows="skip",
    )
    first_step: list[float] = []
    callbacks = [lambda e: first_step.append(time.time())]
    if getattr(args, "profile", None):
        callbacks.append(_Profiler(args.profile, device))
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=rows, max_seq_length=args.seq_len,
                         dataset_num_proc=2, args=targs, callbacks=callbacks)
    trainer.fused_cross_entropy = levers["fused_ce"]
    trainer.keep_lora_copies = levers["cast_cache"]  # off: cast the LoRA weights to bf16/fp16 at every use
    marks["data_prep"] = time.time()
    prep_s = time.time() - t_load
    stats = trainer.train()
    log = [e for e in stats.log_history if "tokens" in e]
    skip = min(10, max(1, len(log) // 3))
    steady = log[skip:]
    tokens_per_s = sum(e["tokens"] for e in steady) / sum(e["step_time_s"] for e in steady) if steady else None
    config = model.get_base_model().config
    lengths = trainer.train_dataset.lengths
    mean_attn = attention_flops(config, list(lengths)) / max(1, sum(lengths))
    flops_per_token = 4 * matmul_params(config) + mean_attn
    peak = measured_bf16_tflops(device)
    result = {
        "system": "hizli",
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU",
        "date": datetime.date.today().isoformat(),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "model": args.model, "steps": args.steps, "batch": args.batch, "grad_accum": args.grad_accum,
        "seq_len": args.seq_len, "load_in_4bit": not args.no_4bit, "levers": levers,
        "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None,
        "overall_tokens_per_s": round(sum(e["tokens"] for e in log) / stats.metrics["train_runtime"], 1),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if device.type == "cuda"
        else stats.memory.figures()["peak_reserved_gib"],
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.type == "cuda" else None,
        "first_step_s": round(first_step[0] - t_process, 2) if first_step else None,
        "load_and_prep_s": round(prep_s, 2),
        "startup_s": startup_parts(t_process, t_load, marks, first_step[0] if first_step else None,
                                   log[0]["step_time_s"] if log else None),
        "model_load_s": state_of(model).load_seconds or None,
        "train_runtime_s": stats.metrics["train_runtime"],
        "useful_tflops_per_token": flops_per_token / 1e12,
        "measured_bf16_tflops": round(peak, 1) if peak else None,
        "mfu": round(tokens_per_s * flops_per_token / (peak * 1e12), 4) if peak and tokens_per_s else None,
        "losses": [round(e["loss"], 5) for e in log],
        "memory_plan": trainer.memory_plan,
        "predicted_peak_gib": (trainer.memory_plan or {}).get("predicted_peak_gib"),
    }
    return result


def startup_parts(t_process: float, t_load: float, marks: dict[str, float], first_step_end: float | None,
                  first_step_s: float | None) -> dict[str, float]:
    """Where the time from process start to the first finished step went, in seconds per phase
    (``benchmark_setup`` is the bench's own work before the recipe starts, such as clearing the cache
    after making random weights; ``train_setup`` is train() before its first step: the memory plan,
    optimizer, scheduler)."""
    parts, before = {}, t_process
    names = [("imports", marks["imports"]), ("benchmark_setup", t_load)] + [
        (name, marks[name]) for name in ("model_load", "tokenizer", "lora", "data_read", "data_prep")]
    if first_step_end is not None and first_step_s is not None:
        names += [("train_setup", first_step_end - first_step_s), ("first_step", first_step_end)]
    for name, at in names:
        parts[name] = round(at - before, 2)
        before = at
    return parts


class _Profiler:
    """torch.profiler over optimizer steps 11-13; writes the kernel table to DIR/profile.txt."""

    def __init__(self, folder: str, device) -> None:
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
            self.prof = None


def bench_cli(args) -> int:
    result = run(args)
    width = max(len(k) for k in result)
    for key in ("gpu", "model", "tokens_per_s", "overall_tokens_per_s", "peak_reserved_gib", "peak_allocated_gib",
                "first_step_s", "mfu", "measured_bf16_tflops"):
        print(f"{key:<{width}}  {result[key]}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"written to {args.json}")
    return 0
