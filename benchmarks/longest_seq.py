#!/usr/bin/env python3
"""Longest trainable sequence at batch 1, for hizli and for Unsloth, under the same memory cap.

    export PYTHONPATH=$PWD/.gpu-bundle/site:$PWD/src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    python3 benchmarks/longest_seq.py --systems hizli,unsloth --caps 8,whole --out benchmarks/results/

"Trainable at length L": one row of exactly L real tokens (the ShareGPT conversations of --data
rendered with the model folder's chat template, tokenized with its tokenizer, concatenated and cut
to L; labels = input ids, every token trained), batch 1, the recipe's model (4-bit NF4, LoRA r=16 on
all 7 projections, lora_alpha=16, use_gradient_checkpointing="unsloth", bf16, adamw_8bit): two full
optimizer steps (forward, backward, optimizer step) finish without running out of GPU memory, and
``torch.cuda.max_memory_reserved()`` stays within the cap. Any other exception fails the trial too
(its message is kept), since the length did not train.

The cap: ``torch.cuda.set_per_process_memory_fraction(cap / total)`` before the model loads, for
both systems alike, and (--free-memory cap, the default) ``torch.cuda.mem_get_info`` answering as a
card of that size would, since both size work from it: Unsloth's fused loss takes half the free
memory per chunk, which under a bare fraction on an H200 would be 4 GiB of an 8 GiB cap. hizli is
also told the cap the way a user would, ``max_memory_gib=cap``, so its memory plan knows, and gets
``oom_retries=0`` (running out is a failure, not a reason to replan). "whole" sets no fraction and
leaves ``max_memory_gib`` unset: the cap is the card.

Each (system, cap) pair runs in its own process (Unsloth patches transformers on import), which
loads the model once and searches in place: lengths grow x2 from --start until a failure or
--max-len (default: the model's max_position_embeddings), then bisect between the last success and
the first failure down to --resolution tokens. Between trials every reference of the trial is
dropped (optimizer, gradients, outputs, and the frames of a caught exception's traceback), then
``gc.collect()``, ``torch.cuda.empty_cache()`` and a reset of the peak statistics; nothing else is
re-initialised. As a failed trial can leave memory fragmented, when the search saw a failure the
answer is tried once more at the end, and whether it held is reported. A successful trial slower
than --trial-timeout stops the search upwards (noted; not the first trial, which pays for kernel
compilation), so GPU time stays bounded; so does --search-budget.

Caveat of searching in one process: state a system keeps on purpose stays from trial to trial, as it
would for a user whose rows vary in length; e.g. Unsloth's offload buffers keep the size of the
longest row seen (L x hidden x 2 bytes, 0.2 GB at 32K tokens), so after a failure the bisection runs
with them at the failed length's size. To confirm a boundary in a fresh process, try one length
alone: ``--start L --max-len L --resolution L``.

How each system trains, as its users get it:
- hizli: its own ``SFTTrainer`` (max_steps=2, batch 1 x 1, bf16, adamw_8bit, max_memory_gib, no
  checkpoints, no evaluation), so its memory plan, offload and fused loss are what is measured.
- Unsloth: its model and its own forward with ``labels`` (so its own fused loss,
  ``unsloth_fused_ce_loss``), under bf16 autocast as transformers' Trainer runs it, ``backward()``,
  gradient clipping at 1.0 and bitsandbytes' ``AdamW8bit`` (what ``optim="adamw_8bit"`` builds).
  This is what its SFTTrainer does per step for one padding-free row (Unsloth pins TRL's SFT loss to
  ``loss_type="nll"``, i.e. the model's own forward, and the gradient checkpointing is the one
  ``get_peft_model`` installed), without rebuilding a trainer, an accelerator and a dataset for every
  trial, which keeps repeated in-process trials clean. What it leaves out (the data pipeline, the
  learning-rate scheduler) costs no GPU memory, so any difference favours Unsloth.

Both load with ``max_seq_length`` = --max-len, as a user training long rows would; Unsloth's
load-time choices (its embedding offload when memory is tight) see that length and the cap.

Writes ``<out>/<date>-<gpu>-longest-seq.json`` (merged with an existing file of that name, so the
caps can run as separate commands): per system and cap the longest length that trained, the first
that failed, every trial (length, ok, peak reserved/allocated GiB, seconds, error) and the recheck.
``--start L --max-len L --resolution L`` tries exactly one length. Without a GPU (tests) the cap is
ignored and the trials run on the CPU.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.machinery
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SYSTEMS = ("hizli", "unsloth")


# ------------------------------------------------------------------------------------------- search
@dataclass
class Trial:
    """One attempt at one length."""

    len: int
    ok: bool
    seconds: float = 0.0
    peak_reserved_gib: float | None = None
    peak_allocated_gib: float | None = None
    error: str | None = None
    kind: str | None = None  # why it failed: "oom", "over-cap" or "error"
    fatal: bool = False  # the process cannot run another trial (e.g. the CUDA context is lost)
    recheck: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchResult:
    longest_ok: int | None  # longest length that trained (None: not even the shortest tried)
    first_fail: int | None  # shortest length that failed above it (None: none failed)
    reached_limit: bool
    rechecked: bool | None  # the answer trained again at the end (None: not rechecked)
    stopped: str | None  # why the search ended before reaching the resolution, if it did
    trials: list[Trial]

    def to_dict(self) -> dict[str, Any]:
        return {"longest_ok": self.longest_ok, "first_fail": self.first_fail, "reached_limit": self.reached_limit,
                "rechecked": self.rechecked, "stopped": self.stopped, "trials": [asdict(t) for t in self.trials]}


def find_longest(try_len: Callable[[int], Trial | bool], start: int, limit: int, resolution: int, *,
                 trial_timeout: float | None = None, recheck: str = "auto", budget_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_trial: Callable[[Trial], None] | None = None) -> SearchResult:
    """The longest length in [1, limit] for which ``try_len`` succeeds, assuming success is monotone.

    Grows from ``start`` by x2 (the last step clipped to ``limit``) until a failure or ``limit``, then
    bisects between the last success and the first failure until they are at most ``resolution``
    apart (a failure at ``start`` bisects below it). ``try_len`` returns a Trial or a bool.

    Stops early, saying why in ``stopped``: a successful trial slower than ``trial_timeout`` seconds
    (longer ones would be slower still; not the first trial, which pays for compilation and warm-up),
    a trial marked ``fatal``, or ``budget_s`` seconds spent.
    ``recheck``: "auto" tries the answer once more if any trial failed (a failure can leave memory
    fragmented), "always" does in any case, "never" does not; none after a fatal trial or with the
    budget spent.
    """
    if resolution < 1 or start < 1 or limit < 1:
        raise ValueError("start, limit and resolution must be >= 1")
    if recheck not in ("auto", "always", "never"):
        raise ValueError(f"recheck={recheck!r}: use auto, always or never")
    trials: list[Trial] = []
    t0 = clock()
    stopped: str | None = None

    def attempt(length: int, is_recheck: bool = False) -> Trial:
        out = try_len(length)
        trial = out if isinstance(out, Trial) else Trial(len=length, ok=bool(out))
        trial.len, trial.recheck = length, is_recheck
        trials.append(trial)
        if on_trial is not None:
            on_trial(trial)
        return trial

    def halt(trial: Trial) -> str | None:
        if trial.fatal:
            return f"trial at {trial.len} left the process unable to continue: {trial.error}"
        # the first trial carries one-time work (kernel compilation, caches): it does not predict the next
        if trial.ok and trial_timeout is not None and trial.seconds > trial_timeout and len(trials) > 1:
            return (f"trial at {trial.len} took {trial.seconds:.0f} s > --trial-timeout {trial_timeout:.0f} s; "
                    "longer ones were not tried")
        if budget_s is not None and clock() - t0 > budget_s:
            return f"search budget of {budget_s:.0f} s spent"
        return None

    lo, hi = 0, None  # lo: longest success (0 = none yet), hi: shortest failure

    def probe(length: int) -> tuple[Trial, str | None]:
        nonlocal lo, hi
        trial = attempt(length)
        if trial.ok:
            lo = length
        else:
            hi = length
        return trial, halt(trial)

    length = min(start, limit)
    while True:  # grow
        trial, stopped = probe(length)
        if not trial.ok or stopped or length >= limit:
            break
        length = min(2 * length, limit)
    while stopped is None and hi is not None and hi - lo > resolution:  # bisect
        _, stopped = probe(lo + max(resolution, (hi - lo) // 2 // resolution * resolution))
    rechecked = None
    failed = any(not t.ok for t in trials)
    unable = any(t.fatal for t in trials) or (budget_s is not None and clock() - t0 > budget_s)
    if lo and not unable and (recheck == "always" or (recheck == "auto" and failed)):
        rechecked = attempt(lo, is_recheck=True).ok
    return SearchResult(longest_ok=lo or None, first_fail=hi, reached_limit=bool(lo) and lo >= limit,
                        rechecked=rechecked, stopped=stopped, trials=trials)


# ------------------------------------------------------------------------------------------- caps
def parse_caps(text: str) -> list[str]:
    """"8,whole" -> ["8", "whole"]: GiB numbers (> 0) or "whole" (the card)."""
    caps = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        if item != "whole":
            try:
                ok = float(item) > 0
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"--caps: {item!r} is neither a number of GiB > 0 nor 'whole'")
        caps.append(item)
    if not caps:
        raise ValueError("--caps is empty")
    return caps


def cap_label(cap: str) -> str:
    return "whole card" if cap == "whole" else f"{float(cap):g} GiB"


# ------------------------------------------------------------------------------------------- data
def token_stream(model_dir: str | Path, data: str | Path, n: int) -> tuple[list[int], dict[str, Any]]:
    """``n`` real token ids: each ShareGPT row rendered with the folder's chat template, tokenized with
    its tokenizer, concatenated (the rows again from the top if they run out)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    ids: list[int] = []
    rows = 0
    lines = Path(data).read_text().splitlines()
    for line in lines:
        if not line.strip():
            continue
        row = json.loads(line)
        turns = row.get("conversations") or row.get("messages") or []
        messages = [{"role": roles.get(t.get("from", t.get("role")), "user"),
                     "content": t.get("value", t.get("content")) or ""} for t in turns]
        if not messages:
            continue
        text = None
        if getattr(tok, "chat_template", None):
            try:
                text = tok.apply_chat_template(messages, tokenize=False)
            except Exception:  # a template that refuses this row's turn order: plain text then
                text = None
        if text is None:
            text = "\n\n".join(m["content"] for m in messages)
        ids.extend(tok(text, add_special_tokens=False)["input_ids"])
        rows += 1
        if len(ids) >= n:
            break
    if not ids:
        raise ValueError(f"{data}: no conversation to take tokens from")
    repeated = len(ids) < n
    while len(ids) < n:
        ids.extend(ids[: n - len(ids)])
    return ids[:n], {"data": str(data), "rows": rows, "tokens": n, "repeated": repeated}


