"""The reference recipe's code as written, with only the imports and the model/dataset names changed
(the embedded model and hizli's packaged ShareGPT sample), and max_steps small.

Lines the recipe runs against CUDA (``torch.cuda.get_device_properties``, ``.to("cuda")``) are the
two places a CPU machine cannot follow it: the memory report comes from ``memory_report`` and the
prompt goes to ``model.device``. Everything else is the recipe's text.
"""

from __future__ import annotations

import json

import torch


def test_the_recipe_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # --- imports changed: unsloth / trl / transformers -> hizli -----------------------------------
    from datasets import Dataset

    from hizli import (
        DataCollatorForSeq2Seq,
        FastLanguageModel,
        SFTTrainer,
        TrainingArguments,
        get_chat_template,
        is_bfloat16_supported,
        memory_report,
        standardize_sharegpt,
        train_on_responses_only,
    )
    from hizli.data.sample import sample_path

    def load_dataset(name, split):  # stands in for datasets.load_dataset (no hub here): 24 short real rows
        rows = [json.loads(line) for line in open(sample_path("sharegpt"))]
        rows.sort(key=lambda r: sum(len(t["value"]) for t in r["conversations"]))
        return Dataset.from_list(rows[:24])

    max_seq_length = 2048
    dtype = None
    load_in_4bit = True
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name="smollm2-135m-instruct",  # was "unsloth/Llama-3.2-3B-Instruct"
        max_seq_length=max_seq_length,
        dtype=dtype,
        load_in_4bit=load_in_4bit,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        use_rslora=False,
        loftq_config=None,
    )
    tokenizer = get_chat_template(tokenizer, chat_template="llama-3.1")

    def formatting_prompts_func(examples):
        convos = examples["conversations"]
        texts = [tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=False) for convo in convos]
        return {"text": texts}

    dataset = load_dataset("mlabonne/FineTome-100k", split="train")  # the packaged sample here
    dataset = standardize_sharegpt(dataset)
    dataset = dataset.map(formatting_prompts_func, batched=True)

    trainer = SFTTrainer(
        model=model,
        tokenizer=tokenizer,
        train_dataset=dataset,
        dataset_text_field="text",
        max_seq_length=max_seq_length,
        data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer),
        dataset_num_proc=2,
        packing=False,
        args=TrainingArguments(
            per_device_train_batch_size=2,
            gradient_accumulation_steps=4,
            warmup_steps=5,
            max_steps=1,  # was 60
            learning_rate=2e-4,
            fp16=not is_bfloat16_supported(),
            bf16=is_bfloat16_supported(),
            logging_steps=1,
            optim="adamw_8bit",
            weight_decay=0.01,
            lr_scheduler_type="linear",
            seed=3407,
            output_dir="outputs",
            report_to="none",
        ),
    )
    trainer = train_on_responses_only(
        trainer,
        instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
        response_part="<|start_header_id|>assistant<|end_header_id|>\n\n",
    )
    tokenizer.decode(trainer.train_dataset[5]["input_ids"])
    space = tokenizer(" ", add_special_tokens=False).input_ids[0]
    masked = tokenizer.decode([space if x == -100 else x for x in trainer.train_dataset[5]["labels"]])

    before = memory_report()  # the recipe reads torch.cuda here
    trainer_stats = trainer.train()
    after = memory_report(trainer_stats)

    FastLanguageModel.for_inference(model)
    messages = [{"role": "user", "content": "Continue the fibonnaci sequence: 1, 1, 2, 3, 5, 8,"}]
    inputs = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_tensors="pt").to(
        model.device
    )  # was .to("cuda")
    outputs = model.generate(input_ids=inputs, max_new_tokens=16, use_cache=True, temperature=1.5, min_p=0.1)
    answer = tokenizer.batch_decode(outputs)

    from transformers import TextStreamer

    text_streamer = TextStreamer(tokenizer, skip_prompt=True)
    _ = model.generate(
        input_ids=inputs, streamer=text_streamer, max_new_tokens=8, use_cache=True, temperature=1.5, min_p=0.1
    )
    model.save_pretrained("lora_model")
    tokenizer.save_pretrained("lora_model")

    # --- what a user of the recipe relies on ------------------------------------------------------
    assert trainer_stats.metrics["train_runtime"] > 0 and len(trainer_stats.log_history) == 1
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer_stats.log_history)
    assert masked.count("<|start_header_id|>user") == 0, "user turns must be masked after train_on_responses_only"
    assert before["kind"] == "cpu" and after["peak_reserved_gib"] > 0 and after["train_runtime"] > 0
    out = capsys.readouterr().out
    assert "seconds used for training" in out and "Peak resident memory (RSS)" in out
    assert "<|start_header_id|>assistant<|end_header_id|>" in answer[0]
    assert (tmp_path / "lora_model" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "outputs" / "metrics.jsonl").is_file() and (tmp_path / "outputs" / "recipe.yaml").is_file()
    reloaded, _ = FastLanguageModel.from_pretrained("lora_model", max_seq_length=max_seq_length, load_in_4bit=True)
    assert reloaded.hizli.info.adapter.endswith("lora_model")
