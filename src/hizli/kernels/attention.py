"""Variable-length causal attention over a padding-free row: sequences end to end, never mixed.

``q [T, Hq, D]``, ``k``/``v [T, Hkv, D]`` hold every token of a micro-batch back to back;
``cu_seqlens`` (int32 ``[S+1]``, 0 first, T last) marks where each sequence starts. Each token attends
causally to the earlier tokens of its own sequence only. GQA: query head ``h`` uses kv head
``h // (Hq // Hkv)``, as transformers' ``repeat_kv`` does.

No Triton kernel of ours here: the GPU candidates are other people's tuned kernels, picked by
measurement (``hizli bench kernels`` times each one at the recipe's shapes):

- ``flash_attn``: ``flash_attn.flash_attn_varlen_func``, when flash-attn is installed.
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (PyTorch >= 2.10). Its signature moved
  between releases (``is_causal`` in 2.10, ``window_size=(-1, 0)`` for causal later, ``enable_gqa``
  in 2.13), so the call is built from ``inspect.signature``. Without the GQA switch the kv heads
  still go to the flash kernel as they are (it supports GQA); they are repeated only if that
  release refuses them.
- ``flex``: ``torch.nn.attention.flex_attention`` with a document mask, compiled once. The block
  mask depends only on ``cu_seqlens``: :func:`document_block_mask` builds it once per batch and
  reuses it for every layer (and the recomputation in backward) while the same ``cu_seqlens``
  tensor object is passed.
- ``sdpa_loop``: the reference, one causal SDPA call per sequence. Mathematically SDPA over the whole
  row with a block-diagonal causal mask, without its T x T mask and score cost.

``HIZLI_KERNELS=reference`` forces ``sdpa_loop``; ``HIZLI_ATTENTION=<name>`` (or ``impl=``) picks a
candidate; otherwise CUDA tensors take the first available of flash_attn, torch_varlen, flex that
supports their dtype (until the benchmark says otherwise), and CPU tensors the reference.

FLOPs at the recipe shape (8 ShareGPT-like sequences of 1,006 to 2,048 tokens summing to 12,000;
24 query heads of 128): causal attention keeps sum(L (L + 1) / 2) = 9.4e6 query-key pairs; QK^T and
PV cost 4 * D * Hq flops a pair: 115 GFLOP forward, 2.5x that backward (5 products instead of 2),
403 GFLOP in all, 0.51 ms at 790 TFLOP/s; bytes (q, k, v, o, do, dq, dk, dv, lse once each) 0.59 GB,
0.20 ms at 3.0 TB/s. Compute-bound at these lengths.
"""

from __future__ import annotations

import inspect
import math
import os
import weakref
from functools import lru_cache
from typing import Any, Callable

import torch
import torch.nn.functional as F

from hizli.kernels.dispatch import kernels_mode

ENV = "HIZLI_ATTENTION"
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, "float | None"], torch.Tensor]

_HALF = (torch.float16, torch.bfloat16)
_ANY = (torch.float16, torch.bfloat16, torch.float32)

# ---------------------------------------------------------------------------------------------
# GPU candidates


def _flash_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float | None
) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=0.0, softmax_scale=scale, causal=True
    )


@lru_cache(maxsize=1)
def _varlen_params() -> frozenset[str]:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[T, Hkv, D] -> [T, Hkv * groups, D], each kv head repeated for its group of query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _torch_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float | None
) -> torch.Tensor:
    global _gqa_by_repeat
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_params()
    kwargs: dict[str, Any] = {}
    if "window_size" in params:
        # (left, right): unlimited history, no future = causal. A tuple, not a list: torch 2.13 tests
        # `window_size == (-1, 0)` to pick its causal kernel, and a list compares unequal.
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if scale is not None:
        if "scale" in params:
            kwargs["scale"] = scale
        else:  # fold the scale into q: softmax(s * q k^T) with the kernel's default 1/sqrt(D)
            q = q * (scale * math.sqrt(q.shape[-1]))
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        elif not _gqa_by_repeat:
            # Releases without the switch hand kv heads straight to the flash kernel, which takes any
            # Hkv dividing Hq (its backward sums the group's gradients). Repeating them instead would
            # make two [T, Hq, D] copies that the op saves for backward: 12 kB a token at the 3B
            # shape, in every recomputed layer.
            try:
                return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:
                _gqa_by_repeat = True
        k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