# ------------------------------------------------------------------------------------------- trials
def _is_oom(exc: BaseException) -> bool:
    import torch

    for e in _chain(exc):
        if isinstance(e, torch.OutOfMemoryError) or type(e).__name__ == "GPUOutOfMemoryError":
            return True
        text = str(e).lower()
        if any(s in text for s in ("out of memory", "cublas_status_alloc_failed", "no or negligible gpu memory")):
            return True
    return False


def _chain(exc: BaseException) -> list[BaseException]:
    seen, out, todo = set(), [], [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        todo += [e.__cause__, e.__context__]
    return out


def _forget(exc: BaseException) -> None:
    """Let go of what a caught exception keeps alive: its traceback's frames hold the failed step's
    tensors (activations, the loss, the optimizer), and so do the exceptions it was raised from."""
    for e in _chain(exc):
        if e.__traceback__ is not None:
            traceback.clear_frames(e.__traceback__)
            e.__traceback__ = None


def _release(model, cuda: bool) -> None:
    import torch

    for p in model.parameters():
        p.grad = None
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure(train_two_steps: Callable[[int], dict | None], length: int, model, cap_bytes: int | None,
            cuda: bool | None = None) -> Trial:
    """Run ``train_two_steps(length)`` as one trial: clean start, wall time, peak memory, any
    exception turned into a failed trial and released."""
    import torch

    if cuda is None:
        cuda = torch.cuda.is_available()
    _release(model, cuda)
    t0 = time.perf_counter()
    ok, error, kind, extra, fatal = True, None, None, {}, False
    try:
        extra = train_two_steps(length) or {}
        if cuda:
            torch.cuda.synchronize()
    except Exception as exc:  # any failure to train the length is a failed trial
        ok, kind = False, "oom" if _is_oom(exc) else "error"
        first = (str(exc).strip().splitlines() or [""])[0]
        error = f"{type(exc).__name__}: {first}"[:400]
        _forget(exc)
        del exc
    seconds = time.perf_counter() - t0
    peak_reserved = peak_allocated = None
    if cuda:
        peak_reserved = torch.cuda.max_memory_reserved() / GIB
        peak_allocated = torch.cuda.max_memory_allocated() / GIB
        if ok and cap_bytes is not None and torch.cuda.max_memory_reserved() > cap_bytes:
            ok, kind = False, "over-cap"
            error = f"peak reserved {peak_reserved:.3f} GiB > cap {cap_bytes / GIB:.3f} GiB"
    try:
        _release(model, cuda)
    except Exception as exc:  # a sticky CUDA error: nothing more can run in this process
        fatal = True
        error = f"{error or ''} (then {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"[:600]
        _forget(exc)
        del exc
    return Trial(len=length, ok=ok, seconds=round(seconds, 2),
                 peak_reserved_gib=None if peak_reserved is None else round(peak_reserved, 3),
                 peak_allocated_gib=None if peak_allocated is None else round(peak_allocated, 3),
                 error=error, kind=kind, fatal=fatal, extra=extra)


def report_free_within_cap(cap_bytes: int) -> None:
    """Make ``torch.cuda.mem_get_info`` answer as a card of ``cap_bytes`` would: free = the cap less
    what this process's allocator holds (never more than the card really has free). The memory
    fraction stops allocations at the cap, but code that sizes its work from the free memory would
    otherwise plan for the whole card: Unsloth's fused loss takes half the free memory (up to 4 GB)
    per chunk, its offload double-buffering checks for 512 MiB free, hizli's plan starts from it. On
    a real card of that size they would all see the smaller figure, so both systems see it here.
    The total stays the card's (code that multiplies it by the fraction still gets the cap)."""
    import torch

    original = torch.cuda.mem_get_info

    def mem_get_info(device=None):
        free, total = original(device)
        return max(0, min(free, cap_bytes - torch.cuda.memory_reserved(device))), total

    mem_get_info.original = original  # type: ignore[attr-defined]
    torch.cuda.mem_get_info = mem_get_info
    torch.cuda.memory.mem_get_info = mem_get_info


def load_recipe_model(system: str, model_dir: str, max_len: int):
    """The recipe's model and LoRA through ``system``'s FastLanguageModel: the same call for both
    (hizli keeps Unsloth's names), so only the import differs."""
    if system == "unsloth":
        from unsloth import FastLanguageModel
    else:
        from hizli.api import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(model_name=model_dir, max_seq_length=max_len, dtype=None,
                                                         load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, target_modules=TARGETS, lora_alpha=16, lora_dropout=0,
                                             bias="none", use_gradient_checkpointing="unsloth", random_state=3407,
                                             use_rslora=False, loftq_config=None)
    return model, tokenizer


def hizli_trainer_fn(model, tokenizer, tokens, max_memory_gib: float | None) -> Callable[[int], dict]:
    """Two optimizer steps on one row of ``length`` tokens through hizli's own SFTTrainer."""
    import torch

    from hizli.api import SFTTrainer, TrainingArguments

    def train_two_steps(length: int) -> dict:
        cuda = torch.cuda.is_available()
        bf16 = cuda and torch.cuda.is_bf16_supported()
        ids = [int(x) for x in tokens[:length]]
        with tempfile.TemporaryDirectory(prefix="hizli-longest-seq-") as out:
            args = TrainingArguments(
                output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=1, max_steps=2,
                learning_rate=2e-4, warmup_steps=0, weight_decay=0.01, lr_scheduler_type="linear", seed=3407,
                bf16=bf16, fp16=cuda and not bf16, optim="adamw_8bit", logging_steps=1, save_strategy="no",
                eval_strategy="no", report_to="none", disable_tqdm=True,
                max_memory_gib=max_memory_gib if cuda else None, oom_retries=0)
            trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=[{"input_ids": ids, "labels": ids}],
                                 max_seq_length=length, args=args)
            stats = trainer.train()
            steps = [e for e in stats.log_history if "loss" in e]
            if len(steps) != 2:
                raise RuntimeError(f"{len(steps)} of 2 optimizer steps ran")
            plan = trainer.memory_plan or {}
            modes = plan.get("layer_modes") or []
            return {"losses": [round(e["loss"], 4) for e in steps],
                    "plan": {"micro_batches": plan.get("micro_batches"),
                             "layers": {m: modes.count(m) for m in sorted(set(modes))},
                             "predicted_peak_gib": plan.get("predicted_peak_gib"),
                             "budget_gib": plan.get("budget_gib")} if plan else None}

    return train_two_steps


