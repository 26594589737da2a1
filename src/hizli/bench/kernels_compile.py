"""``hizli bench kernels --compile``: every hizli Triton kernel compiled for Hopper (sm_90) without a
GPU, with its registers and spills.

Triton can compile to a cubin with no GPU present (its bundled ptxas); this runs the full pipeline at
the recipe's constexprs (block sizes, head counts) and reads the resource use from ``ptxas -v``.
A spill (bytes stored to local memory) in a bandwidth-bound kernel is a slowdown worth a look, so
``tests/kernels/test_kernels_compile.py`` fails on one.

    hizli bench kernels --compile [--json OUT]

Must run without TRITON_INTERPRET (the interpreter replaces ``triton.jit``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time


def _cases():
    """name -> (kernel, {arg: pointer dtype string or int value}, constexprs, num_warps).

    Integer arguments carry their value at the recipe shape (N = 12,000 tokens, H = 3,072, 24 + 8
    heads of 128, I = 8,192, V = 128,256) because Triton specializes on it: a value divisible by 16
    (and every pointer, torch's allocations being 16-byte aligned) is compiled with that divisibility
    known, which is what lets the loads vectorise.
    """
    from hizli.kernels import cross_entropy, rms_norm, rope, swiglu

    def ptrs(names, dtype):
        return {n: f"*{dtype}" for n in names.split()}

    n, h, i, v, t_stride_q, t_stride_k = 12_000, 3_072, 8_192, 128_256, 24 * 128, 8 * 128
    ce_args = {
        **ptrs("logits_ptr", "bf16"),
        **ptrs("targets_ptr", "i64"),
        **ptrs("loss_ptr", "fp32"),
        "n_cols": v,
        "row_stride": v,
        "ignore_index": -100,
        "logit_scale": "fp32",
        "softcap": "fp32",
    }
    rms_bwd_args = {
        **ptrs("dy_ptr x_ptr w_ptr", "bf16"),
        **ptrs("rstd_ptr", "fp32"),
        **ptrs("dx_ptr", "bf16"),
        **ptrs("dw_ptr", "fp32"),
        "n_rows": n,
        "n_cols": h,
        "dy_stride": h,
        "x_stride": h,
        "dx_stride": h,
        "rows_per_program": 23,
    }
    rope_args = {
        **ptrs("q_ptr k_ptr qo_ptr ko_ptr cos_ptr sin_ptr", "bf16"),
        "seq_len": n,
        "n_qh": 24,
        "n_kh": 8,
        "q_sb": n * t_stride_q,
        "q_st": t_stride_q,
        "q_sh": 128,
        "k_sb": n * t_stride_k,
        "k_st": t_stride_k,
        "k_sh": 128,
        "qo_sb": n * t_stride_q,
        "qo_st": t_stride_q,
        "qo_sh": 128,
        "ko_sb": n * t_stride_k,
        "ko_st": t_stride_k,
        "ko_sh": 128,
        "c_sb": n * 128,
        "c_st": 128,
        "s_sb": n * 128,
        "s_st": 128,
    }
    return {
        "rms_norm fwd (H=3072)": (
            rms_norm._rms_norm_fwd_kernel,
            {
                **ptrs("x_ptr w_ptr y_ptr", "bf16"),
                **ptrs("rstd_ptr", "fp32"),
                "n_cols": h,
                "x_stride": h,
                "y_stride": h,
                "eps": "fp32",
            },
            {"BLOCK": 4096},
            8,
        ),
        "rms_norm bwd +dw": (rms_norm._rms_norm_bwd_kernel, rms_bwd_args, {"BLOCK": 4096, "HAS_DW": True}, 16),
        "rms_norm bwd": (rms_norm._rms_norm_bwd_kernel, rms_bwd_args, {"BLOCK": 4096, "HAS_DW": False}, 16),
        "rope fwd/bwd (24+8 heads x 128)": (
            rope._rope_kernel,
            rope_args,
            {"HALF": 64, "BLOCK_QH": 32, "BLOCK_KH": 8, "BLOCK_D": 64, "BACKWARD": True},
            4,
        ),
        "swiglu fwd (I=8192)": (
            swiglu._swiglu_fwd_kernel,
            {**ptrs("g_ptr u_ptr y_ptr", "bf16"), "n_cols": i, "g_stride": i, "u_stride": i, "y_stride": i},
            {"BLOCK": 2048},
            8,
        ),
        "swiglu bwd": (
            swiglu._swiglu_bwd_kernel,
            {
                **ptrs("dy_ptr g_ptr u_ptr dg_ptr du_ptr", "bf16"),
                "n_cols": i,
                "dy_stride": i,
                "g_stride": i,
                "u_stride": i,
                "dg_stride": i,
                "du_stride": i,
            },
            {"BLOCK": 2048},
            8,
        ),
        "cross-entropy row pass (V=128256)": (
            cross_entropy._ce_chunk_kernel,
            ce_args,
            {"HAS_SOFTCAP": False, "WRITE_GRAD": True, "BLOCK": 4096},
            8,
        ),
        "cross-entropy row pass, softcap": (
            cross_entropy._ce_chunk_kernel,
            ce_args,
            {"HAS_SOFTCAP": True, "WRITE_GRAD": True, "BLOCK": 4096},
            8,
        ),
    }


def _source(kernel, args: dict, constexprs: dict):
    """An ASTSource with the signature and divisibility attributes Triton's launcher would give."""
    import triton

    fn = kernel.materialize() if hasattr(kernel, "materialize") else kernel
    signature, attrs = {}, {}
    for name, value in args.items():
        index = fn.arg_names.index(name)
        if isinstance(value, str):
            signature[name] = value
            if value.startswith("*"):
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    signature.update({k: "constexpr" for k in constexprs})
    return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _sass(cubin: bytes, tools: str) -> dict[str, int]:
    """Counts of global load instructions by width (LDG.E.128 = 16-byte vectors) in the cubin."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    text = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    counts: dict[str, int] = {}
    for op in re.findall(r"\b(LDG\.E[.\w]*)", text):
        counts[op] = counts.get(op, 0) + 1
    return counts


def _ptxas() -> str:
    """The ptxas Triton itself runs for sm_90 (Triton 3.9 moved Hopper to the newer of its two)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except (ImportError, AttributeError, TypeError):
        import triton

        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_all() -> list[dict]:
    import triton

    from hizli.kernels._triton_utils import FP_FUSION
    from triton.backends.compiler import GPUTarget

    ptxas = _ptxas()
    rows = []
    for name, (kernel, args, constexprs, warps) in _cases().items():
        source = _source(kernel, args, constexprs)
        start = time.time()
        compiled = triton.compile(
            source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "enable_fp_fusion": FP_FUSION}
        )
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run(
            [ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True
        ).stderr
        os.unlink(f.name)
        sass = _sass(compiled.asm["cubin"], os.path.dirname(ptxas))
        registers = int(re.search(r"Used (\d+) registers", report).group(1))
        spills = int(re.search(r"(\d+) bytes spill stores", report).group(1))
        rows.append(
            {
                "kernel": name,
                "num_warps": warps,
                "registers": registers,
                "spill_bytes": spills,
                "shared_bytes": compiled.metadata.shared,
                "global_loads": sass,
                "compile_s": round(time.time() - start, 2),
            }
        )
    return rows


def bench_compile(json_path: str | None = None) -> int:
    """Compile every kernel, print the table, write it as JSON to ``json_path``; 2 under TRITON_INTERPRET."""
    import sys

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter cannot compile", file=sys.stderr)
        return 2
    rows = compile_all()
    print(f"{'kernel':36s} {'warps':>5s} {'regs':>5s} {'spill B':>8s} {'smem B':>7s}  global loads")
    for r in rows:
        loads = " ".join(f"{k}x{v}" for k, v in sorted(r["global_loads"].items()))
        print(
            f"{r['kernel']:36s} {r['num_warps']:5d} {r['registers']:5d} {r['spill_bytes']:8d} "
            f"{r['shared_bytes']:7d}  {loads}"
        )
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
