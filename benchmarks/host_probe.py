"""Host time per call of the ops a capped training step makes, with the GPU kept busy by a sleep
kernel so that no launch waits for it: a figure far above its repeat means the call waited for the
GPU to drain (5 ms here is one wait of about 1 s spread over 200 calls).

    python benchmarks/host_probe.py OUT.json      (on a GPU; hizli and bitsandbytes importable)
"""

import json
import sys
import time
import torch

dev = torch.device("cuda")
res = {}


def host_us(fn, n=200):
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # keep the GPU busy so launches never block
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    dt = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return round(dt, 1)


w = torch.randn(5120, 3072, device=dev, dtype=torch.bfloat16)
xs = {m: torch.randn(m, 3072, device=dev, dtype=torch.bfloat16) for m in range(3000, 3000 + 400)}
big = torch.randn(4400, 3072, device=dev, dtype=torch.bfloat16)
for lib in ("cublas", "cublaslt"):
    torch.backends.cuda.preferred_blas_library(lib)
    _ = big @ w.t()
    res[f"{lib}_mm_same_M"] = host_us(lambda i: big @ w.t())
    res[f"{lib}_mm_new_M"] = host_us(lambda i: xs[3000 + i] @ w.t())
    res[f"{lib}_mm_new_M_again"] = host_us(lambda i: xs[3000 + i] @ w.t())
    res[f"{lib}_mm_new_M_slice"] = host_us(lambda i: big[: 3000 + 200 + i] @ w.t())
    a = torch.randn(16 * 3, 3072, device=dev, dtype=torch.bfloat16)
    res[f"{lib}_lora_a_new_M"] = host_us(lambda i: big[: 3400 + i] @ a.t())
    res[f"{lib}_addmm_new_M"] = host_us(
        lambda i: big[: 3600 + i, :1024].addmm_(big[: 3600 + i, :16], a[:16, :1024], alpha=2.0)
    )
torch.backends.cuda.preferred_blas_library("cublas")
res["empty_new_size"] = host_us(lambda i: torch.empty(4000 + i, 3072, device=dev, dtype=torch.bfloat16))
res["pinned_empty_27MB"] = host_us(
    lambda i: torch.empty(4000 + i % 389, 3072, dtype=torch.bfloat16, pin_memory=True), n=50
)
res["add_same"] = host_us(lambda i: big.add(1))

# NF4 dequantisation through hizli (bitsandbytes quant state)
try:
    import bitsandbytes as bnb
    from hizli.kernels.nf4 import dequantize_nf4

    lin = bnb.nn.Linear4bit(3072, 8192, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    lin = lin.to(dev)
    out = torch.empty(8192, 3072, device=dev, dtype=torch.bfloat16)
    dequantize_nf4(lin.weight, lin.weight.quant_state, out=out)
    res["nf4_dequant_launch"] = host_us(lambda i: dequantize_nf4(lin.weight, lin.weight.quant_state, out=out))
    from hizli.kernels.rms_norm import rms_norm

    g = torch.ones(3072, device=dev, dtype=torch.bfloat16)
    rms_norm(big, g, 1e-5)
    res["rms_norm_launch"] = host_us(lambda i: rms_norm(big, g, 1e-5))
except Exception as e:  # noqa: BLE001
    res["nf4_error"] = repr(e)


class F(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return g


xr = big[:10].clone().requires_grad_(True)
res["autograd_fn_apply_grad"] = host_us(lambda i: F.apply(xr))
with torch.no_grad():
    res["autograd_fn_apply_nograd"] = host_us(lambda i: F.apply(xr))
print(json.dumps(res, indent=1))
json.dump(res, open(sys.argv[1], "w"), indent=1)
