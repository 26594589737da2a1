"""One trial of ``hizli bench longest``: two optimizer steps on one row of a given length, for hizli
(its own SFTTrainer, so its memory plan, offload and fused loss are what is measured) or for Unsloth
(its forward with labels under autocast, backward, clipping at 1.0 and bitsandbytes' AdamW8bit: what
its SFTTrainer does per step for one padding-free row, without rebuilding a trainer per trial; what
that leaves out costs no GPU memory, so any difference favours Unsloth).

Between trials every reference of the trial is dropped (optimizer, gradients, outputs and the frames
of a caught exception's traceback), then ``gc.collect()``, ``torch.cuda.empty_cache()`` and a reset of
the peak statistics.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from hizli.bench.longest.search import Trial

GIB = 1024**3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
        messages = [
            {"role": roles.get(t.get("from", t.get("role")), "user"), "content": t.get("value", t.get("content")) or ""}
            for t in turns
        ]
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


def measure(
    train_two_steps: Callable[[int], dict | None], length: int, model, cap_bytes: int | None, cuda: bool | None = None
) -> Trial:
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
    return Trial(
        len=length,
        ok=ok,
        seconds=round(seconds, 2),
        peak_reserved_gib=None if peak_reserved is None else round(peak_reserved, 3),
        peak_allocated_gib=None if peak_allocated is None else round(peak_allocated, 3),
        error=error,
        kind=kind,
        fatal=fatal,
        extra=extra,
    )


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
        from hizli import FastLanguageModel  # the front door, as the recipe imports it

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_dir, max_seq_length=max_len, dtype=None, load_in_4bit=True
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        target_modules=TARGETS,
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        use_rslora=False,
        loftq_config=None,
    )
    return model, tokenizer


def hizli_trainer_fn(model, tokenizer, tokens, max_memory_gib: float | None) -> Callable[[int], dict]:
    """Two optimizer steps on one row of ``length`` tokens through hizli's own SFTTrainer."""
    import torch

    from hizli import SFTTrainer, TrainingArguments

    def train_two_steps(length: int) -> dict:
        cuda = torch.cuda.is_available()
        bf16 = cuda and torch.cuda.is_bf16_supported()
        ids = [int(x) for x in tokens[:length]]
        with tempfile.TemporaryDirectory(prefix="hizli-longest-seq-") as out:
            args = TrainingArguments(
                output_dir=out,
                per_device_train_batch_size=1,
                gradient_accumulation_steps=1,
                max_steps=2,
                learning_rate=2e-4,
                warmup_steps=0,
                weight_decay=0.01,
                lr_scheduler_type="linear",
                seed=3407,
                bf16=bf16,
                fp16=cuda and not bf16,
                optim="adamw_8bit",
                logging_steps=1,
                save_strategy="no",
                eval_strategy="no",
                report_to="none",
                disable_tqdm=True,
                max_memory_gib=max_memory_gib if cuda else None,
                oom_retries=0,
            )
            trainer = SFTTrainer(
                model=model,
                tokenizer=tokenizer,
                train_dataset=[{"input_ids": ids, "labels": ids}],
                max_seq_length=length,
                args=args,
            )
            stats = trainer.train()
            steps = [e for e in stats.log_history if "loss" in e]
            if len(steps) != 2:
                raise RuntimeError(f"{len(steps)} of 2 optimizer steps ran")
            plan = trainer.memory_plan or {}
            modes = plan.get("layer_modes") or []
            return {
                "losses": [round(e["loss"], 4) for e in steps],
                "plan": {
                    "micro_batches": plan.get("micro_batches"),
                    "layers": {m: modes.count(m) for m in sorted(set(modes))},
                    "predicted_peak_gib": plan.get("predicted_peak_gib"),
                    "budget_gib": plan.get("budget_gib"),
                }
                if plan
                else None,
            }

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
