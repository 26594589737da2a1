"""A long run on the CPU: thousands of steps with checkpoints and rotation, memory flat.

The model and rows are tiny so that the run is long in steps, not in time (about half a minute
on a 2-core machine): what grows with the number of steps (the log history written into every
checkpoint, metrics.jsonl, rotated checkpoint folders, optimizer state) is what is under test.
"""

from __future__ import annotations

import os
import time

import pytest

from hizli.train import checkpoint, metrics
from hizli.train.args import TrainingArguments
from hizli.train.trainer import SFTTrainer

from helpers import FakeTokenizer, tiny_lora_model, token_rows

pytestmark = pytest.mark.reliability("soak")

STEPS, SAVE_STEPS, KEEP, WARM_UP = 2000, 50, 3, 200
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:  # Linux; the CI and this project's machines are Linux
        return int(f.read().split()[1]) * PAGE


def test_a_long_run_keeps_memory_flat_and_exactly_the_last_checkpoints(tmp_path, figures):
    args = TrainingArguments(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=STEPS,
        learning_rate=1e-3,
        warmup_steps=10,
        optim="adamw_8bit",
        seed=3407,
        save_steps=SAVE_STEPS,
        save_total_limit=KEEP,
        logging_steps=STEPS,
        disable_tqdm=True,
        output_dir=str(tmp_path),
    )
    samples: dict[int, int] = {}
    kept_counts: set[int] = set()

    def watch(entry):
        step = entry["step"]
        if step >= WARM_UP and step % 20 == 0:
            samples[step] = rss_bytes()
        if step > KEEP * SAVE_STEPS and step % SAVE_STEPS == 1:  # right after a save and its rotation
            kept_counts.add(len(checkpoint.list_checkpoints(tmp_path)))

    trainer = SFTTrainer(
        model=tiny_lora_model(),
        tokenizer=FakeTokenizer(),
        train_dataset=token_rows(64, seed=7, lo=4, hi=12),
        args=args,
        callbacks=[watch],
    )
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    assert out.global_step == STEPS
    kept = checkpoint.list_checkpoints(tmp_path)
    assert [p.name for p in kept] == [
        f"checkpoint-{s}" for s in range(STEPS - (KEEP - 1) * SAVE_STEPS, STEPS + 1, SAVE_STEPS)
    ]
    assert kept_counts == {KEEP}, f"checkpoints kept during the run: {sorted(kept_counts)}"
    assert not list(tmp_path.glob(".checkpoint-*"))
    checkpoint.verify(kept[-1])
    assert len(metrics.read_metrics(tmp_path)) == STEPS
    warm = samples[WARM_UP]
    peak = max(samples.values())
    growth = 100 * (peak - warm) / warm
    assert growth < 5, f"RSS grew {growth:.1f}% after warm-up ({warm >> 20} -> {peak >> 20} MiB)"
    # in a full session the process already holds GBs from other tests, and 5% of that could hide a leak:
    # also bound the growth itself (the log history of 2,000 steps is about 2 MiB)
    assert peak - warm < 32 << 20, f"RSS grew {(peak - warm) >> 20} MiB after warm-up"
    figures.set(
        steps=STEPS,
        checkpoints_written=STEPS // SAVE_STEPS,
        kept=len(kept),
        save_total_limit=KEEP,
        rss_warm_mib=warm >> 20,
        rss_end_mib=samples[max(samples)] >> 20,
        rss_growth_pct=round(growth, 2),
        rss_growth_mib=round((peak - warm) / 2**20, 1),
        seconds=round(seconds, 1),
    )
