"""CUDA graphs of offloaded layers' backward (``hizli.models.layer_graphs``): a replay gives the input
gradient and the LoRA gradients the eager backward gives, for every micro-batch of its length.

On a CPU the capture is emulated: ``LayerGraphs.capture`` runs the work once (a CUDA capture runs its
host code too) and returns it, so a "replay" runs the same calls on the same static buffers, as a
graph would relaunch its kernels on the same addresses. That checks what hizli adds around the graph (static inputs refilled per call,
sequence boundaries padded, gradients copied out and added to ``.grad``) with a real decoder layer
called the way transformers calls it. ``-m gpu`` trains with real graphs.
"""

from __future__ import annotations

import functools

import pytest
import torch

from helpers import tiny_lora_model, token_rows
from hizli.models import layer_graphs
from hizli.models.layer_graphs import LayerGraphs, padded_boundaries


def _layer_calls(model, batch):
    """(layer, fn, hidden) of each decoder layer's checkpointed call in one forward pass of ``batch``."""
    from hizli.models.checkpointing import decoder_layers
    from hizli.train import step as step_mod

    calls = []

    def record(fn, hidden, *args):
        calls.append((fn, hidden.detach()))
        return fn(hidden, *args)

    layers = decoder_layers(model)
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = record
    model.train()  # transformers checkpoints only in training, with autograd on
    step_mod.loss_sum(model, batch)
    assert len(calls) == len(layers) == 2
    return [(layer, fn, hidden) for layer, (fn, hidden) in zip(layers, calls)]


def _eager(layer, fn, hidden, grad_out):
    params = [p for p in layer.parameters() if p.requires_grad]
    h = hidden.clone().requires_grad_(True)
    with torch.enable_grad():
        out = fn(h)
    grads = torch.autograd.grad(out, [h, *params], grad_out)
    return grads[0], grads[1:]


def _batch(seed, n_rows):
    from hizli.data.collate import PaddingFreeCollator, pad_to_length
    from hizli.train import step as step_mod

    batch = PaddingFreeCollator()(token_rows(n_rows, seed=seed, lo=10, hi=25))
    return step_mod.to_device(pad_to_length(batch, 160), torch.device("cpu"))


def test_replays_give_the_eager_gradients_for_each_micro_batch_of_their_length():
    model = tiny_lora_model(checkpointing=True)
    captures = []
    graphs = LayerGraphs(capture=lambda work: (captures.append(1), _emulated(work))[1])
    graphs.reserve(256)
    g = torch.Generator().manual_seed(5)
    for micro, n_rows in enumerate((4, 6, 5)):  # same length (160), different sequences each time
        calls = _layer_calls(model, _batch(micro, n_rows))
        for layer, fn, hidden in reversed(calls):
            grad_out = torch.randn(hidden.shape, generator=g)
            want_dx, want = _eager(layer, fn, hidden, grad_out)
            params = [p for p in layer.parameters() if p.requires_grad]
            for p in params:
                p.grad = None
            dx = graphs.backward(layer, fn, hidden, grad_out, _no_context, lambda out: None)
            if dx is None:  # the first sighting of this length runs eagerly
                assert micro == 0 and layer is calls[-1][0]
                continue
            torch.testing.assert_close(dx, want_dx, rtol=1e-5, atol=1e-6)
            for p, w in zip(params, want):
                torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-6)
    assert len(captures) == 2  # one graph per layer, made once and replayed for later micro-batches
    assert graphs.replays == 5 and graphs.eager == 1


def test_replayed_gradients_add_to_what_earlier_micro_batches_left_in_grad():
    model = tiny_lora_model(checkpointing=True)
    graphs = LayerGraphs(capture=_emulated)
    graphs.reserve(256)
    layer, fn, hidden = _layer_calls(model, _batch(0, 4))[0]
    grad_out = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1))
    params = [p for p in layer.parameters() if p.requires_grad]
    _, once = _eager(layer, fn, hidden, grad_out)
    assert graphs.backward(layer, fn, hidden, grad_out, _no_context, lambda out: None) is None
    for p in params:
        p.grad = None
    for _ in range(2):  # captured, then replayed: the second adds to the first
        assert graphs.backward(layer, fn, hidden, grad_out, _no_context, lambda out: None) is not None
    for p, w in zip(params, once):
        torch.testing.assert_close(p.grad, 2 * w, rtol=1e-5, atol=1e-6)


def _emulated(work):
    work()
    return work


def _no_context():
    import contextlib

    return contextlib.nullcontext()


def test_forward_replays_give_the_layer_output_for_each_micro_batch_of_their_length():
    """The first pass of an offloaded layer (no autograd) through a graph."""
    model = tiny_lora_model(checkpointing=True)
    graphs = LayerGraphs(capture=_emulated)
    graphs.reserve(256)
    results = []
    for micro, n_rows in enumerate((4, 6, 5)):
        for layer, fn, hidden in _layer_calls(model, _batch(micro, n_rows)):
            with torch.no_grad():
                want = fn(hidden)
                got = graphs.forward(layer, fn, hidden)
            results.append(got is not None)
            if got is not None:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert results == [False] + [True] * 5 and graphs.replays == 5 and len(graphs.graphs) == 2


