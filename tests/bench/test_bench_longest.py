"""``hizli bench longest``: its search on fake predicates, its trial wrapper, the hizli trial on a tiny
Llama on the CPU (where the cap is ignored, so the code path runs without a GPU), and the whole suite
through the command line."""

from __future__ import annotations

import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from hizli.bench import results
from hizli.bench.longest.run import render
from hizli.bench.longest.search import Trial, cap_label, find_longest, parse_caps
from hizli.bench.longest.trials import (
    hizli_trainer_fn,
    load_recipe_model,
    measure,
    report_free_within_cap,
    token_stream,
    unsloth_step_fn,
)

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3


def lengths(result, recheck=False):
    return [t.len for t in result.trials if t.recheck == recheck]


# ------------------------------------------------------------------------------------------- search
def test_grows_by_two_then_bisects_to_the_threshold():
    r = find_longest(lambda n: n <= 10_000, start=1024, limit=131072, resolution=256)
    assert lengths(r)[:5] == [1024, 2048, 4096, 8192, 16384]
    assert r.longest_ok <= 10_000 < r.first_fail and r.first_fail - r.longest_ok <= 256
    assert not r.reached_limit and r.stopped is None
    assert len(lengths(r)) == 5 + 5  # growth, then log2(8192 / 256) halvings
    assert lengths(r, recheck=True) == [r.longest_ok] and r.rechecked is True  # a failure happened: rechecked


def test_threshold_above_the_limit_stops_at_the_limit():
    r = find_longest(lambda n: True, start=4096, limit=100_000, resolution=1024)
    assert lengths(r) == [4096, 8192, 16384, 32768, 65536, 100_000]  # the last step clipped to the limit
    assert r.longest_ok == 100_000 and r.first_fail is None and r.reached_limit
    assert r.rechecked is None  # nothing failed, so nothing could have fragmented memory


def test_failure_at_the_start_searches_below_it():
    r = find_longest(lambda n: n <= 1500, start=4096, limit=131072, resolution=256)
    assert lengths(r)[0] == 4096 and max(lengths(r)[1:]) < 4096
    assert r.longest_ok <= 1500 < r.first_fail and r.first_fail - r.longest_ok <= 256

    nothing = find_longest(lambda n: False, start=4096, limit=131072, resolution=1024)
    assert nothing.longest_ok is None and nothing.first_fail == 1024 and nothing.rechecked is None
    assert lengths(nothing) == [4096, 2048, 1024]


@pytest.mark.parametrize("resolution", [64, 1024, 4096])
def test_resolution_is_respected(resolution):
    r = find_longest(lambda n: n <= 77_777, start=4096, limit=131072, resolution=resolution)
    assert 0 < r.first_fail - r.longest_ok <= resolution
    assert all(n % resolution == 0 or n == 131072 for n in lengths(r))  # on the grid when start is
    assert len(set(lengths(r))) == len(lengths(r))  # no length tried twice by the search


def test_one_length_alone():
    r = find_longest(lambda n: True, start=20_000, limit=20_000, resolution=20_000)
    assert lengths(r) == [20_000] and r.longest_ok == 20_000


def test_recheck_reports_a_length_that_no_longer_trains():
    seen: set[int] = set()

    def fragmenting(n):  # a length trains the first time only (as if a failure had fragmented memory)
        ok = n <= 10_000 and n not in seen
        seen.add(n)
        return ok

    r = find_longest(fragmenting, start=4096, limit=131072, resolution=1024)
    assert r.rechecked is False and r.trials[-1].recheck and r.trials[-1].len == r.longest_ok

    assert find_longest(lambda n: True, 4096, 8192, 1024, recheck="always").rechecked is True
    never = find_longest(lambda n: n < 5000, 4096, 8192, 1024, recheck="never")
    assert never.rechecked is None and not any(t.recheck for t in never.trials)


def test_slow_success_stops_the_search_upwards():
    def timed(n):
        return Trial(len=n, ok=True, seconds=n / 1000)

    r = find_longest(timed, start=1024, limit=131072, resolution=1024, trial_timeout=10)
    assert lengths(r) == [1024, 2048, 4096, 8192, 16384]  # 16.4 s > 10 s: 32768 is not tried
    assert r.longest_ok == 16384 and r.first_fail is None and not r.reached_limit
    assert "16384" in r.stopped and "--trial-timeout" in r.stopped


