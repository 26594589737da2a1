"""Shared test helpers (importable as ``helpers`` from any test file; tests/conftest.py puts this
folder on sys.path)."""

from __future__ import annotations

import torch


def tiny_llama_config(vocab_size: int = 49152, **overrides):
    """A 2-layer Llama small enough for CPU tests (GQA, tied embeddings, like Llama 3.2)."""
    from transformers import LlamaConfig

    values = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        # row lengths (in_features) a multiple of 64: bitsandbytes' AVX512 CPU kernels get rows that are
        # a multiple of 16 but not of 64 wrong (dequantization off by up to 2; 4-bit eval matmul raises)
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_lora_model(dtype=torch.float32, seed: int = 0, checkpointing=False, vocab: int = 512, lora_seed: int = 3407):
    """A 2-layer Llama (base weights from ``seed``) with LoRA r=8 whose B is random (``lora_seed``)."""
    from transformers import LlamaForCausalLM

    from hizli.models import lora
    from hizli.models.patch import use_hizli_attention

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=vocab)).to(dtype)
    use_hizli_attention(model)
    model = lora.add_lora(
        model,
        r=8,
        lora_alpha=16,
        use_gradient_checkpointing=checkpointing,
        init_lora_weights=False,
        random_state=lora_seed,
    )  # random B: the adapter matters from step 0
    return model


def token_rows(n: int, seed: int = 0, vocab: int = 512, lo: int = 5, hi: int = 40, masked_prefix: bool = True):
    """Rows of varying length; the first few tokens of each are not trained (like a prompt)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        cut = int(torch.randint(1, max(2, length // 2), (1,), generator=g)) if masked_prefix else 0
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return rows


class FakeTokenizer:
    """Enough of a tokenizer for trainer tests on pre-tokenized rows."""

    pad_token_id = 0
    eos_token_id = 2
    pad_token = "<pad>"
    eos_token = "</s>"

    def save_pretrained(self, path):
        pass


LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def one_layer_lora_model(
    tmp_path,
    *,
    hidden,
    inter,
    heads,
    kv_heads,
    head_dim,
    dtype,
    device,
    seed=0,
    use_rslora=False,
    lora_dropout=0.0,
    attention_bias=False,
):
    """A 1-layer Llama of this shape loaded in NF4 + double quant (as the loader does), LoRA r=16 on all
    seven projections with random B (so the adapters matter), in train mode."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

    from hizli.models import lora

    torch.manual_seed(seed)
    config = tiny_llama_config(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        attention_bias=attention_bias,  # q/k/v/o with a bias, as Qwen2's q/k/v
    )
    folder = tmp_path / f"m{hidden}x{inter}"
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, quantization_config=quant, device_map={"": device}
    )
    model = lora.add_lora(
        model,
        r=16,
        lora_alpha=16,
        lora_dropout=lora_dropout,
        use_rslora=use_rslora,
        target_modules=list(LORA_PROJECTIONS),
        use_gradient_checkpointing=False,
        init_lora_weights=False,
        random_state=seed + 1,
    )
    model.train()
    return model


def random_lora_part(
    out_features: int, in_features: int, *, nf4: bool, rank: int = 8, scaling: float = 2.0, device="cpu", seed: int = 0
):
    """A ``hizli.kernels.lora_qkv.LoraPart`` with random weights: a frozen base (NF4 with double
    quantization as the loader makes it, or a plain ``nn.Linear``) and fp32 ``lora_A`` / ``lora_B``
    that require grad, as PEFT keeps them."""
    from types import SimpleNamespace

    from hizli.kernels.lora_qkv import LoraPart

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * in_features**-0.5
    if nf4:
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(w.to(device), blocksize=64, compress_statistics=True, quant_type="nf4")
        packed.quant_state = state
        base = SimpleNamespace(weight=packed, in_features=in_features, out_features=out_features)
    else:
        base = torch.nn.Linear(in_features, out_features, bias=False, device=device)
        with torch.no_grad():
            base.weight.copy_(w)
        base.weight.requires_grad_(False)
    a = (torch.randn(rank, in_features, generator=g) * in_features**-0.5).to(device).requires_grad_()
    b = (torch.randn(out_features, rank, generator=g) * 0.5).to(device).requires_grad_()
    return LoraPart(base, a, b, scaling)


def gpu_llama_folder(out) -> str:
    """A 4-layer random Llama (bf16) saved in ``out`` with a real tokenizer: Llama 3's from the GPU
    bundle when it is there (the GPU machine has no embedded model package), else the embedded model's.
    The GPU tests' model: big enough for the fused kernels' real tile shapes, small enough for 20 steps."""
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    from hizli.bench.shapes import load_tokenizer

    bundle = Path(__file__).resolve().parents[1] / ".gpu-bundle" / "tok" / "tokenizer.json"
    tok = load_tokenizer(str(bundle) if bundle.is_file() else None)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)
