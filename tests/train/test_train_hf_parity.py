"""An external reference: hizli's per-step training losses match transformers' ``Trainer`` + PEFT
trained on the same rows, in the same micro-batches, in the same order.

The other parity tests compare hizli's fast path with hizli's plain path; a mistake both share (the
label shift, the masks, the loss normalisation, the LoRA scaling, the schedule) would pass them. Here
the reference is code hizli does not own: the HF model computes its own loss from ``labels`` on a
padded batch made by transformers' collator, and ``Trainer`` runs its own accumulation, clipping,
AdamW and schedule.

Same inputs on both sides:
- rows: tokenized once, by hizli, with assistant-only labels (-100 on every prompt span, so masks sit
  inside rows as well as at their start): chat-shaped token rows on the CPU, the packaged
  conversations under the chat template on the GPU. How hizli makes the masks is its data code, not
  part of this comparison; both sides train on the same labels;
- batches: hizli's ``BatchPlan`` (the plan its trainer builds from the same seed) says which rows
  form each micro-batch; ``Trainer`` reads exactly those micro-batches through a ``batch_sampler``;
- weights: the same base folder, and hizli's initial adapter weights copied into the PEFT model;
- optimizer: torch AdamW, the same hyper-parameters, linear schedule with warmup, clipping at 1.0.

Loss definition: hizli divides the summed token loss of every micro-batch by the trained-token count
of the whole optimizer step (hizli.train.context), and logs that step-wide mean. ``Trainer`` does the
same when the model accepts loss kwargs: it counts ``labels[..., 1:] != -100`` over the step's
micro-batches (``num_items_in_batch``), the model sums each micro-batch's loss and divides by it, and
the logged loss is the sum over micro-batches. The test asserts ``model_accepts_loss_kwargs`` so that
HF cannot silently fall back to a mean per micro-batch divided by the accumulation steps, which is a
different loss whenever micro-batches hold different token counts (they do here).

Gradient norms (before clipping) are compared too: AdamW hardly sees a gradient scaled by a constant,
so a normalisation off by a constant factor barely moves the losses (dividing by ``n_trained + 1``
moved them by 3e-7) but moves the gradient norm by that factor (6e-3 here).

Learning rates: each step logs the rate its update used, on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from helpers import LORA_PROJECTIONS, gpu_llama_folder, tiny_llama_config

BATCH, ACCUM = 2, 4


@dataclass
class Setting:
    steps: int
    dtype: str  # "float32" (CPU), "bfloat16" or "float16" (GPU, autocast)
    load_in_4bit: bool
    seq: int
    lr: float
    warmup: int
    random_b: bool  # True: LoRA B starts random, so the adapters shape the loss from the first step
    merge: bool | None = None  # hizli's merge_micro_batches (None: its default, one forward per step)
    seed: int = 3407


def _hizli(folder: str, tmp_path, s: Setting, dataset):
    """hizli on its default (fast) path: padding-free rows, its attention, fused loss, checkpointing.
    Returns the rows, the plan's micro-batches for ``s.steps`` steps, the initial adapter weights, and
    the logged losses, gradient norms and learning rates."""
    from hizli import FastLanguageModel, SFTTrainer, TrainingArguments, get_chat_template
    from hizli.train.batches import BatchPlan

    model, tok = FastLanguageModel.from_pretrained(
        folder, max_seq_length=s.seq, dtype=s.dtype, load_in_4bit=s.load_in_4bit
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=16,
        target_modules=list(LORA_PROJECTIONS),
        random_state=s.seed,
        init_lora_weights=not s.random_b,
    )
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tok = get_chat_template(tok, "llama-3.1" if len(tok) > 100_000 else "smollm2")
    args = TrainingArguments(
        **_hyper(s), merge_micro_batches=s.merge, output_dir=str(tmp_path / f"hizli-{s.merge}"), disable_tqdm=True
    )
    trainer = SFTTrainer(
        model=model,
        tokenizer=tok,
        train_dataset=dataset,
        max_seq_length=s.seq,
        args=args,
        train_on="assistant",
    )
    data = trainer.train_dataset
    # the plan hizli's trainer builds (SFTTrainer._start): same lengths, sizes and seed
    plan = BatchPlan(data.lengths, BATCH, ACCUM, args.data_seed or args.seed)
    micro = plan.micro_batches(0)[: s.steps * ACCUM]
    assert len(micro) == s.steps * ACCUM and all(len(m) == BATCH for m in micro), "the steps must fit one epoch"
    stats = trainer.train()
    logged = [e for e in stats.log_history if "loss" in e]
    rows = [data[i] for i in range(len(data))]
    losses, norms, lrs = ([e[k] for e in logged] for k in ("loss", "grad_norm", "lr"))
    return rows, micro, initial, losses, norms, lrs


def _hyper(s: Setting) -> dict:
    """The arguments both trainers take under the same names, with the same meaning."""
    return dict(
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM,
        max_steps=s.steps,
        learning_rate=s.lr,
        warmup_steps=s.warmup,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        weight_decay=0.01,
        max_grad_norm=1.0,
        seed=s.seed,
        bf16=s.dtype == "bfloat16",
        fp16=s.dtype == "float16",
        save_strategy="no",
    )


def _hf(folder: str, tmp_path, s: Setting, rows, micro, initial):
    """transformers ``Trainer`` + PEFT on ``micro`` (lists of row indices, in order). Returns the logged
    losses, gradient norms and learning rates."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer
    from transformers import TrainingArguments as HFArguments

    dtype = getattr(torch, s.dtype)
    device = "cuda" if s.dtype != "float32" else "cpu"
    quant = {}
    if s.load_in_4bit:  # as hizli's loader quantizes (NF4, double quantization, compute in the run's dtype)
        quant["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    base = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation="sdpa", device_map={"": device}, **quant
    )
    config = LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.0, target_modules=list(LORA_PROJECTIONS), task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(trainable) == sorted(initial)
    with torch.no_grad():
        for name, p in trainable.items():
            assert p.shape == initial[name].shape, name
            p.copy_(initial[name])

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "right"  # position ids run 0.. from the left in training: pads go on the right
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    class PlanTrainer(Trainer):
        def get_train_dataloader(self):
            return DataLoader(self.train_dataset, batch_sampler=micro, collate_fn=self.data_collator)

    args = HFArguments(
        **_hyper(s),
        output_dir=str(tmp_path / "hf"),
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        use_cpu=device == "cpu",
        dataloader_pin_memory=False,
        remove_unused_columns=False,
    )
    trainer = PlanTrainer(
        model=model, args=args, train_dataset=rows, data_collator=DataCollatorForSeq2Seq(tok, padding=True)
    )
    # the step-wide token normalisation hizli uses; without loss kwargs HF averages per micro-batch
    assert trainer.model_accepts_loss_kwargs
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    return [e["loss"] for e in logged], [float(e["grad_norm"]) for e in logged], [e["learning_rate"] for e in logged]


