"""The peers on the reference recipe, one per process, measured exactly as ``hizli bench recipe``
measures itself. Run by ``hizli bench compare`` as a script (it imports nothing from hizli, so a peer
runs with its own stack only)::

    python src/hizli/bench/peers.py SETTINGS.json     (the result is written to SETTINGS["out"])

Kinds (each needs the packages of ``../shared/gpu/make_bundle.sh --peers``):

- ``hf``: transformers + PEFT + bitsandbytes through TRL's SFTTrainer (SDPA, gradient checkpointing);
- ``liger``: the same with Liger kernels;
- ``unsloth``: the recipe's own code (its padded ``DataCollatorForSeq2Seq``), batch 2 x 4;
- ``unsloth_best``: Unsloth's own default (no collator passed: padding-free), batch 2 x 4;
- ``unsloth_big``: Unsloth given a large GPU: padding-free, batch 8 x 1, no gradient checkpointing;
- ``unsloth_t4``: a 16 GB card without bf16: fp16, padding-free, checkpointing on, batch B x (8 / B)
  (8 rows a step, as the recipe's 2 x 4), under ``cap_gib``.

Steady tokens/s counts real (non-pad) tokens of the steps after the first ``min(10, steps / 3)``
over their wall time (CUDA synchronised at every step end); peak reserved memory is
``torch.cuda.max_memory_reserved`` after a reset at the start of training; first_step_s runs from
process start to the end of the first optimizer step. Under ``cap_gib`` the process gets that share
of the card and ``torch.cuda.mem_get_info`` answers as a card of that size would (Unsloth sizes its
loss chunks and offload buffers from the free memory).
"""

from __future__ import annotations

import json
import os
import sys
import time

# Run as a script, this file's folder comes first on sys.path, where its neighbours (kernels.py,
# results.py, ...) would shadow packages of the same name that the trainers import.
if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

KINDS = ("hf", "liger", "unsloth", "unsloth_best", "unsloth_big", "unsloth_t4")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 1024**3


def _process_start() -> float:
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return time.time()


T_PROCESS = _process_start()


def rows_from(path: str) -> list[dict]:
    """ShareGPT rows -> role/content conversations (what standardize_sharegpt produces)."""
    roles = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                turns = json.loads(line)["conversations"]
                out.append({"conversations": [{"role": roles[t["from"]], "content": t["value"]} for t in turns]})
    return out