def test_a_layer_whose_output_a_graph_cannot_hold_runs_eagerly_without_capturing_again():
    model = tiny_lora_model(checkpointing=True)
    captures = []
    graphs = LayerGraphs(capture=lambda work: (captures.append(1), _emulated(work))[1])
    graphs.reserve(256)
    layer, fn, hidden = _layer_calls(model, _batch(0, 4))[0]
    pair = functools.partial(lambda *a, **k: (fn.func(*a, **k), None), *fn.args, **fn.keywords)  # a tuple out
    with torch.no_grad():
        assert all(graphs.forward(layer, pair, hidden) is None for _ in range(4))
    assert len(captures) == 1 and not graphs.graphs and graphs.failed is None


def test_micro_batches_a_graph_cannot_serve_run_eagerly():
    model = tiny_lora_model(checkpointing=True)
    graphs = LayerGraphs(capture=_emulated)
    graphs.reserve(100)  # smaller than the batch: its static buffers cannot hold it
    layer, fn, hidden = _layer_calls(model, _batch(0, 4))[0]
    grad_out = torch.ones_like(hidden)
    for _ in range(3):
        assert graphs.backward(layer, fn, hidden, grad_out, _no_context, lambda out: None) is None
    graphs.reserve(256)
    odd = functools.partial(fn.func, *fn.args, **{**fn.keywords, "extra": {"a": 1}})  # unhashable argument
    for _ in range(3):
        assert graphs.backward(layer, odd, hidden, grad_out, _no_context, lambda out: None) is None
    assert graphs.replays == 0 and graphs.eager == 6 and not graphs.graphs


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("operation not permitted when stream is capturing"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB"),  # no cache freed in a capture
    ],
)
def test_a_layer_that_cannot_be_captured_turns_graphs_off_and_runs_eagerly(monkeypatch, error):
    def refuse(work):
        raise error

    model = tiny_lora_model(checkpointing=True)
    graphs = LayerGraphs(capture=refuse)
    graphs.reserve(256)
    layer, fn, hidden = _layer_calls(model, _batch(0, 4))[0]
    grad_out = torch.ones_like(hidden)
    warned = []
    monkeypatch.setattr(layer_graphs._log, "warn_once", lambda key, message: warned.append(message))
    for _ in range(3):  # eager first sighting, a failed capture, then eager for the rest of the run
        assert graphs.backward(layer, fn, hidden, grad_out, _no_context, lambda out: None) is None
    assert str(error).split(".")[0] in graphs.failed and not graphs.graphs
    assert not graphs._flats and not graphs._scratch  # the static buffers' memory goes back to the run
    assert graphs.eager == 3 and len(warned) == 1 and "graphs of offloaded layers are off" in warned[0]


def test_a_capture_under_a_cap_starts_with_room_below_it(monkeypatch):
    """While a capture runs the allocator does not free its cache for a new segment: under a cap,
    a capture close to it frees the cache first; with room to spare, or without a cap, it does not."""
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    graphs = LayerGraphs()
    for cap_gib, reserved_gib, frees in ((3.074, 3.05, True), (3.074, 2.5, False), (0, 75.0, False)):
        emptied.clear()
        graphs.reserve(256, 0, int(cap_gib * 2**30))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None, r=reserved_gib: int(r * 2**30))
        graphs._make_room(torch.device("cuda", 0))
        assert bool(emptied) == frees, (cap_gib, reserved_gib)


def test_padded_sequence_boundaries_leave_attention_unchanged():
    """Empty sequences at the end of ``cu_seqlens`` (how a graph serves any number of sequences)."""
    from hizli.kernels.attention import varlen_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(50, h, 16, generator=g) for h in (4, 2, 2))
    cu = torch.tensor([0, 7, 30, 50], dtype=torch.int32)
    padded = padded_boundaries(cu, 8)
    assert padded.tolist() == [0, 7, 30, 50, 50, 50, 50, 50]
    torch.testing.assert_close(varlen_attention(q, k, v, padded, 50), varlen_attention(q, k, v, cu, 23))
    with pytest.raises(ValueError, match="do not fit"):
        padded_boundaries(cu, 3)


# ------------------------------------------------------------------------------------------------
# GPU: real graphs inside a capped training run