def unsloth_step_fn(model, tokens) -> Callable[[int], dict]:
    """Two optimizer steps on one row of ``length`` tokens the way Unsloth's trainer runs them (see the
    module docstring): its forward with labels under bf16 autocast, backward, clip, AdamW8bit."""
    import bitsandbytes as bnb
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    cuda = torch.cuda.is_available()  # (the CPU only in tests, with a stand-in model)
    amp = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16

    def train_two_steps(length: int) -> dict:
        ids = torch.as_tensor(tokens[:length], dtype=torch.long, device="cuda" if cuda else "cpu")[None]
        mask = torch.ones_like(ids)
        optimizer = bnb.optim.AdamW8bit(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        model.train()
        losses = []
        for _ in range(2):
            with torch.autocast("cuda", dtype=amp, enabled=cuda):
                loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(round(float(loss.detach()), 4))
            del loss
        return {"losses": losses}

    return train_two_steps


# ------------------------------------------------------------------------------------------- worker
def worker_main(a: argparse.Namespace) -> int:
    """One (system, cap) pair: load once, search, write ``a.worker_out`` after every trial."""
    system, cap = a.worker, a.cap
    t_start = time.time()
    # The system's package first, before CUDA starts: both set the allocator's options on import
    # (expandable segments), and Unsloth must also come before transformers.
    unsloth = None
    if system == "unsloth":
        import unsloth
    elif system == "hizli":
        importlib.import_module("hizli")
    else:
        raise SystemExit(f"--worker {system!r}: use one of {', '.join(SYSTEMS)}")
    import numpy as np
    import torch

    cuda = torch.cuda.is_available()
    doc: dict[str, Any] = {"system": system, "cap": cap, "done": False,
                           "alloc_conf": {k: os.environ.get(k) for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}}
    cap_bytes = None
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        doc.update(gpu=torch.cuda.get_device_name(0), total_gib=round(total / GIB, 3))
        if cap != "whole":
            cap_bytes = int(float(cap) * GIB)
            if cap_bytes >= total:
                raise SystemExit(f"cap {cap} GiB is not below the card's {total / GIB:.1f} GiB: use 'whole'")
            torch.cuda.set_per_process_memory_fraction(cap_bytes / total, 0)
            doc["memory_fraction"] = cap_bytes / total
            if a.free_memory == "cap":
                report_free_within_cap(cap_bytes)
            doc["free_memory_reported"] = a.free_memory
        doc["cap_gib"] = round((cap_bytes or total) / GIB, 3)
    else:
        doc.update(gpu="CPU", cap_gib=None, note="no GPU: the cap is ignored and the trials run on the CPU")
    doc["torch"] = torch.__version__
    if unsloth is not None:
        doc["unsloth"] = getattr(unsloth, "__version__", None)
    tokens = np.load(a.tokens)
    max_len = a.max_len
    if len(tokens) < max_len:
        raise SystemExit(f"{a.tokens} holds {len(tokens)} tokens, fewer than --max-len {max_len}")
    out = Path(a.worker_out)

    def save() -> None:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, out)

    t_load = time.time()
    if system == "hizli":
        import logging

        from hizli import _log

        _log.setup(logging.WARNING)
        model, tokenizer = load_recipe_model("hizli", a.model, max_len)
        max_memory_gib = float(cap) if cap != "whole" and cuda else None
        doc["max_memory_gib"] = max_memory_gib
        train = hizli_trainer_fn(model, tokenizer, tokens, max_memory_gib)
    else:
        model, _tokenizer = load_recipe_model("unsloth", a.model, max_len)
        train = unsloth_step_fn(model, tokens)
    doc["load_s"] = round(time.time() - t_load, 1)
    doc["startup_s"] = round(time.time() - t_start, 1)
    if cuda:
        torch.cuda.synchronize()
        doc["after_load_allocated_gib"] = round(torch.cuda.memory_allocated() / GIB, 3)
        doc["after_load_reserved_gib"] = round(torch.cuda.memory_reserved() / GIB, 3)
    doc.update(start=a.start, max_len=max_len, resolution=a.resolution, trial_timeout=a.trial_timeout,
               search_budget_s=a.search_budget, trials=[])
    save()

    def on_trial(trial: Trial) -> None:
        doc["trials"].append(asdict(trial))
        print(f"[{system} @ {cap_label(cap)}] {trial.len:>7} tokens: {'ok  ' if trial.ok else 'FAIL'} "
              f"{trial.seconds:6.1f} s, peak reserved {trial.peak_reserved_gib} GiB"
              f"{'' if trial.ok else ' - ' + str(trial.error)}{' (recheck)' if trial.recheck else ''}", flush=True)
        save()

    t_search = time.time()
    result = find_longest(lambda n: measure(train, n, model, cap_bytes, cuda), a.start, max_len, a.resolution,
                          trial_timeout=a.trial_timeout, recheck=a.recheck, budget_s=a.search_budget,
                          on_trial=on_trial)
    doc.update(result.to_dict())
    doc.update(search_s=round(time.time() - t_search, 1), done=True)
    save()
    print(f"[{system} @ {cap_label(cap)}] longest ok {result.longest_ok}, first fail {result.first_fail}, "
          f"rechecked {result.rechecked}{', stopped: ' + result.stopped if result.stopped else ''}", flush=True)
    return 0


