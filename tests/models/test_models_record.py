"""``model.hizli``: the one record hizli keeps on a model, and nothing else written on foreign objects."""

from __future__ import annotations

import torch
from helpers import tiny_llama_config

from hizli.models import loader, lora
from hizli.models.patch import model_uses_fused_lora
from hizli.models.patch import use_fused_ops
from hizli.models.record import HizliState, find_state


def _hizli_attributes(obj) -> list[str]:
    return [k for k in vars(obj) if "hizli" in k.lower()]


def _foreign_hizli_attributes(model) -> dict[str, list[str]]:
    """Every attribute named like hizli's on the model, its modules and parameters, except the record."""
    found = {}
    for name, module in model.named_modules():
        names = [k for k in _hizli_attributes(module) if not (k == "hizli" and isinstance(module.hizli, HizliState))]
        names += [f"{p}.{k}" for p, param in module.named_parameters(recurse=False) for k in _hizli_attributes(param)]
        if names:
            found[name or "<model>"] = names
    return found


def test_load_and_get_peft_model_keep_one_record_and_nothing_else(tiny_model_dir):
    model, tokenizer = loader.load(tiny_model_dir, max_seq_length=256, load_in_4bit=False)
    record = model.hizli
    assert isinstance(record, HizliState) and record.info.kind == "folder" and record.load_seconds
    peft_model = lora.add_lora(model, r=8, lora_alpha=16, use_gradient_checkpointing=True)
    assert find_state(peft_model) is record and peft_model.hizli is record  # one record, seen through PEFT
    assert record.lora["r"] == 8 and record.checkpointing == "recompute"
    assert record.allowed_modes == ("keep", "recompute") and set(record.layer_modes) == {"recompute"}
    save, generate = peft_model.save_pretrained, peft_model.generate
    lora.attach_methods(peft_model)  # a second time: the methods are not wrapped twice
    assert peft_model.save_pretrained is save and peft_model.generate is generate
    assert _foreign_hizli_attributes(peft_model) == {}
    from hizli.data.templates import get_chat_template, template_info

    get_chat_template(tokenizer, "qwen-2.5", warn=False)
    assert not _hizli_attributes(tokenizer) and template_info(tokenizer).name == "qwen-2.5"  # known by its text


def test_fused_ops_are_applied_once_and_known_without_marks_on_modules():
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(vocab_size=512))
    counts = use_fused_ops(model)
    layers = model.config.num_hidden_layers
    assert counts == {"rms_norm": 2 * layers + 1, "swiglu": layers, "rope": layers}
    assert use_fused_ops(model) == {"rms_norm": 0, "swiglu": 0, "rope": 0}  # already routed: left alone
    peft_model = lora.add_lora(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    assert model_uses_fused_lora(peft_model)
    assert _foreign_hizli_attributes(peft_model) == {}