@pytest.mark.gpu
def test_gpu_capped_training_with_layer_graphs_matches_eager(tmp_path):
    """Offloaded layers under a tight cap, 12 steps: with graphs the losses track the eager run's
    (bf16; token buckets differ, so filler lengths and rounding do), most layer backwards replay,
    the reserved peak stays under the cap and the graphs' pool near the plan's (the captures use
    the block it was made with, not new ones beside it)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("bitsandbytes")
    import gc

    from helpers import gpu_llama_folder
    from hizli import FastLanguageModel, SFTTrainer, TrainingArguments, get_chat_template
    from hizli.data.load import load_conversations
    from hizli.data.sample import sample_path

    folder = gpu_llama_folder(tmp_path / "model")

    def run(graphs: bool, cap: float | None):
        model, tok = FastLanguageModel.from_pretrained(folder, max_seq_length=1024, dtype="bfloat16", load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(
            model, r=16, lora_alpha=16, use_gradient_checkpointing="unsloth", random_state=3407
        )
        tok = get_chat_template(tok, "llama-3.1" if len(tok) > 100_000 else "smollm2")
        args = TrainingArguments(
            per_device_train_batch_size=2,
            gradient_accumulation_steps=4,
            max_steps=12,
            learning_rate=2e-4,
            optim="adamw_torch",
            seed=3407,
            bf16=True,
            save_strategy="no",
            output_dir=str(tmp_path / f"run{int(graphs)}"),
            disable_tqdm=True,
            max_memory_gib=cap,
        )
        data = load_conversations(sample_path("sharegpt"))
        trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=data, max_seq_length=1024, args=args)
        trainer.graph_offloaded_layers = graphs
        stats = trainer.train()
        losses = [e["loss"] for e in stats.log_history if "loss" in e]
        counts, plan = trainer.layer_graph_counts, trainer.memory_plan
        del model, trainer
        gc.collect()
        torch.cuda.empty_cache()
        return losses, stats, counts, plan

    gc.collect()
    torch.cuda.empty_cache()
    cap = torch.cuda.memory_allocated() / 2**30 + 0.5
    graphed, stats, counts, plan = run(True, cap)
    eager, _, none, _ = run(False, cap)
    assert none is None and counts is not None and counts["failed"] is None
    rel = [abs(a - b) / abs(b) for a, b in zip(graphed, eager)]
    assert len(graphed) == len(eager) == 12 and max(rel) <= 0.02, list(zip(graphed, eager))
    assert stats.metrics["peak_reserved_gib"] <= cap
    assert counts["replays"] > counts["eager"], counts
    if counts["pool_gib"] is not None:  # None where this torch's MemPool has no snapshot()
        assert counts["pool_gib"] <= 1.25 * plan["graph_pool_gib"] + 0.05, (counts, plan["graph_pool_gib"])


def test_real_captures_are_refused_where_the_attention_reads_boundaries_on_the_host(monkeypatch):
    """flex attention builds its block mask from the boundaries on the host (and caches it), the
    reference loops over them: a graph would replay the captured micro-batch's. Such layers run
    eagerly instead of being captured (a real capture: no ``capture`` given)."""
    from hizli.kernels import attention

    model = tiny_lora_model(checkpointing=True)
    graphs = LayerGraphs()
    graphs.reserve(256)
    layer, fn, hidden = _layer_calls(model, _batch(0, 4))[0]
    captured = []
    monkeypatch.setattr(graphs, "_cuda_capture", lambda work: captured.append(work))
    assert attention.chosen_implementation(hidden.device, hidden.dtype) == "sdpa_loop"  # on a CPU
    with torch.no_grad():
        assert all(graphs.forward(layer, fn, hidden) is None for _ in range(3))
    assert not captured and not graphs.graphs and graphs.failed is None
    for name, capturable in (("flex", False), ("torch_varlen", True)):
        monkeypatch.setattr(attention, "chosen_implementation", lambda device, dtype, impl=None: name)
        graphs = LayerGraphs(capture=None)
        graphs.reserve(256)
        monkeypatch.setattr(graphs, "_cuda_capture", lambda work: (captured.append(work), lambda: None)[1])
        with torch.no_grad():
            graphs.forward(layer, fn, hidden)  # the eager first call
            graphs.forward(layer, fn, hidden)
        assert bool(captured) == capturable, name


def test_after_an_invalidated_capture_the_pool_routing_is_ended_once(monkeypatch):
    """Where PyTorch's ``capture_end`` raised before it stopped routing allocations to the pool (the
    allocator then never frees its cache on a retry), hizli ends it and drops the capture's pool
    reference; where PyTorch had ended it already, nothing more is done."""
    calls = []

    def end(device, pool):
        calls.append(("end", device, pool))
        if routing_ended:
            raise RuntimeError("endAllocatePool: not currently recording to mempool_id")

    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", end, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_releasePool", lambda d, p: calls.append(("release", d, p)), raising=False)
    for routing_ended, expected in ((False, ["end", "release"]), (True, ["end"])):
        calls.clear()
        layer_graphs._stop_routing(torch.device("cuda", 1), (7, 0))
        assert [c[0] for c in calls] == expected and all(c[1:] == (1, (7, 0)) for c in calls)