def batch_shape(kind: str, batch: int | None) -> tuple[int, int]:
    """(per-device batch, gradient accumulation) of ``kind``; ``batch`` only for unsloth_t4."""
    if kind == "unsloth_big":
        return 8, 1
    if kind == "unsloth_t4":
        b = batch or 2
        return b, max(1, 8 // b)
    return 2, 4


def cap_memory(cap_gib: float) -> None:
    """This process may use ``cap_gib`` of the card, and the free memory it is told fits that cap."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    cap = int(cap_gib * GIB)
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), 0)
    original = torch.cuda.mem_get_info

    def mem_get_info(device=None):
        free, card = original(device)
        return max(0, min(free, cap - torch.cuda.memory_reserved(device))), card

    torch.cuda.mem_get_info = mem_get_info
    torch.cuda.memory.mem_get_info = mem_get_info


def main(settings: dict) -> dict:
    kind, model_dir, steps, data = settings["kind"], settings["model"], int(settings["steps"]), settings["data"]
    if kind not in KINDS:
        raise SystemExit(f"kind {kind!r}: use one of {', '.join(KINDS)}")
    unsloth = kind.startswith("unsloth")
    if unsloth:
        from unsloth import FastLanguageModel  # must come before transformers/trl
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    if settings.get("cap_gib"):
        cap_memory(float(settings["cap_gib"]))
    fp16 = kind == "unsloth_t4"
    dtype = torch.float16 if fp16 else torch.bfloat16
    if unsloth:
        from unsloth.chat_templates import get_chat_template

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=model_dir, max_seq_length=2048, dtype=dtype, load_in_4bit=True
        )
        checkpointing = False if kind == "unsloth_big" else "unsloth"
        model = FastLanguageModel.get_peft_model(
            model,
            r=16,
            target_modules=TARGETS,
            lora_alpha=16,
            lora_dropout=0,
            bias="none",
            use_gradient_checkpointing=checkpointing,
            random_state=3407,
            use_rslora=False,
            loftq_config=None,
        )
        tokenizer = get_chat_template(tokenizer, chat_template="llama-3.1")
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=quant, dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": 0}
        )
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        model = get_peft_model(
            model,
            LoraConfig(
                r=16, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=TARGETS, task_type="CAUSAL_LM"
            ),
        )
    dataset = Dataset.from_list(rows_from(data))
    dataset = dataset.map(
        lambda b: {"text": [tokenizer.apply_chat_template(c, tokenize=False) for c in b["conversations"]]}, batched=True
    )
    real_tokens: list[int] = []

    class CountingCollator:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, features):
            batch = self.inner(features)
            mask = batch.get("attention_mask")
            real_tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
            return batch

    ends: list[float] = []
    losses: list[float] = []

    class Timing(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            ends.append(time.time())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    batch, accum = batch_shape(kind, settings.get("batch"))
    common = dict(
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        warmup_steps=5,
        max_steps=steps,
        learning_rate=2e-4,
        bf16=not fp16,
        fp16=fp16,
        logging_steps=1,
        optim="adamw_8bit",
        weight_decay=0.01,
        lr_scheduler_type="linear",
        seed=3407,
        output_dir=f"/tmp/peer-{kind}",
        report_to="none",
        save_strategy="no",
    )
    if kind in ("unsloth_best", "unsloth_big", "unsloth_t4"):  # Unsloth's own default: no collator given
        trainer = SFTTrainer(
            model=model,
            processing_class=tokenizer,
            train_dataset=dataset,
            callbacks=[Timing()],
            args=SFTConfig(dataset_text_field="text", max_length=2048, dataset_num_proc=2, **common),
        )
    else:
        extra = {"data_collator": DataCollatorForSeq2Seq(tokenizer=tokenizer)} if unsloth else {}
        trainer = SFTTrainer(
            model=model,
            processing_class=tokenizer,
            train_dataset=dataset,
            callbacks=[Timing()],
            args=SFTConfig(
                dataset_text_field="text",
                max_length=2048,
                dataset_num_proc=2,
                packing=False,
                use_liger_kernel=kind == "liger",
                **common,
            ),
            **extra,
        )
    trainer.data_collator = CountingCollator(trainer.data_collator)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t_train = time.time()
    if unsloth:
        from unsloth import unsloth_train

        unsloth_train(trainer)
    else:
        trainer.train()
    torch.cuda.synchronize()
    per_step = [sum(real_tokens[i * accum : (i + 1) * accum]) for i in range(len(ends))]
    skip = min(10, max(1, len(ends) // 3))
    steady = sum(per_step[skip:]) / (ends[-1] - ends[skip - 1])
    versions = {}
    for name in ("unsloth", "trl", "liger_kernel", "transformers", "peft", "bitsandbytes", "torch"):
        module = sys.modules.get(name)
        versions[name] = getattr(module, "__version__", None) if module else None
    return {
        "system": kind,
        "gpu": torch.cuda.get_device_name(0),
        "steps": len(ends),
        "batch": batch,
        "grad_accum": accum,
        "dtype": "fp16" if fp16 else "bf16",
        "cap_gib": settings.get("cap_gib"),
        "tokens_per_s": round(steady, 1),
        "overall_tokens_per_s": round(sum(per_step) / (ends[-1] - t_train), 1),
        "whole_run_s": round(ends[-1] - t_train, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
        "first_step_s": round(ends[0] - T_PROCESS, 2),
        "losses": [round(x, 5) for x in losses],
        "tokens_real": sum(real_tokens),
        "versions": versions,
    }


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        settings = json.load(f)
    result = main(settings)
    print("RESULT", json.dumps(result))
    with open(settings["out"], "w") as f:
        json.dump(result, f)
