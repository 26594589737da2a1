"""Compile the Triton kernels of the fast path while the model loads, not in the first training step.

On a machine that has not run hizli before, Triton compiles each kernel at its first launch, about
4 to 5 s in all on an H100, inside the first step. Here a separate process (its own interpreter, so
the main one is not slowed) runs every kernel of a training step at the model's sizes on a few
tokens, four pieces of the step in threads, while the main process imports transformers and loads
the weights; the training process then finds the compiled kernels in Triton's on-disk cache
(:mod:`hizli.kernels._precompile` starts the process and waits for it before the first launch).
A warm-up that fails or guesses a kernel's variant wrong costs only the compile it would have saved;
a GPU test checks that training compiles nothing after it.

A kernel's compiled variant depends on its argument dtypes, its compile-time constants (block sizes
from the model's sizes), and whether each int argument is divisible by 16; the ints that follow the
batch's token count are marked ``do_not_specialize`` in the kernels, so a few tokens here produce the
variants of every batch size.

``HIZLI_KERNEL_WARMUP=0`` turns it off. It runs only on CUDA with Triton kernels enabled, only for
models with a Llama-like configuration whose config.json is on disk (a folder, or a hub model in the
Hugging Face cache), and only once per process group (``LOCAL_RANK`` 0).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

import torch

from hizli.kernels._precompile import (
    ENV,
    cache_has_kernels,
    enabled,
    prime_in_background,
    start_process,
    triton_cache_dir,
    wait,
)
from hizli.kernels.lora_qkv import LoraPart

# enabled, prime_in_background and wait are the process side, here so callers need one module
__all__ = [
    "ENV",
    "KERNELS",
    "KernelShapes",
    "cache_has_kernels",
    "enabled",
    "exercise",
    "prime_in_background",
    "start",
    "triton_cache_dir",
    "wait",
]

TOKENS = 40  # any count: the token-count arguments are not specialised (see the module docstring)
# Every Triton kernel a fast-path training step launches (a test checks this against the kernel modules).
KERNELS = (
    "_rms_norm_fwd_kernel",
    "_rms_norm_bwd_kernel",
    "_rope_kernel",
    "_swiglu_fwd_kernel",
    "_swiglu_bwd_kernel",
    "_ce_chunk_kernel",
    "_nf4_dequant_kernel",
)


@dataclass(frozen=True)
class KernelShapes:
    """What the kernels' variants depend on: the model's sizes, its compute dtype, its weight format."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype: str  # "bfloat16" or "float16"
    nf4: bool  # 4-bit weights (bitsandbytes NF4, double quantisation, blocks of 64), else 16-bit

    @classmethod
    def from_config(cls, config: Any, dtype: torch.dtype, nf4: bool) -> "KernelShapes | None":
        """The shapes of a Llama-like ``config`` (None for another architecture or dtype)."""
        config = getattr(config, "text_config", None) or config
        try:
            hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
            shapes = cls(
                hidden=hidden,
                intermediate=int(config.intermediate_size),
                heads=heads,
                kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
                head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
                vocab=int(config.vocab_size),
                dtype=str(dtype).replace("torch.", ""),
                nf4=bool(nf4),
            )
        except (AttributeError, TypeError, ValueError):
            return None
        if shapes.dtype not in ("bfloat16", "float16") or shapes.head_dim % 2:
            return None
        return shapes


# ------------------------------------------------------------------------------------------------
# What the background process runs


