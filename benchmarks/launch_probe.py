"""Python time per call of what a training step does around each NF4 dequantization, on a CPU.

No GPU is needed: Triton's JIT runs for real (binding, specialisation, cache key) over a stand-in
driver, and the compiled kernel it finds is a stand-in whose launcher does nothing, so each figure is
the Python of that path alone (a GPU machine adds the C launcher and the driver call). The
dequantization's own work is stubbed out too, leaving hizli's wrapper (checks cached per weight,
dispatch). Median of 5 runs of 20,000 calls each, in microseconds.

    python benchmarks/launch_probe.py [OUT.json]      (hizli, triton and bitsandbytes importable)

Sections a commit lacks (``BoundLaunch`` before hizli.kernels.launch existed) are left out.
"""

import json
import os
import sys
import time

import torch


def median_us(fn, n=20000, runs=5):
    for _ in range(100):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - start) / n * 1e6)
    return round(sorted(times)[runs // 2], 2)


def stand_in_triton(kernel):
    """Point Triton at a driver for one sm_90 GPU and make every compile return a do-nothing kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    class Compiled:
        function, packed_metadata = object(), ()

        def launch_metadata(self, *args):
            return None

        def run(self, *args):
            pass

    driver._active = Driver()
    kernel.device_caches[0]  # the device's binder
    kernel.compile = lambda src, target=None, options=None, **kw: Compiled()


def main(json_path=None):
    import bitsandbytes as bnb

    import hizli.kernels._precompile as precompile
    import hizli.kernels.nf4 as nf4
    from hizli.kernels._lora import dequantize_into
    from hizli.kernels.lora_casts import ComputeCopies, compute_copy

    res = {}
    precompile.wait = lambda *a, **k: None  # no background compile to wait for
    jit = nf4._nf4_dequant_kernel.materialize()
    stand_in_triton(jit)
    # a Llama-3.2-3B gate projection's launch: [8192, 3072], nested absmax, bf16 out
    n = 8192 * 3072
    args = [torch.zeros(n // 2, dtype=torch.uint8), torch.zeros(n // 64, dtype=torch.uint8), torch.zeros(16)]
    args += [torch.zeros(n // 64 // 256), torch.zeros(256), torch.zeros(1), torch.empty(n, dtype=torch.bfloat16)]
    args += [n, n // 2, n // 64, 256, 0]
    meta = dict(HALF=32, BLOCKS=64, NESTED=True, BF16_BY_BITS=False, num_warps=4, enable_fp_fusion=False)
    grid = (n // 64 // 64,)
    res["kernel[grid]"] = median_us(lambda: jit[grid](*args, **meta))
    try:
        from hizli.kernels import launch
    except ImportError:
        launch = None
    if launch is not None:
        launch._triton_parts[:] = []
        import triton.knobs as knobs
        from triton.runtime.jit import native_specialize_impl

        launch._triton_parts.extend([native_specialize_impl, knobs, lambda: 0, lambda device: 0])
        bound = launch.BoundLaunch(jit, grid, tuple(args[:6]) + (None,) + tuple(args[7:]), meta, open_at=6)
        for mode in ("jit", "direct"):
            os.environ[launch.ENV] = mode
            res[f"BoundLaunch, {mode}"] = median_us(lambda: bound(args[6]))
        os.environ.pop(launch.ENV)

    layer = bnb.nn.Linear4bit(3072, 8192, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").to("cpu")
    layer(torch.randn(2, 3072, dtype=torch.bfloat16))  # quantizes the weight
    out = torch.empty(8192, 3072, dtype=torch.bfloat16)
    nf4._dequantize_reference = lambda spec: out  # the wrapper's Python only
    nf4._into = lambda result, o: o
    res["dequantize_into (work stubbed)"] = median_us(lambda: dequantize_into(layer, out))

    copies, weight = ComputeCopies(), torch.nn.Parameter(torch.randn(16, 3072))
    compute_copy(weight, torch.bfloat16, copies)
    res["compute_copy, kept"] = median_us(lambda: compute_copy(weight, torch.bfloat16, copies))

    res["torch"], res["threads"] = torch.__version__, torch.get_num_threads()
    import triton

    res["triton"] = triton.__version__
    print(json.dumps(res, indent=1))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
