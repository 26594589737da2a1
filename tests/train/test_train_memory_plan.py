"""The memory plan: fastest layout that fits, what it predicts, and the retry after out-of-memory."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from hizli.train import step as step_mod
from hizli.train.args import TrainingArguments
from hizli.train.memory_plan import Shape, make_plan, split_rows, split_step
from hizli.train.trainer import SFTTrainer

from helpers import FakeTokenizer, tiny_lora_model, token_rows

GIB = 2**30
LLAMA_3B = Shape(layers=28, hidden=3072, kv=1024, intermediate=8192, vocab=128256, elt=2)


def _steps(n_rows=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [int(x) for x in torch.randint(200, 2048, (n_rows,), generator=g)]
    return [list(range(i, i + 8)) for i in range(0, n_rows, 8)], lengths


@pytest.mark.parametrize("budget", [3.5, 4, 8, 40, 132])
def test_plan_fits_its_budget_and_prefers_keeping(budget):
    steps, lengths = _steps()
    plan = make_plan(
        shape=LLAMA_3B,
        steps=steps,
        lengths=lengths,
        allowed=("keep", "recompute", "offload"),
        budget_bytes=budget * GIB,
        static_bytes=2.32 * GIB,
        max_parts=8,
    )
    assert plan.predicted_peak_gib <= budget and not plan.notes
    assert len(plan.layer_modes) == 28 and 1 <= plan.micro_batches <= 8
    if budget >= 40:  # room to keep every activation of a whole step
        assert plan.micro_batches == 1 and plan.layer_modes == ["keep"] * 28
    if budget <= 4:  # the step must be split and layers offloaded
        assert plan.micro_batches > 1 and "offload" in plan.layer_modes


def test_plan_respects_what_checkpointing_allows():
    steps, lengths = _steps()
    kw = dict(shape=LLAMA_3B, steps=steps, lengths=lengths, budget_bytes=8 * GIB, static_bytes=2.32 * GIB, max_parts=8)
    assert set(make_plan(allowed=("keep",), **kw).layer_modes) == {"keep"}
    assert "offload" not in make_plan(allowed=("keep", "recompute"), **kw).layer_modes


def test_plan_says_so_when_nothing_fits():
    steps, lengths = _steps()
    plan = make_plan(
        shape=LLAMA_3B,
        steps=steps,
        lengths=lengths,
        allowed=("keep", "recompute", "offload"),
        budget_bytes=2.4 * GIB,
        static_bytes=2.32 * GIB,
        max_parts=8,
    )
    assert plan.notes and "no plan fits" in plan.notes[0]


def test_split_rows_balances_tokens_and_keeps_every_row():
    lengths = [900, 100, 500, 500, 300, 700]
    groups = split_rows(range(6), lengths, 3)
    assert sorted(sum(groups, [])) == list(range(6))
    assert max(sum(lengths[r] for r in g) for g in groups) == 1000


def test_each_step_runs_as_few_micro_batches_as_its_rows_allow():
    """The token budget comes from the worst step; steps of short rows are not split as finely."""
    lengths = [2000, 1900, 300, 200, 250, 100, 150, 120]
    long_step, short_step = [0, 1, 2, 3], [4, 5, 6, 7]
    assert len(split_step(long_step, lengths, 4, 2000)) == 3  # 2000 | 1900 | 300+200
    short = split_step(short_step, lengths, 4, 2000)
    assert len(short) == 1 and sorted(short[0]) == short_step
    for budget, rows in ((2000, long_step), (600, short_step)):
        groups = split_step(rows, lengths, 4, budget)
        assert sorted(sum(groups, [])) == sorted(rows)
        assert max(sum(lengths[r] for r in g) for g in groups) <= budget
    # a row longer than the budget cannot be split: the most micro-batches allowed, nothing dropped
    assert sorted(sum(split_step([0, 4], lengths, 2, 1000), [])) == [0, 4]


def test_plan_counts_the_micro_batches_steps_really_run():
    """One step of long rows sets the budget; the time model sees the other steps' fewer micro-batches."""
    steps, lengths = _steps()
    lengths[:8] = [2048] * 8  # a worst-case first step
    plan = make_plan(
        shape=LLAMA_3B,
        steps=steps,
        lengths=lengths,
        allowed=("keep", "recompute", "offload"),
        budget_bytes=3.5 * GIB,
        static_bytes=2.32 * GIB,
        max_parts=8,
    )
    counts = [len(split_step(rows, lengths, plan.micro_batches, plan.tokens_per_micro_batch)) for rows in steps]
    assert counts[0] == plan.micro_batches and sum(counts[1:]) / len(counts[1:]) < plan.micro_batches


