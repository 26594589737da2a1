"""``hizli bench kernels``: hizli's kernels at the recipe's shapes, Triton vs reference vs (attention)
every candidate; ``--counts`` prints only the cost model, ``--compile`` the sm_90 register report.

Recipe shapes: N = 12,000 tokens a step (one padding-free row), hidden 3,072, intermediate 8,192,
24 query / 8 kv heads of 128, vocab 128,256, bf16; attention over 8 ShareGPT-like sequences that
sum to 12,000 tokens. Each op is timed forward and forward + backward with
``triton.testing.do_bench`` (CUDA events, L2 flushed between runs, median after warm-up) and set
against its floor: max(FLOPs / peak rate, bytes / peak bandwidth), with the bytes each input read
once and each output written once. The default peaks are an H100's measured figures (3.0 TB/s
device copy, 790 TFLOP/s bf16 dense); pass the GPU's own. ``HIZLI_BENCH_DEVICE=cpu`` builds the
workloads on the CPU, only to smoke-test the plumbing. Triton compiles each kernel once (~1 s each);
flex attention compiles its forward and backward (tens of seconds; skip it with ``--skip flex``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable


HIDDEN, INTER, HQ, HKV, HEAD_DIM, VOCAB = 3072, 8192, 24, 8, 128, 128_256
BF16 = 2
# Token counts of 8 ShareGPT conversations rendered with the Llama-3.1 template, capped at 2,048 and
# scaled to sum to 12,000 (a typical optimizer step of the recipe: 2 x 4 rows).
SEQ_LENGTHS = [2048, 1793, 1544, 1402, 1311, 1608, 1288, 1006]
# One layer's projections [out, in]: q, k, v, o, gate, up, down.
NF4_SHAPES = [
    (HQ * HEAD_DIM, HIDDEN),
    (HKV * HEAD_DIM, HIDDEN),
    (HKV * HEAD_DIM, HIDDEN),
    (HIDDEN, HQ * HEAD_DIM),
    (INTER, HIDDEN),
    (INTER, HIDDEN),
    (HIDDEN, INTER),
]
NF4_VALUES = sum(o * i for o, i in NF4_SHAPES)


@dataclass
class Op:
    """One op's cost model at the benchmark shape (bytes: each input read once, each output written once)."""

    name: str
    fwd_flops: float
    fwd_bytes: float
    bwd_flops: float
    bwd_bytes: float
    note: str = ""
    impls: dict[str, Callable[[], Callable[[], None]]] = field(default_factory=dict)


