"""The recipe's export methods on a LoRA model: bound by the Python front door (``hizli.api``), not by
the models layer, which must not import export/."""

from __future__ import annotations

import torch

from hizli.api import EXPORT_METHODS, FastLanguageModel
from hizli.models import lora


def _has_export_methods(model) -> bool:
    return all(getattr(getattr(model, name, None), "__self__", None) is model for name in EXPORT_METHODS)


def test_get_peft_model_gives_the_recipe_export_methods(tiny_config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = FastLanguageModel.get_peft_model(LlamaForCausalLM(tiny_config), r=4, use_gradient_checkpointing=False)
    assert _has_export_methods(model)
    assert model.save_pretrained_merged.__func__.__module__ == "hizli.export.api"
    assert type(model).push_to_hub is not model.push_to_hub.__func__  # hizli's private-by-default upload


def test_models_layer_alone_binds_no_export_method(tiny_config):
    from transformers import LlamaForCausalLM

    model = lora.add_lora(LlamaForCausalLM(tiny_config), r=4, use_gradient_checkpointing=False)
    assert not any(name in vars(model) for name in EXPORT_METHODS)
    assert vars(model).get("save_pretrained") is not None  # its own adaptations still happen there


def test_from_pretrained_of_an_adapter_folder_gives_them_too(tiny_model_dir, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_model_dir, load_in_4bit=False)
    assert not _has_export_methods(model)  # a plain model has no adapter to merge
    FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _tokenizer = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=False)
    assert _has_export_methods(loaded)
