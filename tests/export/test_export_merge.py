"""Merged exports: the saved model computes what the adapter model computed, on real chat prompts.

Acceptance (issue 15, restated for a 135M model):
- float64: both models evaluated in fp64 (the merged one from its weights as saved in fp32), max abs
  logit difference <= 1e-4 over every position and vocabulary entry of 5 chat prompts. What is left
  is the fp32 rounding of the saved ``W + s B A`` (measured 1.9e-5).
- fp32: teacher-forced on each prompt plus the adapter model's 32-token greedy answer, the argmax
  agrees at every position where the adapter model's top-2 margin is above 1e-3. A logits bound is
  not used in fp32: ``W x + s B (A x)`` and ``(W + s B A) x`` round differently and SmolLM2's large
  activations carry that to ~1.1e-4 on logits of magnitude ~25 (the adapter model itself moves by
  6.3e-5 when the same prompt is run with more text after it), so a margin below ~1e-3 is a tie.
- NF4 base: against the same adapter on the dequantized NF4 weights (an fp32 model holding
  bitsandbytes' own dequantization), the same two checks. The eval-mode CPU kernel of bitsandbytes
  (AVX512-BF16) computes in bf16 instead, ~1 logit away from either; that path is covered by the
  packed-layout test below, not by a logits tolerance.
"""

from __future__ import annotations

import json

import pytest
import torch

from hizli.api import FastLanguageModel, attach_export_methods
from hizli.export import merge
from hizli.models import loader

TIE = 1e-3  # fp32: a top-2 margin below this is a rounding tie (see the module docstring)


def _max_diff(chat, model_a, model_b, prompts) -> float:
    return max((chat.logits(model_a, p) - chat.logits(model_b, p)).abs().max().item() for p in prompts)


