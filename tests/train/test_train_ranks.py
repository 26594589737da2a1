"""How a step's rows are dealt to ranks, what a lone process does, and the errors of several processes.
The training runs themselves are in tests/train/test_train_distributed.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hizli.train.args import TrainingArguments
from hizli.train.ranks import Ranks, cut, deal_rows, equal_passes


def test_rows_are_dealt_token_balanced_once_each_and_the_same_everywhere():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 2000, (64,), generator=g).tolist()
    step = [list(range(i, i + 4)) for i in range(0, 32, 4)]  # 8 micro-batches of 4 rows
    for world in (2, 3, 4):
        owned = deal_rows(step, lengths, world)
        assert sorted(i for rows in owned for i in rows) == list(range(32))
        loads = [sum(lengths[i] for i in rows) for rows in owned]
        # greedy longest-first: no rank carries more than the lightest plus one row
        assert max(loads) - min(loads) <= max(lengths[i] for i in range(32))
        assert deal_rows(step, lengths, world) == owned


def test_a_rank_with_fewer_micro_batches_gets_fillers_at_the_busiest_count():
    lengths = [100, 90, 80, 10, 10, 10, 10, 10]
    owned = deal_rows([list(range(8))], lengths, 2)
    per_rank = [cut(rows, 1) for rows in owned]
    counts = [len(p) for p in per_rank]
    assert counts[0] != counts[1]
    for rank in range(2):
        share = equal_passes(per_rank, rank, lengths)
        assert share.groups == per_rank[rank]
        assert len(share.groups) + len(share.fillers) == max(counts)
        assert all(f == [3] for f in share.fillers)  # the step's shortest row (lowest index on ties)


def test_a_lone_process_is_rank_zero_of_one_and_every_collective_is_a_no_op():
    ranks = Ranks.current()
    assert (ranks.rank, ranks.world_size, ranks.grouped, ranks.is_main) == (0, 1, False, True)
    value = torch.tensor([3.0])
    assert ranks.sum(value) is value and value.item() == 3.0
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 5.0)
    ranks.sum_gradients([p])
    assert p.grad.tolist() == [5.0, 5.0]
    assert ranks.gather("x") == ["x"]


def test_keep_global_batch_divides_accumulation_or_says_why_not():
    args = TrainingArguments(gradient_accumulation_steps=4, keep_global_batch=True)
    assert [args.accumulation(n) for n in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4 cannot be divided by 3 ranks"):
        args.accumulation(3)
    assert TrainingArguments(gradient_accumulation_steps=4).accumulation(3) == 4  # transformers' meaning
    with pytest.raises(ValueError, match="parallel='zero3'"):
        TrainingArguments(parallel="zero3")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a host without GPUs")
def test_gpus_on_a_host_without_them_points_to_torchrun(capsys):
    from hizli.cli import main

    assert main(["train", "configs/demo-cpu.yaml", "--gpus", "2"]) == 2
    err = capsys.readouterr().err
    assert "--gpus 2: this host has 0 GPU(s)" in err and "torchrun --nproc-per-node N" in err


STALL = """
import sys, time, torch
from hizli.train.ranks import Ranks, RankError
ranks = Ranks.current()
if ranks.rank == 1:
    time.sleep(9)  # never reaches the collective in time (3 s), nor the barrier that names it (3 s more)
    sys.exit(0)
try:
    ranks.sum(torch.ones(1))
except RankError as e:
    print("ERROR", e, flush=True)
    sys.exit(3)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on Linux/macOS")
def test_a_stalled_rank_is_named(tmp_path):
    script = tmp_path / "stall.py"
    script.write_text(STALL)
    env = {**os.environ, "HIZLI_DIST_TIMEOUT_MIN": "0.05", "OMP_NUM_THREADS": "1"}  # 3 s
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    result = subprocess.run(run, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    line = next(x for x in result.stdout.splitlines() if x.startswith("ERROR"))
    assert "rank 0: a collective failed" in line and "Ranks 1 failed to pass monitoredBarrier" in line


def test_device_map_auto_under_torchrun_is_refused_before_loading(monkeypatch):
    from hizli import FastLanguageModel

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="device_map='auto' under torchrun spreads one model"):
        FastLanguageModel.from_pretrained("smollm2-135m-instruct", device_map="auto")
