"""``hizli bench compare``'s matching of each hizli figure with the peer at the same memory, its T4
batch search, and the command line's suites (no GPU needed: the runs are stand-ins)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hizli.bench.compare import matched, render, search_t4_batch, t4_first_batch
from hizli.bench.peers import batch_shape

ROOT = Path(__file__).resolve().parents[2]


def run(system, tokens, peak, **more):
    return {"system": system, "tokens_per_s": tokens, "peak_reserved_gib": peak, "losses": [12.4, 10.8], **more}


def test_each_hizli_figure_is_set_against_the_peer_at_its_memory():
    found = {
        "unsloth_best": run("unsloth_best", 6367, 3.094),
        "unsloth": run("unsloth", 7164, 3.189),
        "hizli_capped": run("hizli_capped", 11324, 3.164, cap_gib=3.189),
        "unsloth_big": run("unsloth_big", 19862, 33.6),
        "hizli": run("hizli", 23899, 32.7),
        "unsloth_t4": run("unsloth_t4", 3000, 14.2, batch=4),
        "hizli_t4": run("hizli_t4", 6000, 14.9, cap_gib=15.0),
        "hf": run("hf", 4677, 5.9),
    }
    rows = {r["pair"]: r for r in matched(found)}
    capped = rows["capped at the seed modes' peak"]
    assert capped["peer"] == "unsloth" and capped["ratio"] == round(11324 / 7164, 3)  # the faster seed mode
    assert rows["large GPU"]["peer"] == "unsloth_big" and rows["large GPU"]["ratio"] == round(23899 / 19862, 3)
    t4 = rows["T4 class (fp16, cap)"]
    assert t4["peer"] == "unsloth_t4" and t4["peer_batch"] == 4 and t4["ratio"] == 2.0
    table = render(found, list(rows.values()))
    assert table.splitlines()[0].startswith("at the same memory") and "unsloth_t4 b4" in table and "hf" in table


def test_a_pair_without_its_peer_is_left_out():
    rows = matched({"hizli": run("hizli", 27612, 32.8), "unsloth": run("unsloth", 7164, 3.189)})
    assert rows == []  # no unsloth_big: the default run has no peer at its memory, and no ratio is made up


def test_t4_search_finds_the_largest_batch_under_the_cap():
    tried = []

    def fake(batch):  # fits up to batch 6 (peak grows with the batch), out of memory above
        tried.append(batch)
        if batch > 6:
            return None
        return {"tokens_per_s": 1000 + 100 * batch, "peak_reserved_gib": 2.0 * batch, "batch": batch}

    best, tries = search_t4_batch(fake, cap_gib=15.0, max_batch=64, max_tries=10)
    assert best["batch"] == 6 and tried[:4] == [1, 2, 4, 8]
    assert [t["batch"] for t in tries if t["ok"]] == [1, 2, 4, 6] and not [
        t for t in tries if t["batch"] > 6 and t["ok"]
    ]


def test_t4_search_counts_a_run_over_the_cap_as_not_fitting_and_stops_at_the_try_limit():
    best, tries = search_t4_batch(
        lambda b: {"tokens_per_s": 10.0 * b, "peak_reserved_gib": 4.0 * b}, cap_gib=15.0, max_batch=64, max_tries=3
    )
    assert best["peak_reserved_gib"] == 8.0 and [t["batch"] for t in tries] == [1, 2, 4]
    assert search_t4_batch(lambda b: None, 15.0, 64, 6)[0] is None


def test_t4_search_starts_where_the_seed_modes_peak_says_the_rows_fit():
    seeds = {"unsloth_best": run("unsloth_best", 9986, 3.074), "unsloth": run("unsloth", 7106, 3.3)}
    assert t4_first_batch(seeds, 15.0) == 8  # 2 rows took 3.074 GiB: 9 rows would fit, 8 is the power of two
    assert t4_first_batch({"unsloth_best": run("unsloth_best", 5382, 6.84)}, 15.0) == 4
    assert t4_first_batch({}, 15.0) == 1  # no seed mode measured: from 1, as before
    assert t4_first_batch({"unsloth": run("unsloth", 100, 40.0)}, 15.0) == 1  # a seed over the cap

    def fits_up_to(largest):
        tried = []

        def fake(batch):
            tried.append(batch)
            return {"tokens_per_s": 100.0 * batch, "peak_reserved_gib": 0.5 * batch} if batch <= largest else None

        return fake, tried

    fake, from_one = fits_up_to(26)
    assert search_t4_batch(fake, 15.0, 64, 12)[0]["peak_reserved_gib"] == 13.0
    fake, from_guess = fits_up_to(26)
    best, _ = search_t4_batch(fake, 15.0, 64, 12, start=t4_first_batch(seeds, 15.0))
    assert best["peak_reserved_gib"] == 13.0 and from_guess[0] == 8 and len(from_guess) == len(from_one) - 3

    fake, tried = fits_up_to(5)  # a guess too high: the search goes below it
    best, _ = search_t4_batch(fake, 15.0, 64, 12, start=8)
    assert tried == [8, 4, 6, 5] and best["peak_reserved_gib"] == 2.5


@pytest.mark.parametrize(
    "systems, first_batch, first_try",
    [(("unsloth_best", "unsloth_t4"), None, 8), (("unsloth_t4",), None, 1), (("unsloth_t4",), 16, 16)],
)
def test_the_compare_starts_the_t4_search_from_its_seed_run_or_the_given_batch(
    tmp_path, monkeypatch, systems, first_batch, first_try
):
    """In a compare, the T4 search starts from the seed mode measured before it; a call that does not
    run one (to save its minutes) can name the batch with ``--t4-first-batch``."""
    from hizli.bench import compare, shapes
    from hizli.cli import build_parser

    monkeypatch.setattr(shapes, "recipe_model_folder", lambda shape, tokenizer, work: tmp_path / "model")
    monkeypatch.setattr(compare, "importable", lambda module: True)
    tried = []

    def peer(bench, model, kind, batch=None, cap_gib=None):
        if kind != "unsloth_t4":
            return run(kind, 9986, 3.074)
        tried.append(batch)
        return run(kind, 100.0 * batch, 0.5 * batch, batch=batch) if batch <= 26 else None

    monkeypatch.setattr(compare, "run_peer", peer)
    found, _ = compare.run_compare(
        compare.CompareBench(systems=systems, work=str(tmp_path), t4_max_tries=12, t4_first_batch=first_batch)
    )
    assert tried[0] == first_try and found["unsloth_t4"]["batch"] == 26
    args = build_parser().parse_args(["bench", "compare", "--t4-first-batch", "16"])
    assert args.t4_first_batch == 16


def test_peer_batch_shapes():
    assert batch_shape("unsloth", None) == (2, 4) and batch_shape("unsloth_big", None) == (8, 1)
    assert batch_shape("unsloth_t4", 2) == (2, 4) and batch_shape("unsloth_t4", 16) == (16, 1)


def test_bench_without_a_suite_is_the_recipe_as_before():
    from hizli.cli import build_parser

    old = build_parser().parse_args(["bench", "--model", "tiny", "--steps", "3", "--max-memory-gib", "3.1"])
    new = build_parser().parse_args(["bench", "recipe", "--model", "tiny", "--steps", "3", "--max-memory-gib", "3.1"])
    assert old.suite is None and new.suite == "recipe"
    for key in ("model", "steps", "max_memory_gib", "batch", "lever"):
        assert getattr(old, key) == getattr(new, key)
    assert build_parser().parse_args(["bench", "kernels", "--counts"]).counts


def test_cpu_demo_preset_is_the_demo_recipe():
    from hizli.bench.recipe import CPU_DEMO
    from hizli.config import load_recipe

    recipe = load_recipe(ROOT / "configs" / "demo-cpu.yaml")
    assert (CPU_DEMO.model, CPU_DEMO.seq_len, CPU_DEMO.chat_template, CPU_DEMO.data) == (
        recipe.model.name,
        recipe.model.max_seq_length,
        recipe.data.chat_template,
        recipe.data.dataset,
    )
    assert (CPU_DEMO.steps, CPU_DEMO.batch, CPU_DEMO.grad_accum, CPU_DEMO.load_in_4bit) == (
        recipe.train.max_steps,
        recipe.train.per_device_train_batch_size,
        recipe.train.gradient_accumulation_steps,
        recipe.model.load_in_4bit,
    )
    assert recipe.lora.r == 16 and recipe.lora.use_gradient_checkpointing == "unsloth"  # as the bench's LoRA


@pytest.mark.parametrize("bad", [["x=on"], ["fused_ce=maybe"]])
def test_levers_name_the_fix(bad):
    from hizli.bench.recipe import parse_levers

    with pytest.raises(ValueError, match="NAME=on|off"):
        parse_levers(bad)


def test_each_record_is_kept_as_its_run_ends_so_a_call_cut_short_keeps_them(tmp_path, monkeypatch):
    """A GPU call that hits its time limit mid-compare still leaves the records of the runs that ended,
    the hizli one with its matched peer."""
    from hizli.bench import compare, results, shapes

    monkeypatch.setattr(shapes, "recipe_model_folder", lambda shape, tokenizer, work: tmp_path / "model")
    monkeypatch.setattr(compare, "importable", lambda module: True)
    monkeypatch.setattr(compare, "run_peer", lambda bench, model, kind, *a: run(kind, 7106, 3.074))

    def hizli_run(bench, model, name, extra):
        if name == "hizli":
            raise KeyboardInterrupt  # the call's time limit, while the second hizli run trains
        assert extra == ["--max-memory-gib", "3.074"]  # capped at the seed mode's peak
        return run(name, 10143, 3.06, cap_gib=3.074, batch=2, grad_accum=4, dtype="bf16")

    monkeypatch.setattr(compare, "run_hizli", hizli_run)
    bench = compare.CompareBench(systems=("unsloth_best", "hizli_capped", "unsloth_big", "hizli"), work=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        compare.bench_compare(bench, results_dir=str(tmp_path / "results"))
    kept = results.read(tmp_path / "results" / "compare.jsonl")
    assert [r["system"] for r in kept] == ["unsloth_best", "hizli_capped", "unsloth_big"]
    assert len({r["call"] for r in kept}) == 1  # one call, as the pairs' comparison needs
    capped = kept[1]["metrics"]["matched"]
    assert capped["peer"] == "unsloth_best" and capped["ratio"] == round(10143 / 7106, 3)


def test_each_shapes_run_logs_are_kept_when_the_next_shape_is_compared(tmp_path, monkeypatch):
    """A call that compares two shapes in turn keeps both shapes' logs and results to read afterwards."""
    import json

    from hizli.bench import compare

    def fake_run(cmd, log, timeout, env):
        out = Path(cmd[cmd.index("--json") + 1])
        settings = {"batch": 2, "grad_accum": 4, "dtype": "bf16", "max_memory_gib": None}
        record = {"settings": settings, "metrics": {"tokens_per_s": 1.0}, "command": "hizli", "env": {}}
        out.write_text(json.dumps(record))
        log.write_text(f"trained {out.parent.name}\n")
        return 0

    monkeypatch.setattr(compare, "_run", fake_run)
    for shape in ("llama-3.2-3b", "qwen2.5-3b"):
        bench = compare.CompareBench(shape=shape, work=str(tmp_path))
        assert compare.run_hizli(bench, tmp_path / "model", "hizli", []) is not None
    for shape in ("llama-3.2-3b", "qwen2.5-3b"):
        log = tmp_path / "runs" / shape / "hizli.log"
        assert log.read_text() == f"trained {shape}\n"