def test_merged_16bit_matches_adapter_model(adapter_model, merged_dir, chat, prompts):
    model, tokenizer = adapter_model
    # the adapter really changes the model, so agreement below is not agreement with the base
    with model.disable_adapter():
        base_logits = chat.logits(model, prompts[0])
    assert (chat.logits(model, prompts[0]) - base_logits).abs().max().item() > 0.1

    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True and config["dtype"] == "float32"
    assert (merged_dir / "generation_config.json").is_file()
    assert "<|im_start|>" in (merged_dir / "chat_template.jinja").read_text()
    from safetensors import safe_open

    with safe_open(str(merged_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys  # tied: stored once, as transformers does
    assert not any("lora" in k or "base_layer" in k for k in keys)

    merged, merged_tok = loader.load(str(merged_dir), load_in_4bit=False)
    merged.eval()
    assert merged_tok.chat_template == tokenizer.chat_template
    fp32 = chat.teacher_forced(model, merged, prompts)
    print(f"merged vs adapter, fp32 teacher-forced: {fp32}")
    assert [m for m in fp32["misses"] if m[2] > TIE] == []
    try:  # fp32 -> fp64 -> fp32 is exact, so the shared fixture model comes back unchanged
        model.double(), merged.double()
        fp64 = _max_diff(chat, model, merged, prompts)
        print(f"merged vs adapter, fp64: max abs logit difference {fp64:.2e} over {len(prompts)} prompts")
        assert fp64 <= 1e-4
    finally:
        model.float(), merged.float()


def test_export_leaves_live_model_untouched(adapter_model, merged_dir, chat, prompts):
    model, _ = adapter_model
    before = chat.logits(model, prompts[1])
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    w = layer.base_layer.weight.detach().clone()
    model.save_pretrained_merged(str(merged_dir.parent / "again"), adapter_model[1])
    assert torch.equal(layer.base_layer.weight, w)
    assert not layer.merged
    assert torch.equal(chat.logits(model, prompts[1]), before)


def test_merged_16bit_from_nf4_base(adapter_dir, chat, prompts, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from peft import PeftModel

    model, tokenizer = loader.load(str(adapter_dir), load_in_4bit=True, adapter_trainable=False)
    attach_export_methods(model)  # what FastLanguageModel.from_pretrained adds
    assert model.hizli.info.is_4bit
    # Reference: the fp32 base with every NF4 weight replaced by its dequantized value (bitsandbytes'
    # own dequantize, read before any CPU inference repacks it), then the same adapter, unmerged.
    reference, _ = loader.load("smollm2-135m-instruct", load_in_4bit=False)
    ref_modules = dict(reference.named_modules())
    n_replaced = 0
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, bnb.nn.Linear4bit):  # (PEFT's LoRA wrapper has the same class name)
            dense = F.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            with torch.no_grad():
                ref_modules[name.replace(".base_layer", "")].weight.copy_(dense)
            n_replaced += 1
    assert n_replaced == 30 * 7
    reference = PeftModel.from_pretrained(reference, str(adapter_dir)).eval()

    model.save_pretrained_merged(str(tmp_path / "merged-nf4"), tokenizer)
    config = json.loads((tmp_path / "merged-nf4" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    merged, _ = loader.load(str(tmp_path / "merged-nf4"), load_in_4bit=False)
    merged.eval()
    fp32 = chat.teacher_forced(reference, merged, prompts)
    print(f"merged (NF4 base) vs adapter, fp32 teacher-forced: {fp32}")
    assert [m for m in fp32["misses"] if m[2] > TIE] == []
    reference.double(), merged.double()  # fp64 on two prompts: the merge's own error (slow on a CPU)
    assert _max_diff(chat, reference, merged, prompts[:2]) <= 1e-4


def _nibble_codes(qweight, shape):
    """NF4 codes of bitsandbytes' standard layout: two per byte, high nibble first, row-major."""
    flat = qweight.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(shape)
    return codes.long()


def test_dequantize_reads_bitsandbytes_cpu_packed_layout():
    pytest.importorskip("bitsandbytes")
    import copy

    import bitsandbytes.functional as F

    torch.manual_seed(0)
    w = torch.randn(96, 256) * 0.02
    qweight, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    packed, packed_qs = F._convert_weight_packed_for_cpu(qweight.clone(), copy.deepcopy(qs))
    assert packed_qs.packing_format_for_cpu

    decoded = merge._dequantize_cpu_packed(packed, packed_qs)
    # expected from the standard layout: same codes, scaled by the bf16 block absmax the kernel uses
    codes = _nibble_codes(qweight, (96, 256))
    absmax = packed_qs.absmax.float().T  # [rows, blocks]
    expected = (qs.code.float()[codes].reshape(96, 4, 64) * absmax.unsqueeze(-1)).reshape(96, 256)
    assert torch.equal(decoded, expected)
    # and it is the NF4 weight up to bf16 rounding of absmax (relative 2^-8)
    reference = F.dequantize_4bit(qweight, qs)
    assert torch.allclose(decoded, reference, rtol=2**-8, atol=1e-7)


def test_sharded_and_bf16_outputs_load_back(tiny_model_dir, tmp_path):
    model, tokenizer = loader.load(tiny_model_dir, load_in_4bit=False)
    # random A and B: a non-zero adapter
    peft_model = FastLanguageModel.get_peft_model(model, r=4, init_lora_weights=False)
    peft_model.eval()
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits

    peft_model.save_pretrained_merged(str(tmp_path / "sharded"), tokenizer, max_shard_size="2MB")
    shards = sorted((tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    sharded, _ = loader.load(str(tmp_path / "sharded"), load_in_4bit=False)
    with torch.no_grad():
        assert (sharded(input_ids=ids).logits - want).abs().max().item() <= 1e-5

    peft_model.save_pretrained_merged(str(tmp_path / "bf16"), tokenizer, dtype="bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors.torch import load_file

    full = {}
    for shard in shards:
        full.update(load_file(str(shard)))
    half = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert half.keys() == full.keys()
    for name, t in half.items():  # the same merged weights, rounded once to bf16
        assert t.dtype == torch.bfloat16 and torch.equal(t, full[name].to(torch.bfloat16)), name
    reloaded, _ = loader.load(str(tmp_path / "bf16"), load_in_4bit=False, dtype="bfloat16")
    assert reloaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_merged_4bit_is_the_merged_model_quantized(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    model, tokenizer = loader.load(tiny_model_dir, load_in_4bit=False)
    peft_model = FastLanguageModel.get_peft_model(model, r=4, init_lora_weights=False)
    peft_model.save_pretrained_merged(str(tmp_path / "m16"), tokenizer)
    peft_model.save_pretrained_merged(str(tmp_path / "m4"), tokenizer, save_method="merged_4bit")
    config = json.loads((tmp_path / "m4" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert not (tmp_path / "m4" / ".merged-full-precision").exists()

    four, _ = loader.load(str(tmp_path / "m4"), load_in_4bit=False)  # 4-bit on disk: loads as 4-bit
    assert four.hizli.info.is_4bit
    requantized, _ = loader.load(str(tmp_path / "m16"), load_in_4bit=True)
    four.train(), requantized.train()  # bitsandbytes' fp32 path on CPU (no bf16 repacking)
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = four(input_ids=ids).logits, requantized(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_lora_save_method_writes_a_peft_adapter(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tokenizer = loader.load(tiny_model_dir, load_in_4bit=False)
    peft_model = FastLanguageModel.get_peft_model(model, r=4, init_lora_weights=False).eval()
    peft_model.save_pretrained_merged(str(tmp_path / "adapter"), tokenizer, save_method="lora")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "tokenizer.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    again = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-6)


def test_bad_arguments_are_explained(tiny_model_dir, tmp_path):
    model, tokenizer = loader.load(tiny_model_dir, load_in_4bit=False)
    peft_model = FastLanguageModel.get_peft_model(model, r=4)
    with pytest.raises(ValueError, match="save_method='merged_8bit'.*merged_16bit"):
        peft_model.save_pretrained_merged(str(tmp_path / "x"), tokenizer, save_method="merged_8bit")
    with pytest.raises(ValueError, match="dtype='int8'"):
        peft_model.save_pretrained_merged(str(tmp_path / "x"), tokenizer, dtype="int8")
    with pytest.raises(ValueError, match="no LoRA adapters|has none"):
        merge.save_merged(model, tmp_path / "y", tokenizer, save_method="lora")  # model: no PeftModel
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty.*keep.txt.*overwrite=True"):
        peft_model.save_pretrained_merged(str(tmp_path / "full"), tokenizer, overwrite=False)
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hizli-partial")]
