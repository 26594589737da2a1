"""Checks the trainer makes before the first step, so a bad input fails with its row named."""

from __future__ import annotations

import pytest

from hizli.train.args import TrainingArguments
from hizli.train.trainer import SFTTrainer

from helpers import FakeTokenizer, tiny_lora_model, token_rows


def test_token_ids_outside_the_vocabulary_name_the_row(tmp_path):
    rows = token_rows(6, seed=1)
    rows[4] = {"input_ids": [5, 6, 9999], "labels": [5, 6, 9999]}
    trainer = SFTTrainer(
        model=tiny_lora_model(),
        tokenizer=FakeTokenizer(),
        train_dataset=rows,
        args=TrainingArguments(max_steps=1, output_dir=str(tmp_path), disable_tqdm=True),
    )
    with pytest.raises(ValueError, match="train row 4 has token id 9999, outside this model's vocabulary of 512"):
        trainer.train()
