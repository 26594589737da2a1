"""Continuous batching gives every request the answer it would get alone.

A random tiny Llama (2 layers, the embedded model's vocabulary) keeps these fast; greedy decoding
makes answers comparable token for token with transformers' own ``generate``.
"""

from __future__ import annotations

import time

import pytest
import torch

from hizli.serve.engine import Engine, Request
from hizli.serve.kv_forward import BASE_ADAPTER, Chunk, SlotModel
from hizli.serve.sampling import SamplingParams, TextStream

# fp32 on CPU: a batched matmul sums in another order than a single row's (about 1e-6 relative)
ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model


def _solo(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("padded", [False, True], ids=["per-row-attention", "padded-attention"])
def test_one_step_mixes_decode_rows_and_prompt_chunks(tiny, padded):
    torch.manual_seed(1)
    seqs = [torch.randint(3, 500, (n,)).tolist() for n in (9, 4, 13)]
    sm = SlotModel(tiny, max_slots=4, context=64)
    sm.padded_decode = padded
    sm.step([], [Chunk(0, 0, seqs[0][:8]), Chunk(1, 0, seqs[1][:3])])  # prompts, the first split in two chunks
    logits = sm.step([Chunk(0, 8, seqs[0][8:]), Chunk(1, 3, seqs[1][3:])], [Chunk(2, 0, seqs[2])])
    with torch.no_grad():
        for row, s in enumerate(seqs):
            ref = tiny(torch.tensor([s])).logits[0, -1]
            torch.testing.assert_close(logits[row], ref, atol=ATOL, rtol=0)


def test_rows_use_their_own_lora_adapter(tiny):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    cfg = dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
        init_lora_weights=False,
    )  # random B, so that each adapter changes the answer
    peft = get_peft_model(tiny, LoraConfig(**cfg), adapter_name="first")
    peft.add_adapter("second", LoraConfig(**cfg))
    peft.eval()
    try:
        seq = torch.randint(3, 500, (7,)).tolist()
        sm = SlotModel(peft, max_slots=3, context=32)
        sm.mixed = True
        logits = sm.step([], [Chunk(0, 0, seq, "first"), Chunk(1, 0, seq, "second"), Chunk(2, 0, seq, BASE_ADAPTER)])
        with torch.no_grad():
            for row, name in enumerate(["first", "second"]):
                peft.set_adapter(name)
                torch.testing.assert_close(logits[row], peft(torch.tensor([seq])).logits[0, -1], atol=ATOL, rtol=0)
            with peft.disable_adapter():
                torch.testing.assert_close(logits[2], peft(torch.tensor([seq])).logits[0, -1], atol=ATOL, rtol=0)
        assert (logits[0] - logits[1]).abs().max() > 1e-2  # the adapters really differ
    finally:
        peft.unload()


def _wait(request: Request, timeout: float = 120) -> list:
    events, end = [], time.monotonic() + timeout
    while not events or events[-1].finish_reason is None:
        events.append(request.events.get(timeout=max(0.0, end - time.monotonic())))
    return events


def test_requests_joining_and_leaving_mid_batch_get_their_solo_answers(tiny, smol_tokenizer):
    torch.manual_seed(3)
    engine = Engine(tiny, smol_tokenizer, stop_ids=[], max_slots=3, max_queue=8, context=96, prefill_tokens=16)
    try:
        prompts = [torch.randint(3, 500, (n,)).tolist() for n in (5, 23, 8, 40, 3)]
        lengths = [20, 9, 14, 6, 11]
        first = [
            engine.submit(Request(p, SamplingParams(max_tokens=n, temperature=0)))
            for p, n in zip(prompts[:2], lengths[:2])
        ]
        abandoned = engine.submit(Request(prompts[2], SamplingParams(max_tokens=60, temperature=0)))
        while engine.steps < 4:
            time.sleep(0.001)
        later = [
            engine.submit(Request(p, SamplingParams(max_tokens=n, temperature=0)))
            for p, n in zip(prompts[3:], lengths[3:])
        ]  # one waits: only 3 slots
        abandoned.cancel()  # leaves mid-answer; its slot goes to the waiting request
        for r, p, n in zip(first + later, prompts[:2] + prompts[3:], lengths[:2] + lengths[3:]):
            events = _wait(r)
            assert events[-1].finish_reason == "length" and events[-1].completion_tokens == n
            assert r.generated == _solo(tiny, p, n)
        assert engine.load() == {"running": 0, "waiting": 0}
    finally:
        engine.close()


def test_text_stream_holds_back_a_possible_stop_string(smol_tokenizer):
    ids = smol_tokenizer("Hello world, the end is near", add_special_tokens=False)["input_ids"]
    stream = TextStream(smol_tokenizer, stop=["the end"])
    sent = "".join(stream.add(t) for t in ids) + stream.finish()
    assert sent == "Hello world, " and stream.stopped
    stream = TextStream(smol_tokenizer, stop=["the endless"])
    sent = "".join(stream.add(t) for t in ids) + stream.finish()
    assert sent == "Hello world, the end is near" and not stream.stopped


def test_text_stream_never_splits_a_character(smol_tokenizer):
    text = "Çok hızlı 🚀 ünlü"
    ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(smol_tokenizer, stop=[])
    pieces = [stream.add(t) for t in ids] + [stream.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