def _attention_pairs(lengths: list[int]) -> int:
    """Query-key pairs a causal mask keeps: L(L+1)/2 per sequence."""
    return sum(n * (n + 1) // 2 for n in lengths)


def cost_model(n: int, lengths: list[int]) -> dict[str, Op]:
    """FLOPs and bytes of each op for n tokens (no GPU needed)."""
    row, inter = n * HIDDEN * BF16, n * INTER * BF16
    q_bytes, kv_bytes = n * HQ * HEAD_DIM * BF16, n * HKV * HEAD_DIM * BF16
    cos_bytes = 2 * n * HEAD_DIM * BF16
    pairs = _attention_pairs(lengths)
    attn_fwd = 4.0 * HEAD_DIM * HQ * pairs  # QK^T and PV, 2 flops a multiply-add
    lse = n * HQ * 4
    logits = 2.0 * n * VOCAB * HIDDEN
    return {
        "rms_norm": Op(
            "rms_norm",
            4.0 * n * HIDDEN,
            2 * row + n * 4,
            8.0 * n * HIDDEN,
            3 * row + n * 4,
            "x [N, 3072]; frozen weight (LoRA)",
        ),
        "rope": Op(
            "rope",
            3.0 * n * (HQ + HKV) * HEAD_DIM,
            2 * (q_bytes + kv_bytes) + cos_bytes,
            3.0 * n * (HQ + HKV) * HEAD_DIM,
            2 * (q_bytes + kv_bytes) + cos_bytes,
            "q [1, 24, N, 128], k [1, 8, N, 128], positions restart per sequence",
        ),
        "swiglu": Op("swiglu", 5.0 * n * INTER, 3 * inter, 12.0 * n * INTER, 5 * inter, "gate, up [N, 8192]"),
        "cross_entropy": Op(
            "cross_entropy",
            2 * logits + 10.0 * n * VOCAB,
            2 * row + VOCAB * HIDDEN * BF16,
            0.0,
            2 * row,
            "hidden [N, 3072] -> V = 128,256, frozen head; every row trained. "
            "The fused forward also computes the hidden gradient (both products), the backward only scales it; "
            "the flops are counted in the forward",
        ),
        "attention": Op(
            "attention",
            attn_fwd,
            q_bytes * 2 + kv_bytes * 2 + lse,
            2.5 * attn_fwd,
            q_bytes * 4 + kv_bytes * 4 + lse,
            f"causal, GQA 24/8, sequences {lengths}",
        ),
        # Independent of N: packed bytes, one absmax code a block of 64, the bf16 output; no backward.
        "nf4_dequant": Op(
            "nf4_dequant",
            2.0 * NF4_VALUES,
            NF4_VALUES * (0.5 + 1 / 64 + BF16),
            0.0,
            0.0,
            "the 7 NF4 projection weights of one layer (nested absmax) into bf16; no backward",
        ),
    }


# ---------------------------------------------------------------------------------------------
# Workloads (GPU)


def _with_mode(mode: str, fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        os.environ["HIZLI_KERNELS"] = mode
        fn()

    return run


def build(ops: dict[str, Op], n: int, lengths: list[int], skip: set[str]) -> None:
    import bitsandbytes.functional as bnbf
    import torch

    from hizli.kernels.attention import attention_candidates
    from hizli.kernels.cross_entropy import fused_linear_cross_entropy
    from hizli.kernels.nf4 import dequantize_nf4
    from hizli.kernels.rms_norm import rms_norm
    from hizli.kernels.rope import rope
    from hizli.kernels.swiglu import swiglu

    dev, dt = os.environ.get("HIZLI_BENCH_DEVICE", "cuda"), torch.bfloat16
    torch.manual_seed(0)

    def rnd(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, device=dev) * scale).to(dt).requires_grad_(grad)

    # rms_norm
    x, w = rnd(n, HIDDEN, grad=True), rnd(HIDDEN, scale=0.1) + 1
    dy = rnd(n, HIDDEN)
    for mode in ("triton", "reference"):
        ops["rms_norm"].impls[mode] = lambda: (lambda: rms_norm(x, w, 1e-5), dy, [x])

    # rope: q, k as transformers lays them out ([B, H, T, D] views of [B, T, H, D])
    q = rnd(1, n, HQ, HEAD_DIM).transpose(1, 2).requires_grad_()
    k = rnd(1, n, HKV, HEAD_DIM).transpose(1, 2).requires_grad_()
    positions = torch.cat([torch.arange(m, device=dev) for m in lengths])[None].float()
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, device=dev).float() / HEAD_DIM))
    angles = positions[..., None] * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(dt), emb.sin().to(dt)
    gq, gk = rnd(1, HQ, n, HEAD_DIM), rnd(1, HKV, n, HEAD_DIM)

    for mode in ("triton", "reference"):
        ops["rope"].impls[mode] = lambda: (lambda: rope(q, k, cos, sin), (gq, gk), [q, k])

    # swiglu
    g, u = rnd(n, INTER, scale=2.0, grad=True), rnd(n, INTER, grad=True)
    dy_i = rnd(n, INTER)
    for mode in ("triton", "reference"):
        ops["swiglu"].impls[mode] = lambda: (lambda: swiglu(g, u), dy_i, [g, u])

    # cross-entropy: fused (Triton row pass), fused (torch row pass), and the unfused full-logits way
    hidden = rnd(n, HIDDEN, grad=True)
    head = rnd(VOCAB, HIDDEN, scale=0.02)
    targets = torch.randint(0, VOCAB, (n,), device=dev)
    one = torch.ones((), device=dev)

    def full_logits():
        logits = (hidden @ head.t()).float()
        return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")

    ops["cross_entropy"].impls["triton"] = lambda: (
        lambda: fused_linear_cross_entropy(hidden, head, targets),
        one,
        [hidden],
    )
    ops["cross_entropy"].impls["reference"] = ops["cross_entropy"].impls["triton"]
    ops["cross_entropy"].impls["full_logits"] = lambda: (full_logits, one, [hidden])

    # nf4_dequant: each weight into its row slice of one buffer (as the fused LoRA layers do), and
    # bitsandbytes' own dequantize_4bit (a new tensor per weight) for comparison
    quantized = [
        bnbf.quantize_4bit(rnd(*shape, scale=0.02), compress_statistics=True, quant_type="nf4") for shape in NF4_SHAPES
    ]
    weights = torch.empty(sum(o * i for o, i in NF4_SHAPES), dtype=dt, device=dev)

    def dequant_all():
        start = 0
        for (rows, cols), (packed, state) in zip(NF4_SHAPES, quantized):
            dequantize_nf4(packed, state, out=weights[start : start + rows * cols].view(rows, cols))
            start += rows * cols

    for mode in ("triton", "reference"):
        ops["nf4_dequant"].impls[mode] = lambda: (dequant_all, None, [])
    ops["nf4_dequant"].impls["bitsandbytes"] = lambda: (
        lambda: [bnbf.dequantize_4bit(packed, state) for packed, state in quantized],
        None,
        [],
    )

    # attention: every candidate
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=dev)
    qa = rnd(n, HQ, HEAD_DIM, grad=True)
    ka, va = rnd(n, HKV, HEAD_DIM, grad=True), rnd(n, HKV, HEAD_DIM, grad=True)
    do = rnd(n, HQ, HEAD_DIM)
    for name, fn in attention_candidates(dev, dt).items():
        if name not in skip:
            ops["attention"].impls[name] = lambda fn=fn: (
                lambda: fn(qa, ka, va, cu, max(lengths), None),
                do,
                [qa, ka, va],
            )


