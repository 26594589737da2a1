"""The model hizli returns is a normal transformers/PEFT model: transformers' own Trainer trains it."""

from __future__ import annotations

import torch

from hizli.models import loader, lora

from helpers import token_rows


def test_transformers_trainer_trains_a_hizli_model(tiny_model_dir, tmp_path):
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model, tok = loader.load(tiny_model_dir, load_in_4bit=False)
    model = lora.add_lora(model, r=8, lora_alpha=16, use_gradient_checkpointing="unsloth")
    before = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    rows = token_rows(8, seed=4, vocab=1000)
    for r in rows:
        r["attention_mask"] = [1] * len(r["input_ids"])
    trainer = Trainer(
        model=model,
        train_dataset=rows,
        data_collator=DataCollatorForSeq2Seq(tok),
        args=TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=2,
            max_steps=2,
            learning_rate=1e-2,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            logging_steps=1,
        ),
    )
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
