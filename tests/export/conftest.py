"""Export fixtures: an adapter folder on the embedded SmolLM2-135M-Instruct, its merged and GGUF exports.

The adapter is the only thing a trained one would change: set HIZLI_TEST_ADAPTER=/path/to/lora_model
(a folder saved by ``model.save_pretrained`` after training on the embedded model) and every export
test runs on it instead of the seeded random adapter made here.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import weakref
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # ollama_sim.py, shared by the export tests

# Five real requests, rendered through the model's own chat template in every test.
PROMPTS = (
    "Continue the Fibonacci sequence: 1, 1, 2, 3, 5, 8,",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three uses of a paperclip.",
)
# LoRA B values: large enough to move logits by ~0.4 (the adapter matters), small enough that the
# model still answers sensibly, so greedy-answer comparisons are about a working model.
LORA_B_STD = 0.003
TIMINGS: dict[str, float] = {}


@contextlib.contextmanager
def one_thread():
    """With HIZLI_TEST_THREADS=1, run torch on one thread here. On a 2-core machine that other
    processes also use, two torch threads wait on each other at every op: a 32-token greedy answer of
    SmolLM2-135M took 10.9 s with two threads and 2.1 s with one (measured here, shared machine); on
    an idle machine the whole export suite ran 8 % faster with torch's default of two."""
    import os

    import torch

    threads = os.environ.get("HIZLI_TEST_THREADS")
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Chat:
    """Render prompts through a tokenizer's chat template and run a model on them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._answers: dict[tuple[int, str, int], list[int]] = {}

    def ids(self, prompt: str):
        enc = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return enc["input_ids"]

    def logits(self, model, prompt: str):
        import torch

        with torch.no_grad(), one_thread():
            return model(input_ids=self.ids(prompt)).logits.double()

    def greedy(self, model, prompt: str, n: int = 32) -> list[int]:
        """Up to ``n`` new tokens by greedy decoding (stopping at the end-of-turn token); memoized
        per model object, which callers must not change in between."""
        import torch

        key = (id(model), prompt, n)
        if not any(k[0] == id(model) for k in self._answers):
            # forget a model's answers when it is freed: a later model may reuse its id
            weakref.finalize(model, self._forget, id(model))
        if key not in self._answers:
            ids = self.ids(prompt)
            with torch.no_grad(), one_thread():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            self._answers[key] = out[0, ids.shape[1] :].tolist()
        return self._answers[key]

    def _forget(self, model_id: int) -> None:
        for key in [k for k in self._answers if k[0] == model_id]:
            del self._answers[key]

    def agreement(self, reference, model, prompts, n: int = 32, margin: float = 1.0) -> dict:
        """How often ``model`` picks ``reference``'s greedy token, fed ``reference``'s own answer.

        Returns:
            ``agree``: fraction of answer positions where both argmaxes agree; ``confident_misses``:
            (prompt, position) where they differ although the reference's top-1 leads its top-2 by
            more than ``margin`` logits; ``free_run``: per prompt, how many tokens ``model``'s own
            greedy answer shares with the reference's before they part.
        """
        import torch

        agree = total = 0
        misses, free_run = [], []
        for p in prompts:
            ids = self.ids(p)
            answer = self.greedy(reference, p, n)
            seq = torch.cat([ids, torch.tensor([answer])], dim=1)
            with torch.no_grad(), one_thread():
                ref = reference(input_ids=seq).logits[0, ids.shape[1] - 1 : -1].float()
                got = model(input_ids=seq).logits[0, ids.shape[1] - 1 : -1].float()
            top2 = ref.topk(2, dim=-1).values
            lead = top2[:, 0] - top2[:, 1]
            pick = got.argmax(-1).tolist()
            agree += sum(a == b for a, b in zip(pick, answer))
            total += len(answer)
            misses += [(p, i) for i, (a, b) in enumerate(zip(pick, answer)) if a != b and lead[i] > margin]
            own = self.greedy(model, p, n)
            parted = [i for i, (a, b) in enumerate(zip(own, answer)) if a != b]
            free_run.append(parted[0] if parted else min(len(own), len(answer)))
        return {"agree": agree / total, "confident_misses": misses, "free_run": free_run}

    def teacher_forced(self, reference, model, prompts, n: int = 32) -> dict:
        """Both models fed the same sequences: each prompt followed by ``reference``'s greedy answer.

        Returns, over every position of those sequences (prompt and answer): ``positions``;
        ``max_rel``: the largest ratio, over positions, of max |logit difference| to the reference's
        largest |logit| there; ``max_abs`` and ``mean_abs`` logit differences; ``top1``: the fraction of
        positions where the argmaxes agree; ``misses``: (prompt, position, reference's top-2 margin) where
        they differ.
        """
        import torch

        rels, abs_max, abs_sum, count, agree, misses = [], 0.0, 0.0, 0, 0, []
        for p in prompts:
            ids = self.ids(p)
            seq = torch.cat([ids, torch.tensor([self.greedy(reference, p, n)])], dim=1)
            with torch.no_grad(), one_thread():
                ref = reference(input_ids=seq).logits[0].double()
                got = model(input_ids=seq).logits[0].double()
            diff = (got - ref).abs()
            rels.append((diff.amax(-1) / ref.abs().amax(-1)).max().item())
            abs_max, abs_sum, count = max(abs_max, diff.max().item()), abs_sum + diff.sum().item(), count + diff.numel()
            top2 = ref.topk(2, dim=-1).values
            margin = (top2[:, 0] - top2[:, 1]).tolist()
            same = (ref.argmax(-1) == got.argmax(-1)).tolist()
            agree += sum(same)
            misses += [(p, i, margin[i]) for i, ok in enumerate(same) if not ok]
        positions = sum(self.ids(p).shape[1] + len(self.greedy(reference, p, n)) for p in prompts)
        return {
            "positions": positions,
            "max_rel": max(rels),
            "max_abs": abs_max,
            "mean_abs": abs_sum / count,
            "top1": agree / positions,
            "misses": misses,
        }

    def greedy_parts_only_where_unsure(self, reference, model, prompts, n: int = 32, unsure: float = 0.05):
        """For each prompt, (prompt, first step whose reference top-2 margin is below ``unsure`` or None,
        first step where the greedy answers differ or None). Answers must be identical up to the first
        unsure step: after a near-tie either choice is right, and the answers may then part."""
        import torch

        out = []
        for p in prompts:
            ids, ref, got = self.ids(p), self.greedy(reference, p, n), self.greedy(model, p, n)
            seq = torch.cat([ids, torch.tensor([ref])], dim=1)
            with torch.no_grad(), one_thread():
                logits = reference(input_ids=seq).logits[0, ids.shape[1] - 1 : -1].double()
            top2 = logits.topk(2, dim=-1).values
            low = [i for i, m in enumerate((top2[:, 0] - top2[:, 1]).tolist()) if m < unsure]
            parted = [i for i, (a, b) in enumerate(zip(ref, got)) if a != b]
            if not parted and len(ref) != len(got):
                parted = [min(len(ref), len(got))]
            out.append((p, low[0] if low else None, parted[0] if parted else None))
        return out


def make_adapter(out: Path, *, load_in_4bit: bool = False, seed: int = 0):
    """Save a LoRA adapter (recipe settings, seeded non-zero B) on the embedded model into ``out``."""
    import torch

    from hizli.models import loader, lora

    model, tokenizer = loader.load("smollm2-135m-instruct", load_in_4bit=load_in_4bit)
    peft_model = lora.add_lora(model, r=16, lora_alpha=16, lora_dropout=0, random_state=3407)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * LORA_B_STD)
    peft_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return peft_model, tokenizer


@pytest.fixture(autouse=True)
def _one_thread_per_test():
    """Every export test on one torch thread (see ``one_thread``); restored after each test."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def prompts():
    return PROMPTS


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory) -> Path:
    """A PEFT adapter folder: $HIZLI_TEST_ADAPTER if set, else a seeded random one."""
    given = os.environ.get("HIZLI_TEST_ADAPTER")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("adapter") / "lora_model"
    with one_thread():
        make_adapter(out)
    return out