def time_impl(op: str, impl: str, make: Callable, quick: bool) -> dict:
    import torch
    import triton.testing

    call, grad, leaves = make()
    mode = "reference" if impl in ("reference", "full_logits") else "triton"
    if op == "attention":
        mode = "auto"
    fwd = _with_mode(mode, lambda: call())

    def fwd_bwd() -> None:
        os.environ["HIZLI_KERNELS"] = mode
        out = call()
        if grad is None:  # an op without a backward (nf4_dequant)
            return
        if isinstance(out, tuple):
            torch.autograd.backward(out, grad)
        else:
            out.backward(grad)

    torch.cuda.synchronize()
    start = time.perf_counter()
    fwd_bwd()  # compile and warm (Triton jit, torch.compile for flex)
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    warm, rep = (5, 20) if quick else (25, 100)
    with torch.no_grad():
        t_fwd = triton.testing.do_bench(fwd, warmup=warm, rep=rep, return_mode="median")
    t_all = triton.testing.do_bench(fwd_bwd, warmup=warm, rep=rep, grad_to_none=leaves, return_mode="median")
    return {"fwd_ms": t_fwd, "fwd_bwd_ms": t_all, "first_call_s": first, "peak_extra_gib": peak}


@dataclass
class KernelsBench:
    """What ``hizli bench kernels`` times."""

    tokens: int = 12_000
    bandwidth: float = 3.0e12  # peak bytes/s
    flops: float = 790e12  # peak bf16 FLOP/s
    skip: tuple[str, ...] = ()
    quick: bool = False
    counts_only: bool = False


def sequence_lengths(tokens: int) -> list[int]:
    """The recipe's 8 sequence lengths scaled to sum to ``tokens``."""
    scale = tokens / sum(SEQ_LENGTHS)
    lengths = [max(1, round(m * scale)) for m in SEQ_LENGTHS]
    lengths[0] += tokens - sum(lengths)
    return lengths


