#!/usr/bin/env python3
"""Host time per call of the operations a fused 4-bit LoRA layer launches, on a GPU.

A capped step (small micro-batches, every layer offloaded) is bound by the host: in the capped
recipe run of 2026-11-28 (H200) the profiler put ``aten::mm`` at about 40 us of CPU per call. This
asks which calls are slow and why, each timed as ``perf_counter`` around N launches without a sync
(median over rounds; the GPU work is kept small where only the launch is wanted):

- dispatch floor: a 64-element add, a 64 x 64 matmul;
- matmuls at the capped micro-batch's shape (4,389 tokens x 3,072), the same M every call and a new
  M every call (cuBLAS picks an algorithm per shape);
- an fp32 -> bf16 cast of a LoRA-sized weight, an NF4 dequantisation launch, an empty Triton launch;
- one layer's fused q/k/v + o + MLP forward under no_grad, with kept LoRA copies and without.

    export PYTHONPATH=$PWD/.gpu-bundle/site:$PWD/src
    python3 benchmarks/host_overhead.py --json host.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def host_us(fn, calls: int = 50, rounds: int = 9) -> float:
    """Median over rounds of host microseconds per call (no sync inside a round)."""
    fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return round(statistics.median(per), 1)


def environment() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    env = {k: v for k, v in os.environ.items() if k.startswith(("CUDA_", "TORCH", "PYTORCH", "CUBLAS", "OMP", "TRITON"))}
    blas = getattr(torch.backends.cuda, "preferred_blas_library", lambda: "?")()
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "blas": str(blas), "env": env,
            "gpu": torch.cuda.get_device_name(0)}


def op_timings(tokens: int) -> dict:
    dev = "cuda"
    bf = torch.bfloat16
    out: dict = {}
    s = torch.randn(64, device=dev)
    out["add_64"] = host_us(lambda: s + s)
    m = torch.randn(64, 64, device=dev, dtype=bf)
    out["mm_64x64"] = host_us(lambda: m @ m)
    x = torch.randn(tokens, 3072, device=dev, dtype=bf)
    w = torch.randn(3072, 3072, device=dev, dtype=bf)
    out["mm_fixed_M"] = host_us(lambda: x @ w.t(), calls=20)
    ms = iter(range(tokens, 0, -1))
    out["mm_new_M_each_call"] = host_us(lambda: x[:next(ms)] @ w.t(), calls=20)
    a = torch.randn(16, 3072, device=dev, dtype=bf)
    y = torch.empty(tokens, 3072, device=dev, dtype=bf)
    xa = torch.randn(tokens, 16, device=dev, dtype=bf)
    out["addmm_into_slice"] = host_us(lambda: y[:, :3072].addmm_(xa, a, alpha=2.0), calls=20)
    a32 = torch.randn(16, 3072, device=dev)
    out["cast_lora_A_fp32_to_bf16"] = host_us(lambda: a32.to(bf))
    out["empty_like_activation"] = host_us(lambda: torch.empty(tokens, 3072, device=dev, dtype=bf))
    try:
        import bitsandbytes as bnb

        from hizli.kernels.nf4 import dequantize_nf4

        lin = bnb.nn.Linear4bit(3072, 3072, bias=False, compute_dtype=bf, quant_type="nf4",
                                compress_statistics=True).to(dev)
        buf = torch.empty(3072, 3072, device=dev, dtype=bf)
        out["nf4_dequant_launch"] = host_us(lambda: dequantize_nf4(lin.weight, out=buf))
    except Exception as e:  # noqa: BLE001 - report, do not stop the other timings
        out["nf4_dequant_launch"] = f"failed: {e!r}"[:200]
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def _noop(p, n, B: tl.constexpr):
            i = tl.program_id(0) * B + tl.arange(0, B)
            tl.store(p + i, tl.load(p + i, mask=i < n), mask=i < n)

        out["triton_noop_launch"] = host_us(lambda: _noop[(1,)](s, 64, B=64))
    except Exception as e:  # noqa: BLE001
        out["triton_noop_launch"] = f"failed: {e!r}"[:200]
    return out


def layer_timings(tokens: int) -> dict:
    from fused_lora_bench import build, paths

    from hizli.kernels import lora_casts

    layer = build(torch.bfloat16)
    fused = paths(layer)["fused"]
    x = torch.randn(1, tokens, 3072, device="cuda", dtype=torch.bfloat16)
    res = {}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for cache in (True, False):
            lora_casts.CACHE = cache
            with torch.no_grad():
                res[f"fused_projections_forward_no_grad_cache_{cache}"] = host_us(lambda: fused(x, x), calls=5)
            xg = x.detach().requires_grad_(True)
            res[f"fused_projections_forward_backward_cache_{cache}"] = host_us(lambda: fused(xg, xg).backward(),
                                                                               calls=5)
    lora_casts.CACHE = True
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4389)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
              "tokens": a.tokens, "environment": environment()}
    print(json.dumps(result["environment"]), flush=True)
    result["host_us_per_call"] = op_timings(a.tokens)
    print(json.dumps(result["host_us_per_call"]), flush=True)
    result["layer_host_us_per_call"] = layer_timings(a.tokens)
    print(json.dumps(result["layer_host_us_per_call"]), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