_gqa_by_repeat = False  # set once a release refuses kv heads fewer than query heads


_mask_cache: dict[str, Any] = {}


def document_block_mask(cu_seqlens: torch.Tensor, total: int) -> Any:
    """The flex-attention ``BlockMask`` of a causal, document-separated row, cached per batch.

    The cache holds one entry keyed by the identity (and in-place version) of ``cu_seqlens``: every
    layer of a forward, and the recomputation in backward, passes the same tensor object and reuses
    the mask; the next batch brings a new tensor and rebuilds it. Keying by identity through a weak
    reference avoids reading the boundaries back to the host (a sync) and cannot match a freed
    tensor whose memory was reused.

    Args:
        cu_seqlens: ``[S+1]`` int32 sequence boundaries on the attention's device.
        total: T, the row's token count.

    Returns:
        A ``torch.nn.attention.flex_attention.BlockMask`` for ``[1, 1, T, T]``.
    """
    entry = _mask_cache.get("last")
    if entry is not None:
        ref, version, cached_total, mask = entry
        if ref() is cu_seqlens and version == cu_seqlens._version and cached_total == total:
            return mask
    from torch.nn.attention.flex_attention import create_block_mask

    positions = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    document = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)

    def causal_document(b, h, q_idx, kv_idx):
        return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)

    # _compile=True evaluates the mask block by block instead of materialising T x T booleans.
    mask = create_block_mask(causal_document, None, None, total, total, device=cu_seqlens.device, _compile=True)
    _mask_cache["last"] = (weakref.ref(cu_seqlens), cu_seqlens._version, total, mask)
    return mask


@lru_cache(maxsize=1)
def _compiled_flex() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled flex_attention is a slow dense fallback. dynamic=True: T changes every batch and
    # one graph per length would exhaust the recompile limit.
    return torch.compile(flex_attention, dynamic=True)