def _args(tmp_path, **kw):
    base = dict(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=5e-3,
        optim="adamw_torch",
        seed=0,
        save_strategy="no",
        output_dir=str(tmp_path),
        disable_tqdm=True,
        max_memory_gib=4.0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def test_out_of_memory_plans_again_and_repeats_the_step(tmp_path, monkeypatch, capsys):
    rows = token_rows(24, seed=5)
    expected = SFTTrainer(
        model=tiny_lora_model(), tokenizer=FakeTokenizer(), train_dataset=rows, args=_args(tmp_path / "a")
    ).train()
    real = step_mod.loss_sum
    calls = {"n": 0}

    def flaky(model, batch, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # in step 2
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        return real(model, batch, **kw)

    monkeypatch.setattr(step_mod, "loss_sum", flaky)
    trainer = SFTTrainer(
        model=tiny_lora_model(), tokenizer=FakeTokenizer(), train_dataset=rows, args=_args(tmp_path / "b")
    )
    stats = trainer.train()
    # fp32: a re-planned step splits its rows into other micro-batches, so its sums run in another order
    assert [e["loss"] for e in stats.log_history] == pytest.approx([e["loss"] for e in expected.log_history], rel=1e-5)
    assert trainer.memory_plan["budget_gib"] == pytest.approx(3.0)
    assert "ran out of memory; planning again for 3.00 GiB" in capsys.readouterr().err


def test_without_retries_out_of_memory_is_explained(tmp_path, monkeypatch):
    from hizli.train.oom import GPUOutOfMemoryError

    def oom(model, batch, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    monkeypatch.setattr(step_mod, "loss_sum", oom)
    trainer = SFTTrainer(
        model=tiny_lora_model(),
        tokenizer=FakeTokenizer(),
        train_dataset=token_rows(8),
        args=_args(tmp_path, oom_retries=0),
    )
    with pytest.raises(GPUOutOfMemoryError, match="2.00 GiB"):
        trainer.train()


FUSED_3B = Shape(28, 3072, 1024, 8192, 128256, 2, fused=True)


def _tight(steps, lengths):
    """The recipe's 3B model and optimizer (2.32 GiB) under a 3.1 GiB budget, any layer mode allowed."""
    return dict(
        steps=steps,
        lengths=lengths,
        allowed=("keep", "recompute", "offload"),
        budget_bytes=3.1 * GIB,
        static_bytes=2.32 * GIB,
        max_parts=8,
    )


def test_capped_plan_uses_the_room_between_row_counts():
    """The token budget is the most that fits, not only what whole splits of the worst step give;
    under max_memory_gib (the allocator capped too) the slack for cached blocks is smaller."""
    steps, lengths = _steps()
    kw = dict(shape=FUSED_3B, **_tight(steps, lengths))
    loose, tight = make_plan(**kw), make_plan(capped=True, **kw)
    for plan in (loose, tight):
        assert plan.predicted_peak_gib <= 3.1 and not plan.notes
        assert plan.tokens_per_micro_batch >= max(lengths)
        counts = [len(split_step(rows, lengths, 8, plan.tokens_per_micro_batch)) for rows in steps]
        assert max(counts) == plan.micro_batches
    assert tight.tokens_per_micro_batch > loose.tokens_per_micro_batch


def test_graphed_offloaded_layers_plan_their_pool_apart_from_the_loss():
    """With CUDA graphs of offloaded layers (``Shape.graphed``), their memory pool is held through the
    loss too: a tight budget takes fewer tokens at a time, still inside the budget; where every layer
    is kept (nothing offloaded) there are no graphs and the plan is unchanged."""
    steps, lengths = _steps()
    kw = dict(capped=True, **_tight(steps, lengths))
    for shape in (FUSED_3B, replace(FUSED_3B, mlp_unread=True)):
        eager = make_plan(shape=shape, **kw)
        graphed = make_plan(shape=replace(shape, graphed=True), **kw)
        assert set(graphed.layer_modes) == {"offload"} and not graphed.notes
        assert graphed.predicted_peak_gib <= 3.1
        assert graphed.tokens_per_micro_batch < eager.tokens_per_micro_batch
        roomy = dict(kw, budget_bytes=80 * GIB)
        assert make_plan(shape=shape, **roomy) == make_plan(shape=replace(shape, graphed=True), **roomy)


def test_offloaded_layers_with_the_mlp_deferred_fit_larger_micro_batches():
    """Where offloaded layers recompute their MLP only in backward (the fused MLP with its output
    unread), an offloaded layer holds less per token: a tight budget then takes more tokens at a
    time, with the predicted peak still inside it."""
    steps, lengths = _steps()
    kw = dict(capped=True, **_tight(steps, lengths))
    deferred_3b = replace(FUSED_3B, mlp_unread=True)
    full = make_plan(shape=FUSED_3B, **kw)
    deferred = make_plan(shape=deferred_3b, **kw)
    assert set(full.layer_modes) == set(deferred.layer_modes) == {"offload"}
    assert deferred.predicted_peak_gib <= 3.1 and not deferred.notes
    assert deferred.tokens_per_micro_batch > full.tokens_per_micro_batch
    # the deferral is only for offloaded layers: a plan that keeps every layer is unchanged
    roomy = dict(kw, budget_bytes=80 * GIB)
    assert make_plan(shape=FUSED_3B, **roomy) == make_plan(shape=deferred_3b, **roomy)