def _nf4_base(out_features: int, in_features: int, dtype: torch.dtype, device: torch.device) -> SimpleNamespace:
    """A stand-in for a bitsandbytes ``Linear4bit`` in the recipe's format: what the fused layers read
    of it (packed bytes, a nested quant state), with zero codes (the values do not matter here)."""
    n = out_features * in_features
    n_blocks = -(-n // 64)
    state2 = SimpleNamespace(
        absmax=torch.zeros(-(-n_blocks // 256), dtype=torch.float32, device=device),
        code=torch.zeros(256, dtype=torch.float32, device=device),
        blocksize=256,
        dtype=torch.float32,
    )
    state = SimpleNamespace(
        quant_type="nf4",
        blocksize=64,
        dtype=dtype,
        shape=torch.Size((out_features, in_features)),
        absmax=torch.zeros(n_blocks, dtype=torch.uint8, device=device),
        nested=True,
        state2=state2,
        offset=torch.zeros((), dtype=torch.float32, device=device),
        code=torch.zeros(16, dtype=torch.float32, device=device),
        packing_format_for_cpu=False,
    )
    packed = torch.zeros(((n + 1) // 2, 1), dtype=torch.uint8, device=device)
    packed.quant_state = state
    return SimpleNamespace(weight=packed, in_features=in_features, out_features=out_features)


def _part(out_features: int, in_features: int, shapes: KernelShapes, device: torch.device, rank: int = 16) -> LoraPart:
    """A projection as ``hizli.models.fused_lora.lora_parts`` returns it."""
    dtype = getattr(torch, shapes.dtype)
    if shapes.nf4:
        base = _nf4_base(out_features, in_features, dtype, device)
    else:
        base = torch.nn.Linear(in_features, out_features, bias=False, dtype=dtype, device=device)
        base.weight.requires_grad_(False)
    a = (torch.randn(rank, in_features, device=device) * 0.01).requires_grad_()
    b = (torch.randn(out_features, rank, device=device) * 0.01).requires_grad_()
    return LoraPart(base, a, b, 1.0)


def _tasks(shapes: KernelShapes, device: torch.device, tokens: int) -> list:
    """Independent pieces of a training step, each running its kernels forward and backward on
    ``tokens`` tokens laid out as the patched decoder lays them out (a padding-free ``[1, T, H]`` row)."""
    from hizli.kernels.cross_entropy import _CE_BLOCK, fused_linear_cross_entropy
    from hizli.kernels.lora_mlp import lora_mlp
    from hizli.kernels.lora_qkv import lora_qkv
    from hizli.kernels.rms_norm import rms_norm
    from hizli.kernels.rope import rope

    dtype = getattr(torch, shapes.dtype)
    h, i, d = shapes.hidden, shapes.intermediate, shapes.head_dim

    def rows(width: int = h) -> torch.Tensor:
        return torch.randn(1, tokens, width, dtype=dtype, device=device, requires_grad=True)

    def norms() -> None:
        for trained in (False, True):  # LoRA keeps norms frozen; a full fine-tune trains them
            weight = torch.ones(h, dtype=dtype, device=device, requires_grad=trained)
            rms_norm(rows(), weight, 1e-5).sum().backward()

    def attention() -> None:
        qkv = [
            _part(shapes.heads * d, h, shapes, device),
            _part(shapes.kv_heads * d, h, shapes, device),
            _part(shapes.kv_heads * d, h, shapes, device),
        ]
        angle = torch.arange(tokens, device=device, dtype=torch.float32)[:, None] * torch.linspace(
            0, 1, d, device=device
        )
        cos, sin = angle.cos()[None].to(dtype), angle.sin()[None].to(dtype)
        # the fused group rotates q and k in its own buffer; rope() is the path of unfused projections
        q, k, v = (t.view(1, tokens, -1, d).transpose(1, 2) for t in lora_qkv(rows(), qkv, rope=(cos, sin)))
        q, k = rope(q, k, cos, sin)
        out = (q.transpose(1, 2).reshape(1, tokens, -1) + k.sum() + v.sum()).contiguous()  # stands in for attention
        lora_qkv(out, [_part(h, shapes.heads * d, shapes, device)])[0].sum().backward()

    def mlp() -> None:
        parts = [_part(i, h, shapes, device), _part(i, h, shapes, device), _part(h, i, shapes, device)]
        lora_mlp(rows(), parts).sum().backward()

    def loss() -> None:
        # The kernel's variant depends on the vocabulary only through its block size and whether it
        # divides by 16: a stand-in head of that kind spares the process a [V, H] weight.
        v = shapes.vocab if shapes.vocab <= 2 * _CE_BLOCK else 2 * _CE_BLOCK + (0 if shapes.vocab % 16 == 0 else 1)
        head = torch.randn(v, h, dtype=dtype, device=device) * 0.02
        targets = torch.randint(0, v, (tokens,), device=device)
        fused_linear_cross_entropy(rows().reshape(tokens, h), head, targets).backward()

    return [norms, attention, mlp, loss]


def exercise(shapes: KernelShapes, device: torch.device | str, tokens: int = TOKENS, threads: int = 1) -> None:
    """Run every Triton kernel of a fast-path training step at ``shapes``, forward and backward. With
    ``threads > 1`` the pieces run side by side: most of a compile is ptxas and the C compiler, other
    processes, so threads overlap well; CUDA only (Triton's interpreter is not thread-safe). On a CPU
    the same calls take the kernels' PyTorch references (the tests run it there)."""
    device = torch.device(device)
    tasks = _tasks(shapes, device, tokens)
    if threads <= 1 or device.type != "cuda":
        for task in tasks:
            task()
    else:
        from concurrent.futures import ThreadPoolExecutor

        _materialize_kernels()  # once, here: two threads must not swap the same module's kernels in
        with ThreadPoolExecutor(threads) as pool:
            for future in [pool.submit(task) for task in tasks]:
                future.result()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _materialize_kernels() -> None:
    import importlib

    from hizli.kernels._triton_utils import LazyJit

    for name in ("rms_norm", "rope", "swiglu", "cross_entropy", "nf4"):
        for value in list(vars(importlib.import_module(f"hizli.kernels.{name}")).values()):
            if isinstance(value, LazyJit):
                value.materialize()
    from triton.runtime import driver

    driver.active.get_current_device()  # Triton's driver module, built once before the threads start


def _main(argv: list[str]) -> int:
    shapes = KernelShapes(**json.loads(argv[0]))
    device = torch.device(argv[1] if len(argv) > 1 else "cuda")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    exercise(shapes, device, threads=4 if device.type == "cuda" else 1)
    return 0


# ------------------------------------------------------------------------------------------------
# Starting it and waiting for it (the training process)


def _room_for_it(config: Any, shapes: KernelShapes, device: str) -> bool:
    """Whether the GPU holds the model and, beside it, the background process (its CUDA context and
    a layer's worth of buffers, about 1 GiB at 8B sizes) with 2 GiB to spare."""
    config = getattr(config, "text_config", None) or config
    h, i, d = shapes.hidden, shapes.intermediate, shapes.head_dim
    layer = h * d * (2 * shapes.heads + 2 * shapes.kv_heads) + 3 * h * i
    layers = int(getattr(config, "num_hidden_layers", 32) or 32)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    model_bytes = layers * layer * (0.57 if shapes.nf4 else 2) + shapes.vocab * h * 2 * (1 if tied else 2)
    try:
        free, _total = torch.cuda.mem_get_info(torch.device(device))
    except Exception:  # noqa: BLE001 - no answer: do not risk it
        return False
    return free > model_bytes + 3 * 2**30


def start(config: Any, dtype: torch.dtype, device: str, nf4: bool) -> bool:
    """Begin compiling the kernels for ``config`` in a background process; True if it started."""
    if not enabled(device):
        return False
    shapes = KernelShapes.from_config(config, dtype, nf4)
    if (
        shapes is None
        or cache_has_kernels(KERNELS if nf4 else KERNELS[:-1])
        or not _room_for_it(config, shapes, device)
    ):
        return False
    return start_process("hizli.models.warmup", [json.dumps(asdict(shapes)), str(device)])


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