def _relative(a: list[float], b: list[float]) -> list[float]:
    return [abs(x - y) / abs(y) for x, y in zip(a, b)]


VOCAB = 512  # a small head keeps the CPU test fast: with 49,152 tokens the cross-entropy is most of its time


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smol_folder) -> str:
    """A random 2-layer Llama with a 512-token vocabulary, saved with the embedded model's tokenizer
    (both front doors load a tokenizer from the folder; the rows below are token ids < 512)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama-512")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB)).save_pretrained(out)
    AutoTokenizer.from_pretrained(smol_folder).save_pretrained(out)
    return str(out)


def chat_rows(n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Token rows shaped like chats trained on the assistant only: 1-3 turns, each a prompt span
    (labels -100) then a reply span (trained), so masks sit inside rows as well as at their start.
    Replies use 32 of the 512 tokens: a pattern a few steps can learn, so the loss moves."""
    g = torch.Generator().manual_seed(seed)

    def span(lo: int, hi: int, top: int = VOCAB) -> list[int]:
        return torch.randint(3, top, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    rows = []
    for _ in range(n):
        ids: list[int] = []
        labels: list[int] = []
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            prompt, reply = span(3, 16), span(2, 24, top=35)
            ids += prompt + reply
            labels += [-100] * len(prompt) + reply
        rows.append({"input_ids": ids, "labels": labels})
    return rows


# fp32 on the CPU: both sides compute the same sums in a different order (one padding-free row against
# padded rows, hizli's chunked cross-entropy against the full-logits one, varlen attention against
# SDPA with a mask, checkpointed recompute), so each op differs by a few fp32 ulps (~1e-7 relative)
# and AdamW carries the differences into later steps. Measured: losses within 2e-7 and gradient norms
# within 2e-7 over 5 steps; 1e-5 / 1e-4 leave a wide margin for other CPUs and BLAS builds, while a
# 0.1 % change of the loss fails, and so does each mistake tried by hand: attention across the rows of
# a padding-free batch (losses 8e-3 apart), no label shift (6e-2), the n_trained + 1 normalisation above.
CPU = Setting(steps=5, dtype="float32", load_in_4bit=False, seq=256, lr=1e-2, warmup=2, random_b=True)
CPU_LOSS_REL, CPU_GRAD_REL = 1e-5, 1e-4


def test_losses_match_transformers_trainer_with_peft_on_cpu(tiny_folder, tmp_path):
    """hizli's default step (the 4 micro-batches run as one padding-free forward) and its accumulation
    loop (4 forwards and backwards) against ``Trainer``, which runs 4 padded micro-batches."""
    reference = None
    for merge in (None, False):
        s = Setting(**{**CPU.__dict__, "merge": merge})
        rows, micro, initial, losses, norms, lrs = _hizli(tiny_folder, tmp_path, s, chat_rows(48))
        hf_losses, hf_norms, hf_lrs = reference = reference or _hf(tiny_folder, tmp_path, s, rows, micro, initial)
        assert len(losses) == len(hf_losses) == CPU.steps
        assert lrs == pytest.approx(hf_lrs, rel=1e-12, abs=0.0)  # each step logs the rate its update used
        assert max(_relative(losses, hf_losses)) <= CPU_LOSS_REL, (merge, list(zip(losses, hf_losses)))
        assert max(_relative(norms, hf_norms)) <= CPU_GRAD_REL, (merge, list(zip(norms, hf_norms)))
    assert hf_losses[-1] < hf_losses[0] - 0.05  # the steps move the weights: later steps test the update too


@pytest.fixture(scope="module")
def gpu_folder(tmp_path_factory):
    return gpu_llama_folder(tmp_path_factory.mktemp("gpu-llama"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, per_step", [("bfloat16", 0.02), ("float16", 0.01)])
def test_fast_path_losses_match_transformers_trainer_with_peft_on_gpu(gpu_folder, tmp_path, dtype, per_step):
    """The recipe on the GPU (NF4 base, fused kernels, the packaged conversations, 20 steps) against
    ``Trainer`` + PEFT + bitsandbytes. Tolerances are tests/train/test_train_gpu.py's for fast path
    against plain path (same model, data, steps and schedule): 2 % per step in bf16, 1 % in fp16, mean
    gap under 0.5 %; rounding in 8 or 11 mantissa bits, in a different order on each side, carried
    forward by AdamW explains that much."""
    from hizli.data.load import load_conversations
    from hizli.data.sample import sample_path

    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    s = Setting(steps=20, dtype=dtype, load_in_4bit=True, seq=1024, lr=2e-4, warmup=5, random_b=False)
    rows, micro, initial, losses, _, _ = _hizli(gpu_folder, tmp_path, s, load_conversations(sample_path("sharegpt")))
    hf_losses, _, _ = _hf(gpu_folder, tmp_path, s, rows, micro, initial)
    assert len(losses) == len(hf_losses) == s.steps
    rel = _relative(losses, hf_losses)
    assert max(rel) <= per_step, list(zip(losses, hf_losses))
    assert sum(rel) / len(rel) <= 0.005
    assert losses[-1] < losses[0]