def test_a_slow_first_trial_does_not_stop_the_search():
    r = find_longest(
        lambda n: Trial(len=n, ok=True, seconds=300 if n == 1024 else 1),
        start=1024,
        limit=4096,
        resolution=1024,
        trial_timeout=90,
    )
    assert lengths(r) == [1024, 2048, 4096] and r.stopped is None  # compilation and warm-up are paid once


def test_slow_bisection_trial_stops_too():
    def timed(n):
        return Trial(len=n, ok=n <= 40_000, seconds=n / 1000)

    r = find_longest(timed, start=4096, limit=131072, resolution=1024, trial_timeout=35)
    # 65536 and 49152 fail; 40960 fails; 36864 trains in 36.9 s > 35 s: the bisection stops there
    assert r.first_fail == 40960 and r.longest_ok == 36864 and "36864" in r.stopped


def test_fatal_trial_ends_the_search():
    def broken(n):
        if n >= 8192:
            return Trial(len=n, ok=False, error="CUDA error: an illegal memory access", kind="error", fatal=True)
        return True

    r = find_longest(broken, start=4096, limit=131072, resolution=1024)
    assert lengths(r) == [4096, 8192] and r.rechecked is None
    assert r.longest_ok == 4096 and r.first_fail == 8192 and "illegal memory access" in r.stopped


def test_search_budget():
    now = [0.0]

    def clock():
        return now[0]

    def slow(n):
        now[0] += 30
        return True

    r = find_longest(slow, start=1024, limit=131072, resolution=1024, budget_s=100, clock=clock)
    assert lengths(r) == [1024, 2048, 4096, 8192] and "budget" in r.stopped

    now[0] = 0.0
    r = find_longest(
        lambda n: slow(n) and n < 3000, start=1024, limit=131072, resolution=256, budget_s=100, clock=clock
    )
    assert lengths(r) == [1024, 2048, 4096, 3072] and r.rechecked is None  # no recheck past the budget


def test_arguments_are_checked():
    with pytest.raises(ValueError):
        find_longest(lambda n: True, 0, 10, 1)
    with pytest.raises(ValueError):
        find_longest(lambda n: True, 1, 10, 1, recheck="sometimes")


# ------------------------------------------------------------------------------------------- trials
def test_a_failed_trial_lets_go_of_its_tensors():
    model = torch.nn.Linear(4, 4)
    kept = {}

    def out_of_memory(n):
        activations = torch.zeros(n, 4)
        kept["ref"] = weakref.ref(activations)
        model(activations).sum().backward()  # gradients are set, as a failed step would leave them
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total ...")

    trial = measure(out_of_memory, 1000, model, cap_bytes=None, cuda=False)
    assert not trial.ok and trial.kind == "oom" and trial.error.startswith("OutOfMemoryError: CUDA out of memory")
    assert kept["ref"]() is None  # the traceback's frames were cleared: the activations are gone
    assert all(p.grad is None for p in model.parameters())


def test_trial_failure_kinds():
    model = torch.nn.Linear(2, 2)

    def explained(n):  # hizli re-raises an OOM as its own explained error, from the original
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as e:
            raise RuntimeError("step 1 ran out of GPU memory ...") from e

    def bug(n):
        raise ValueError("a bug")

    assert measure(explained, 8, model, None, cuda=False).kind == "oom"
    failed = measure(bug, 8, model, None, cuda=False)
    assert failed.kind == "error" and failed.error == "ValueError: a bug" and not failed.fatal
    ok = measure(lambda n: {"losses": [1.0, 0.9]}, 8, model, None, cuda=False)
    assert ok.ok and ok.extra == {"losses": [1.0, 0.9]} and ok.seconds >= 0


def test_free_memory_reported_within_the_cap(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * GIB, 141 * GIB))
    monkeypatch.setattr(torch.cuda.memory, "mem_get_info", torch.cuda.mem_get_info)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * GIB)
    report_free_within_cap(8 * GIB)
    assert torch.cuda.mem_get_info() == (5 * GIB, 141 * GIB)  # an 8 GiB card holding 3 GiB
    assert torch.cuda.memory.mem_get_info(0) == (5 * GIB, 141 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 9 * GIB)
    assert torch.cuda.mem_get_info()[0] == 0


def test_parse_caps():
    assert parse_caps("8, whole") == ["8", "whole"]
    assert parse_caps("7.5") == ["7.5"] and cap_label("7.5") == "7.5 GiB"
    for bad in ("", "0", "-1", "eight", "8,all"):
        with pytest.raises(ValueError):
            parse_caps(bad)


