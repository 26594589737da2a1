#!/usr/bin/env python3
"""One decoder layer's LoRA projections at the recipe shape: fused (hizli) vs PEFT + bitsandbytes.

Times forward + backward of the q/k/v group, o and the SwiGLU MLP of a Llama-3.2-3B-shaped layer in
NF4 with LoRA r=16, for several token counts, both ways, with CUDA events after warm-up (median of
``--reps``). Also reports the host time per call (``perf_counter`` around the launches without
synchronising), which is what bounds a step when micro-batches are small, and the peak memory the
call adds. Run on a GPU:

    export PYTHONPATH=$PWD/.gpu-bundle/site:$PWD/src
    python3 benchmarks/fused_lora_bench.py --tokens 512,2048,8192
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(dtype):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from hizli.models import lora

    cfg = LlamaConfig(vocab_size=256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=1,
                      num_attention_heads=24, num_key_value_heads=8, head_dim=128)
    folder = Path(tempfile.mkdtemp()) / "layer"
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=q, device_map={"": 0})
    model = lora.add_lora(model, r=16, lora_alpha=16, target_modules=PROJ, use_gradient_checkpointing=False,
                          init_lora_weights=False)
    model.train()
    return model.get_base_model().model.layers[0]


def paths(layer):
    from hizli.kernels.lora_mlp import lora_mlp
    from hizli.kernels.lora_qkv import lora_qkv
    from hizli.models import fused_lora as fl

    attn, mlp = layer.self_attn, layer.mlp
    qkv = fl.group_parts(attn, ["q_proj", "k_proj", "v_proj"])
    o = fl.group_parts(attn, ["o_proj"])
    gud = fl.group_parts(mlp, ["gate_proj", "up_proj", "down_proj"])
    silu = torch.nn.functional.silu

    def fused(x, xo):
        q, k, v = lora_qkv(x, qkv)
        return q.sum() + k.sum() + v.sum() + lora_qkv(xo, o)[0].sum() + lora_mlp(x, gud).sum()

    def peft(x, xo):
        return (attn.q_proj(x).sum() + attn.k_proj(x).sum() + attn.v_proj(x).sum() + attn.o_proj(xo).sum()
                + mlp.down_proj(silu(mlp.gate_proj(x)) * mlp.up_proj(x)).sum())

    return {"fused": fused, "peft": peft}


def time_one(fn, x, xo, reps):
    def call():
        fn(x, xo).backward()

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    gpu_ms, host_ms = [], []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        call()
        host_ms.append((time.perf_counter() - t0) * 1e3)
        end.record()
        torch.cuda.synchronize()
        gpu_ms.append(start.elapsed_time(end))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return {"ms": round(statistics.median(gpu_ms), 3), "host_ms": round(statistics.median(host_ms), 3),
            "extra_peak_mib": round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="512,2048,8192")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    layer = build(dtype)
    results = []
    with torch.autocast("cuda", dtype=dtype):
        for n in [int(t) for t in a.tokens.split(",")]:
            x = torch.randn(1, n, 3072, device="cuda", dtype=dtype, requires_grad=True)
            xo = torch.randn(1, n, 3072, device="cuda", dtype=dtype, requires_grad=True)
            row = {"tokens": n}
            for name, fn in paths(layer).items():
                row[name] = time_one(fn, x, xo, a.reps)
            row["speedup"] = round(row["peft"]["ms"] / row["fused"]["ms"], 2)
            print(json.dumps(row), flush=True)
            results.append(row)
    out = {"gpu": torch.cuda.get_device_name(0), "dtype": a.dtype, "date": time.strftime("%Y-%m-%d"),
           "command": " ".join(sys.argv), "results": results}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