# ------------------------------------------------------------------------------------------- parent
def load_compare_module():
    """benchmarks/compare (a script without .py) as a module, for its prepare_model."""
    path = ROOT / "benchmarks" / "compare"
    loader = importlib.machinery.SourceFileLoader("hizli_benchmarks_compare", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def model_max_len(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    return int(config.get("max_position_embeddings") or config.get("text_config", {})["max_position_embeddings"])


def run_worker(system: str, cap: str, a: argparse.Namespace, tokens_path: Path, max_len: int,
               work: Path) -> dict[str, Any]:
    slug = cap.replace(".", "_")
    out = work / f"longest-seq-{system}-{slug}.json"
    log = work / f"longest-seq-{system}-{slug}.log"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system, "--cap", cap, "--model", str(a.model),
           "--tokens", str(tokens_path), "--worker-out", str(out), "--start", str(a.start), "--max-len",
           str(max_len), "--resolution", str(a.resolution), "--trial-timeout", str(a.trial_timeout),
           "--recheck", a.recheck, "--free-memory", a.free_memory]
    if a.search_budget is not None:
        cmd += ["--search-budget", str(a.search_budget)]
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.time()
    timed_out = False
    with open(log, "w") as f, open(log) as follow:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        pending = ""
        while True:  # everything goes to the log; the trial lines are shown as they come
            done = proc.poll() is not None
            pending += follow.read()
            *lines, pending = pending.split("\n")
            for line in lines:
                if line.startswith("["):
                    print("  " + line, flush=True)
            if done:
                break
            if a.worker_timeout and time.time() - t0 > a.worker_timeout:
                timed_out = True
                proc.kill()
                proc.wait()
                break
            time.sleep(0.5)
    rc = proc.returncode
    print(f"  exit {rc} after {time.time() - t0:.0f} s (log {log})", flush=True)
    doc = json.loads(out.read_text()) if out.is_file() else {"system": system, "cap": cap, "done": False}
    doc["wall_s"] = round(time.time() - t0, 1)
    doc["log"] = str(log)
    if timed_out:
        doc["error"] = f"worker killed after --worker-timeout {a.worker_timeout} s"
    elif rc != 0 or not doc.get("done"):
        tail = log.read_text().splitlines()[-20:]
        print("  " + "\n  ".join(tail))
        doc["error"] = f"worker exit {rc}: " + (tail[-1] if tail else "")
    if not doc.get("done") and doc.get("trials"):  # cut short: what its trials showed
        oks = [t["len"] for t in doc["trials"] if t["ok"]]
        fails = [t["len"] for t in doc["trials"] if not t["ok"] and (not oks or t["len"] > max(oks))]
        doc.update(longest_ok=max(oks) if oks else None, first_fail=min(fails) if fails else None,
                   stopped=doc.get("stopped") or "worker did not finish; figures from its completed trials")
    return doc


def render(results: dict[str, dict[str, dict]], caps: list[str], systems: list[str]) -> str:
    lines = [f"{'cap':<12}{'system':<9}{'longest ok':>12}{'first fail':>12}{'recheck':>9}{'peak GiB':>10}"
             f"{'trials':>8}{'search s':>10}{'load s':>8}"]
    verdicts = []
    for cap in caps:
        for system in systems:
            r = results.get(system, {}).get(cap)
            if r is None:
                continue
            ok_trials = [t for t in r.get("trials", []) if t["ok"] and t["len"] == r.get("longest_ok")]
            peak = ok_trials[-1]["peak_reserved_gib"] if ok_trials else None
            recheck = {True: "held", False: "FAILED", None: "-"}[r.get("rechecked")]
            lines.append(f"{cap_label(cap):<12}{system:<9}{_n(r.get('longest_ok')):>12}{_n(r.get('first_fail')):>12}"
                         f"{recheck:>9}{'-' if peak is None else f'{peak:.2f}':>10}{len(r.get('trials', [])):>8}"
                         f"{_n(r.get('search_s')):>10}{_n(r.get('load_s')):>8}")
            for note in (r.get("stopped"), r.get("error"), r.get("skipped")):
                if note:
                    lines.append(f"{'':<21}note: {note}")
        h, u = results.get("hizli", {}).get(cap), results.get("unsloth", {}).get(cap)
        if h and u and h.get("done") and u.get("done"):
            hl, ul = h.get("longest_ok") or 0, u.get("longest_ok") or 0
            bound = " (both reached --max-len)" if h.get("reached_limit") and u.get("reached_limit") else ""
            verdicts.append(f"{cap_label(cap)}: hizli {_n(hl)} vs Unsloth {_n(ul)} tokens: "
                            f"{'hizli >= Unsloth' if hl >= ul else 'hizli < Unsloth'}{bound}")
    return "\n".join(lines + verdicts)


def _n(v) -> str:
    if v is None:
        return "-"
    return f"{v:,}" if isinstance(v, int) else f"{v:g}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default="hizli,unsloth")
    p.add_argument("--caps", default="8,whole", help="GiB numbers and/or 'whole', comma-separated")
    p.add_argument("--model", default="/tmp/hizli-compare/llama-3.2-3b",
                   help="model folder; made by benchmarks/compare's prepare_model if missing")
    p.add_argument("--shape", default="llama-3.2-3b", help="shape of a model folder that has to be made")
    p.add_argument("--tokenizer", default=str(ROOT / ".gpu-bundle" / "tok" / "tokenizer.json"),
                   help="Llama 3 tokenizer.json, for making the model folder")
    p.add_argument("--data", default=str(ROOT / ".gpu-bundle" / "data" / "sharegpt.jsonl"))
    p.add_argument("--start", type=int, default=4096)
    p.add_argument("--max-len", type=int, default=None, help="default: the model's max_position_embeddings")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--trial-timeout", type=float, default=90.0,
                   help="a successful trial slower than this (s) stops the search upwards")
    p.add_argument("--search-budget", type=float, default=None,
                   help="seconds of searching per (system, cap) after which no new trial starts")
    p.add_argument("--recheck", choices=("auto", "always", "never"), default="auto")
    p.add_argument("--free-memory", choices=("cap", "card"), default="cap",
                   help="under a cap, what torch.cuda.mem_get_info reports: 'cap' = the free memory of a card "
                        "of that size (default; see report_free_within_cap), 'card' = the real card's")
    p.add_argument("--worker-timeout", type=float, default=900.0, help="kill a worker after this many seconds")
    p.add_argument("--work", default="/tmp/hizli-compare")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    # worker mode (the script runs itself once per pair)
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--cap", help=argparse.SUPPRESS)
    p.add_argument("--tokens", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for name in ("start", "resolution"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.worker:
        sys.path.insert(0, str(ROOT / "src"))
        return worker_main(a)

    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        p.error(f"--systems: unknown {', '.join(unknown)}; use {', '.join(SYSTEMS)}")
    try:
        caps = parse_caps(a.caps)
    except ValueError as e:
        p.error(str(e))
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(a.model)
    if not (model / "tokenizer_config.json").is_file():  # as benchmarks/compare makes it
        load_compare_module().prepare_model(a.shape, Path(a.tokenizer), model)
    max_len = a.max_len or model_max_len(model)
    t0 = time.time()
    ids, source = token_stream(model, a.data, max_len)
    import numpy as np

    tokens_path = work / "longest-seq-tokens.npy"
    np.save(tokens_path, np.asarray(ids, dtype=np.int32))
    print(f"{max_len:,} tokens from {source['rows']} rows of {a.data} ({time.time() - t0:.1f} s)"
          f"{' (repeated)' if source['repeated'] else ''}", flush=True)

    command = " ".join(shlex.quote(c) for c in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    results: dict[str, dict[str, dict]] = {}
    for cap in caps:
        for system in systems:
            if system == "unsloth" and importlib.util.find_spec("unsloth") is None:
                print(f"unsloth @ {cap_label(cap)}: unsloth is not importable here; skipped", flush=True)
                results.setdefault(system, {})[cap] = {"system": system, "cap": cap, "skipped": "unsloth not importable",
                                                       "trials": []}
                continue
            results.setdefault(system, {})[cap] = run_worker(system, cap, a, tokens_path, max_len, work)
            path, table = save_results(Path(a.out), results, command, model, source)  # a run cut short keeps these
    path, table = save_results(Path(a.out), results, command, model, source)
    print(table)
    print(f"written to {path}")
    return 0 if all(r.get("done") or r.get("skipped") for by_cap in results.values() for r in by_cap.values()) else 1


def save_results(out: Path, results: dict[str, dict[str, dict]], command: str, model: Path,
                 source: dict) -> tuple[Path, str]:
    """Write ``<out>/<date>-<gpu>-longest-seq.json``: this run's results merged into the file's (the
    caps may run as separate commands); returns the path and the table."""
    gpu = next((r["gpu"] for by_cap in results.values() for r in by_cap.values() if r.get("gpu")), "unknown")
    date = datetime.date.today().isoformat()
    slug = gpu.replace("NVIDIA ", "").replace(" ", "-").lower()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{date}-{slug}-longest-seq.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    merged = doc.get("results", {})
    for system, by_cap in results.items():
        merged.setdefault(system, {}).update(by_cap)
    caps = sorted({c for by_cap in merged.values() for c in by_cap},
                  key=lambda c: (c == "whole", 0.0 if c == "whole" else float(c)))
    table = render(merged, caps, [s for s in SYSTEMS if s in merged])
    commands = doc.get("commands", [])
    doc.update({"gpu": gpu, "date": date, "commands": commands + ([command] if command not in commands else []),
                "model": str(model), "tokens": source,
                "definition": "batch 1, one row of exactly L real tokens (labels = inputs), NF4 + LoRA r=16 on 7 "
                              "projections, gradient checkpointing 'unsloth', bf16, adamw_8bit: two optimizer steps "
                              "without running out of memory and peak reserved <= cap",
                "hizli_commit": _git_head(), "results": merged, "table": table})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)
    return path, table


def _git_head() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