def bench_kernels(bench: KernelsBench, results_dir: str | None = None) -> int:
    """Print the cost model, then (on a GPU) time every implementation; one record per (op, impl)."""
    import shlex
    import sys

    import torch

    n, lengths = bench.tokens, sequence_lengths(bench.tokens)
    ops = cost_model(n, lengths)
    print(
        f"N = {n} tokens; sequences {lengths}; floors at {bench.bandwidth / 1e12:.1f} TB/s, "
        f"{bench.flops / 1e12:.0f} TFLOP/s"
    )
    print(
        f"{'op':14s} {'fwd GFLOP':>10s} {'fwd MB':>9s} {'f+b GFLOP':>10s} {'f+b MB':>9s} {'floor f+b ms':>12s}  bound"
    )
    for op in ops.values():
        flops, nbytes = op.fwd_flops + op.bwd_flops, op.fwd_bytes + op.bwd_bytes
        floor = max(flops / bench.flops, nbytes / bench.bandwidth) * 1e3
        bound = "compute" if flops / bench.flops > nbytes / bench.bandwidth else "memory"
        print(
            f"{op.name:14s} {op.fwd_flops / 1e9:10.2f} {op.fwd_bytes / 1e6:9.1f} {flops / 1e9:10.2f} "
            f"{nbytes / 1e6:9.1f} {floor:12.3f}  {bound}"
        )
    if bench.counts_only:
        return 0
    if not torch.cuda.is_available():
        print("no CUDA GPU: use --counts for the cost model only", file=sys.stderr)
        return 2
    from hizli.bench import results

    skip = set(bench.skip)
    build(ops, n, lengths, skip)
    rows = []
    print(
        f"\n{'op':14s} {'impl':13s} {'fwd ms':>8s} {'f+b ms':>8s} {'floor ms':>9s} {'roofline':>9s} "
        f"{'TFLOP/s':>8s} {'GB/s':>7s} {'1st call s':>10s} {'+mem GiB':>9s}"
    )
    for op in ops.values():
        if op.name in skip:
            continue
        flops, nbytes = op.fwd_flops + op.bwd_flops, op.fwd_bytes + op.bwd_bytes
        floor = max(flops / bench.flops, nbytes / bench.bandwidth) * 1e3
        for impl, make in op.impls.items():
            try:
                r = time_impl(op.name, impl, make, bench.quick)
            except Exception as exc:  # one failing candidate must not hide the others' numbers
                print(f"{op.name:14s} {impl:13s} FAILED: {type(exc).__name__}: {str(exc)[:200]}")
                rows.append({"op": op.name, "impl": impl, "error": f"{type(exc).__name__}: {exc}"[:2000]})
                continue
            ms = r["fwd_bwd_ms"]
            rows.append(
                {
                    "op": op.name,
                    "impl": impl,
                    **r,
                    "flops": flops,
                    "bytes": nbytes,
                    "floor_ms": floor,
                    "roofline_fraction": floor / ms,
                    "tflops": flops / ms / 1e9,
                    "gbps": nbytes / ms / 1e6,
                }
            )
            print(
                f"{op.name:14s} {impl:13s} {r['fwd_ms']:8.3f} {ms:8.3f} {floor:9.3f} {floor / ms:9.1%} "
                f"{flops / ms / 1e9:8.1f} {nbytes / ms / 1e6:7.0f} {r['first_call_s']:10.2f} {r['peak_extra_gib']:9.2f}"
            )
    os.environ.pop("HIZLI_KERNELS", None)
    if results_dir and rows:
        command = " ".join(shlex.quote(a) for a in ["hizli", *sys.argv[1:]])
        device, call, records = results.device_info(), None, []
        for row in rows:
            settings = {
                "op": row["op"],
                "impl": row["impl"],
                "tokens": n,
                "sequences": lengths,
                "peak_bandwidth": bench.bandwidth,
                "peak_flops": bench.flops,
                "note": ops[row["op"]].note,
            }
            metrics = {k: v for k, v in row.items() if k not in ("op", "impl")}
            record = results.make_record(
                "kernels", "hizli", settings, metrics, command=command, call=call, device=device
            )
            call = call or record["call"]
            records.append(record)
        print(f"records appended to {results.append(results_dir, records)}")
    return 0