@pytest.fixture(scope="session")
def adapter_model(adapter_dir):
    """(model, tokenizer): the adapter on the full-precision fp32 base, as a user loads it."""
    from hizli.api import attach_export_methods
    from hizli.models import loader

    with one_thread():
        model, tokenizer = loader.load(str(adapter_dir), load_in_4bit=False, adapter_trainable=False)
    attach_export_methods(model)  # what FastLanguageModel.from_pretrained adds
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory) -> Path:
    """HIZLI_CACHE for loading exported .gguf files (their conversions stay out of ~/.cache)."""
    return tmp_path_factory.mktemp("hizli-cache")


@pytest.fixture(scope="session")
def chat(adapter_model):
    return Chat(adapter_model[1])


@pytest.fixture(scope="session")
def merged_dir(adapter_model, tmp_path_factory) -> Path:
    model, tokenizer = adapter_model
    out = tmp_path_factory.mktemp("export") / "merged"
    t = time.perf_counter()
    with one_thread():
        model.save_pretrained_merged(str(out), tokenizer)
    TIMINGS["merged_16bit (fp32)"] = time.perf_counter() - t
    return out


@pytest.fixture(scope="session")
def gguf_dir(adapter_model, tmp_path_factory) -> Path:
    """f16 and q8_0 GGUF files of the merged adapter model, plus the Modelfile."""
    model, tokenizer = adapter_model
    out = tmp_path_factory.mktemp("export") / "smol-ft"
    for method in ("f16", "q8_0"):
        t = time.perf_counter()
        with one_thread():
            model.save_pretrained_gguf(str(out), tokenizer, quantization_method=method, modelfile=method == "q8_0")
        TIMINGS[f"gguf {method}"] = time.perf_counter() - t
    return out


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.write_line("export timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in TIMINGS.items()))