def test_render_says_who_went_further():
    def entry(longest, limit=False):
        return {
            "done": True,
            "longest_ok": longest,
            "first_fail": None if limit else longest + 1024,
            "reached_limit": limit,
            "rechecked": True,
            "trials": [{"len": longest, "ok": True, "peak_reserved_gib": 7.9}],
        }

    results = {
        "hizli": {"8": entry(30720), "whole": entry(131072, True)},
        "unsloth": {"8": entry(20480), "whole": entry(131072, True)},
    }
    table = render(results, ["8", "whole"], ["hizli", "unsloth"])
    assert "8 GiB: hizli 30,720 vs Unsloth 20,480 tokens: hizli >= Unsloth" in table
    assert "whole card: hizli 131,072 vs Unsloth 131,072 tokens: hizli >= Unsloth (both reached max_len)" in table


# ------------------------------------------------------------------------------------------- data and hizli
SAMPLE = ROOT / "src" / "hizli" / "data" / "sample" / "sharegpt_sample.jsonl"


def test_token_stream_is_real_text_cut_to_length(tiny_model_dir, tmp_path):
    ids, source = token_stream(tiny_model_dir, SAMPLE, 3000)
    again, _ = token_stream(tiny_model_dir, SAMPLE, 3000)
    assert len(ids) == 3000 and ids == again and not source["repeated"] and source["rows"] >= 1
    assert all(0 <= i < 49152 for i in ids) and len(set(ids)) > 300  # text, not one repeated id
    short = SAMPLE.read_text().splitlines()[0]
    data = tmp_path / "one-row.jsonl"
    data.write_text(short + "\n")
    more, info = token_stream(tiny_model_dir, data, 50_000)
    assert len(more) == 50_000 and info["repeated"]


def test_hizli_trial_on_a_tiny_model(tiny_model_dir):
    """The worker's hizli path: load once, then two trials of two optimizer steps through hizli's own
    SFTTrainer (on the CPU: no cap, so no memory plan; the code path is the GPU's)."""
    model, tokenizer = load_recipe_model("hizli", tiny_model_dir, 256)
    tokens, _ = token_stream(tiny_model_dir, SAMPLE, 256)
    train = hizli_trainer_fn(model, tokenizer, tokens, max_memory_gib=8.0)
    r = find_longest(lambda n: measure(train, n, model, None), start=64, limit=128, resolution=64)
    assert [(t.len, t.ok) for t in r.trials] == [(64, True), (128, True)], [t.error for t in r.trials]
    assert r.longest_ok == 128 and r.reached_limit
    for t in r.trials:
        assert len(t.extra["losses"]) == 2 and all(x == x for x in t.extra["losses"])
    assert all(p.grad is None for p in model.parameters())  # released between trials


def test_unsloth_step_loop_on_a_stand_in_model():
    """The Unsloth worker's training loop (forward with labels, backward, clip, AdamW8bit, twice),
    run on the CPU with a tiny LoRA Llama standing in for Unsloth's model (Unsloth needs a GPU)."""
    from helpers import tiny_lora_model

    model = tiny_lora_model(vocab=512)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tokens = torch.randint(3, 512, (200,)).tolist()
    trial = measure(unsloth_step_fn(model, tokens), 150, model, None)
    assert trial.ok, trial.error
    assert len(trial.extra["losses"]) == 2
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed  # the optimizer stepped
    assert all(p.grad is None for p in model.parameters())


def test_the_suite_on_the_cpu(tiny_model_dir, tmp_path):
    """``hizli bench longest`` end to end: parent and worker processes, the table and the records
    (hizli only: Unsloth is not installed here, or is skipped if it is; one length tried)."""
    cmd = [
        sys.executable,
        "-m",
        "hizli.cli",
        "bench",
        "longest",
        "--systems",
        "hizli",
        "--caps",
        "whole",
        "--model",
        tiny_model_dir,
        "--data",
        str(SAMPLE),
        "--start",
        "96",
        "--max-len",
        "96",
        "--resolution",
        "96",
        "--work",
        str(tmp_path / "work"),
        "--results",
        str(tmp_path / "results"),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "whole card  hizli" in proc.stdout
    [record] = results.read(tmp_path / "results" / "longest.jsonl")
    assert results.validate_record(record) == []
    assert record["system"] == "hizli" and record["device"]["type"] == "cpu" and record["settings"]["cap"] == "whole"
    m = record["metrics"]
    assert m["longest_ok"] == 96 and m["reached_limit"] and [(t["len"], t["ok"]) for t in m["trials"]] == [(96, True)]
    assert record["settings"]["tokens"]["tokens"] == 96 and record["command"].startswith("hizli bench longest")
