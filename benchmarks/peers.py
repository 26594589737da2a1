"""The peers on the reference recipe, one per process: transformers+PEFT+bitsandbytes (TRL's
SFTTrainer), the same with Liger kernels, and Unsloth (with the recipe's padded collator, and with its
own padding-free default). Used by benchmarks/compare; needs the packages of
``make_bundle.sh --peers`` (trl, bitsandbytes, datasets, liger-kernel, unsloth).

    python benchmarks/peers.py KIND MODEL_DIR STEPS OUT.json      KIND: hf | liger | unsloth | unsloth_best

Measured exactly as ``hizli bench`` measures itself: steady tokens/s counts real (non-pad) tokens of
the steps after the 10th over their wall time (CUDA synchronised at every step end), peak reserved
memory is ``torch.cuda.max_memory_reserved`` after a reset at the start of training, and first_step_s
runs from process start to the end of the first optimizer step.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from hizli.bench.run import process_start_time  # noqa: E402  (no torch import: cheap)

T_PROCESS = process_start_time()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rows_from(path: str) -> list[dict]:
    """ShareGPT rows -> role/content conversations (what standardize_sharegpt produces)."""
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    out = []
    with open(path) as f:
        for line in f:
            turns = json.loads(line)["conversations"]
            out.append({"conversations": [{"role": roles[t["from"]], "content": t["value"]} for t in turns]})
    return out


def main(kind: str, model_dir: str, steps: str, out_json: str, data: str) -> None:
    n_steps = int(steps)
    unsloth = kind.startswith("unsloth")
    if unsloth:
        from unsloth import FastLanguageModel  # must come before transformers/trl
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    if unsloth:
        from unsloth.chat_templates import get_chat_template
        model, tokenizer = FastLanguageModel.from_pretrained(model_name=model_dir, max_seq_length=2048,
                                                             dtype=None, load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(model, r=16, target_modules=TARGETS, lora_alpha=16,
                                                 lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth",
                                                 random_state=3407, use_rslora=False, loftq_config=None)
        tokenizer = get_chat_template(tokenizer, chat_template="llama-3.1")
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                     attn_implementation="sdpa", device_map={"": 0})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                                                 target_modules=TARGETS, task_type="CAUSAL_LM"))
    dataset = Dataset.from_list(rows_from(data))
    dataset = dataset.map(lambda b: {"text": [tokenizer.apply_chat_template(c, tokenize=False)
                                              for c in b["conversations"]]}, batched=True)

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

    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=4, warmup_steps=5,
                  max_steps=n_steps, learning_rate=2e-4, bf16=True, logging_steps=1, optim="adamw_8bit",
                  weight_decay=0.01, lr_scheduler_type="linear", seed=3407, output_dir=f"/tmp/peer-{kind}",
                  report_to="none", save_strategy="no")
    if kind == "unsloth_best":  # Unsloth's own default: no collator given
        trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, callbacks=[Timing()],
                             args=SFTConfig(dataset_text_field="text", max_length=2048, dataset_num_proc=2, **common))
    else:
        collator = DataCollatorForSeq2Seq(tokenizer=tokenizer) if unsloth else None
        extra = {"data_collator": collator} if collator is not None else {}
        trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, callbacks=[Timing()],
                             args=SFTConfig(dataset_text_field="text", max_length=2048, dataset_num_proc=2,
                                            packing=False, use_liger_kernel=kind == "liger", **common), **extra)
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
    per_step = [sum(real_tokens[i * 4:(i + 1) * 4]) for i in range(len(ends))]
    skip = min(10, max(1, len(ends) // 3))
    steady = sum(per_step[skip:]) / (ends[-1] - ends[skip - 1])
    result = {
        "system": kind, "gpu": torch.cuda.get_device_name(0), "steps": len(ends),
        "tokens_per_s": round(steady, 1),
        "overall_tokens_per_s": round(sum(per_step) / (ends[-1] - t_train), 1),
        "whole_run_s": round(ends[-1] - t_train, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "first_step_s": round(ends[0] - T_PROCESS, 2),
        "losses": [round(x, 5) for x in losses],
        "tokens_real": sum(real_tokens),
    }
    print("RESULT", json.dumps(result))
    with open(out_json, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    main(*sys.argv[1:6])
