"""hizli: fast LoRA/QLoRA fine-tuning of chat models.

The names below mirror the Unsloth recipe so that its code runs with only the imports changed.
They are imported lazily: ``import hizli`` stays quick and needs no GPU, torch is loaded on first use.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# Each optimizer step has another token count: with expandable segments the CUDA caching allocator
# grows blocks in place instead of leaving odd-sized holes (measured: reserved memory stays close to
# allocated). It only takes effect if set before CUDA is initialised; a user's own setting wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def _quiet_known_noise() -> None:
    """Two messages every hizli run would print and no user can act on: PEFT calling a transformers
    method renamed in 5.x, and bitsandbytes looking for an optional CPU kernel package."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)

    class _NoKernelsCommunity(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "kernels-community" not in record.getMessage()

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsCommunity())


_quiet_known_noise()

__version__ = "0.1.0"

# public name -> module that defines it. No "train": hizli.train is the training subpackage, and
# importing any module under it rebinds that name on this package; the recipe's function is unsloth_train.
_EXPORTS = {
    "FastLanguageModel": "hizli.api",
    "get_chat_template": "hizli.api",
    "standardize_sharegpt": "hizli.api",
    "train_on_responses_only": "hizli.api",
    "SFTTrainer": "hizli.api",
    "TrainingArguments": "hizli.api",
    "DataCollatorForSeq2Seq": "hizli.api",
    "is_bfloat16_supported": "hizli.api",
    "unsloth_train": "hizli.api",
    "memory_report": "hizli.api",
    "sample_dataset": "hizli.data.sample",
    "load_recipe": "hizli.config",
    "Recipe": "hizli.config",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hizli' has no attribute {name!r}")
    from hizli._startup import gc_paused

    with gc_paused():  # the first name imports torch and hizli's modules: see hizli._startup
        value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