def _flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float | None
) -> torch.Tensor:
    mask = document_block_mask(cu_seqlens, q.shape[0])
    heads_first = [x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)]  # [1, H, T, D] views
    out = _compiled_flex()(*heads_first, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


# ---------------------------------------------------------------------------------------------
# Reference


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(
            f"varlen_attention: q must be [T, Hq, D] and k, v [T, Hkv, D], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"varlen_attention: q {tuple(q.shape)} and k {tuple(k.shape)} need the same tokens and "
            "head dim, and a query head count divisible by the kv head count"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32:
        raise ValueError(
            f"varlen_attention: cu_seqlens must be int32 [S+1] with S >= 1, got {cu_seqlens.dtype} "
            f"{tuple(cu_seqlens.shape)}: build it with torch.tensor(..., dtype=torch.int32)"
        )


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal SDPA per sequence, in a loop (the CPU path and the ground truth).

    Reads ``cu_seqlens`` on the host (a sync on a GPU: that is one reason it is not the GPU path).

    Args:
        q: ``[T, Hq, D]``.
        k: ``[T, Hkv, D]``.
        v: ``[T, Hkv, D]``.
        cu_seqlens: ``[S+1]`` int32, ``0 = c_0 <= c_1 <= ... <= c_S = T``.
        max_seqlen: longest sequence (unused here; the fused kernels size their grids with it).
        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        ``[T, Hq, D]`` in q's dtype.
    """
    _check(q, k, v, cu_seqlens)
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[0] or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(
            f"varlen_attention: cu_seqlens must rise from 0 to T={q.shape[0]}, got {bounds[:4]}...{bounds[-2:]}"
        )
    gqa = q.shape[1] != k.shape[1]
    if gqa and q.device.type == "cpu":
        # PyTorch's CPU SDPA takes its slow math path for enable_gqa (measured 3.4x slower forward +
        # backward at 9/3 heads of 64, 300 tokens, torch 2.13); repeated kv heads take the fused one
        k, v = (_repeat_kv(x, q.shape[1] // k.shape[1]) for x in (k, v))
        gqa = False
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))  # [H, L, D]
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs, dim=0)


# ---------------------------------------------------------------------------------------------
# Candidates and public op

# name -> (module that must import, dtypes, function); in the default order of preference on CUDA
_CANDIDATES: dict[str, tuple[str | None, tuple[torch.dtype, ...], AttentionFn]] = {
    "flash_attn": ("flash_attn", _HALF, _flash_attn),
    "torch_varlen": ("torch.nn.attention.varlen", _HALF, _torch_varlen),
    "flex": ("torch.nn.attention.flex_attention", _ANY, _flex),
    "sdpa_loop": (None, _ANY, varlen_attention_reference),
}


@lru_cache(maxsize=None)
def _importable(module: str | None) -> bool:
    if module is None:
        return True
    try:
        __import__(module)
    except Exception:
        return False
    return True


def attention_candidates(
    device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> dict[str, AttentionFn]:
    """Every implementation usable here, by name, each with :func:`varlen_attention`'s signature.

    Args:
        device: where it will run; GPU candidates are listed only for CUDA (default: CUDA if present).
        dtype: keep only candidates that support this dtype.

    Returns:
        ``{name: fn(q, k, v, cu_seqlens, max_seqlen, scale)}`` in the default order of preference.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = torch.device(device).type == "cuda"
    found = {}
    for name, (module, dtypes, fn) in _CANDIDATES.items():
        if name != "sdpa_loop" and not cuda:
            continue
        if (dtype is None or dtype in dtypes) and _importable(module):
            found[name] = fn
    return found


def chosen_implementation(device: torch.device, dtype: torch.dtype, impl: str | None = None) -> str:
    """The name of the implementation :func:`varlen_attention` runs for tensors of this device and
    dtype (``impl``, else ``HIZLI_ATTENTION``, else the first candidate; the reference on a CPU)."""
    name = impl or os.environ.get(ENV, "").strip() or None
    if name is not None:
        if name not in _CANDIDATES:
            raise ValueError(
                f"varlen_attention: unknown implementation {name!r} ({ENV} or impl=): use one of "
                f"{', '.join(_CANDIDATES)}"
            )
        found = attention_candidates(device, dtype)
        if name not in found:
            raise ValueError(
                f"varlen_attention: {name!r} cannot run here on {device} {dtype} (available: "
                f"{', '.join(found)}); unset {ENV} to choose automatically"
            )
        return name
    if kernels_mode() == "reference" or torch.device(device).type != "cuda":
        return "sdpa_loop"
    return next(iter(attention_candidates(device, dtype)))


def _choose(q: torch.Tensor, impl: str | None) -> AttentionFn:
    return _CANDIDATES[chosen_implementation(q.device, q.dtype, impl)][2]


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """Causal attention within each sequence of a padding-free row (GQA allowed).

    Args:
        q: ``[T, Hq, D]`` queries of all sequences end to end.
        k: ``[T, Hkv, D]`` keys, ``Hq % Hkv == 0``.
        v: ``[T, Hkv, D]`` values.
        cu_seqlens: ``[S+1]`` int32 on q's device, ``0 = c_0 <= ... <= c_S = T``.
        max_seqlen: the longest sequence, ``max(c_{i+1} - c_i)`` (an int: no device read needed);
            0 or less computes it from ``cu_seqlens`` (one device-to-host read, a sync).
        scale: softmax scale, default ``1 / sqrt(D)``.
        impl: force a candidate by name (see :func:`attention_candidates`); default: module docstring.

    Returns:
        ``[T, Hq, D]`` in q's dtype.
    """
    _check(q, k, v, cu_seqlens)
    if max_seqlen <= 0:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    return _choose(q, impl)(q, k, v, cu_seqlens, int(max_seqlen), scale)
