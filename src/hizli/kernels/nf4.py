"""Dequantization of a bitsandbytes NF4 weight into bf16/fp16/fp32: one Triton kernel, and a reference.

The fused 4-bit LoRA ops (:mod:`hizli.kernels.lora_qkv`, :mod:`hizli.kernels.lora_mlp`) dequantize
every frozen NF4 weight twice a step (forward, and again in backward instead of keeping it), straight
into a slice of a stacked ``[sum(out_features), in_features]`` buffer. This op does that in one
launch, writing into the caller's buffer.

The format, as bitsandbytes stores it (``bnb.nn.Params4bit`` data plus its ``QuantState``), read
from its Python and checked here bit for bit against ``bitsandbytes.functional.dequantize_4bit``:

- The weight is quantized as one flat row-major sequence of ``n = prod(quant_state.shape)``
  values, cut into blocks of ``quant_state.blocksize`` (64 by default) *of that flat sequence*:
  with an ``in_features`` that is not a multiple of the block size, blocks straddle rows. The last
  block may be partial.
- ``packed`` holds ``ceil(n / 2)`` bytes (stored ``[ceil(n / 2), 1]``, or viewed through another
  ``quant_storage`` dtype); element ``2i`` is the *high* nibble of byte ``i``, element ``2i + 1``
  the low one. With ``n`` odd the last low nibble is padding.
- A 4-bit code ``c`` stands for ``NF4_CODE[c] * absmax[block]``: the 16 NormalFloat levels of the
  QLoRA paper (quantiles of N(0, 1) scaled to [-1, 1], with an exact zero), times the block's
  absolute maximum. bitsandbytes' dequantization kernels use a built-in copy of the table, not
  ``quant_state.code`` (it holds the same 16 values), and so does this module.
- The product is computed in fp32 and rounded once (to nearest even) to the output dtype.
- Double quantization (``quant_state.nested``): ``absmax`` is uint8, one code per block, itself
  blockwise-quantized with an 8-bit code: ``absmax[b] = state2.code[q[b]] * state2.absmax[b //
  state2.blocksize] + quant_state.offset``, a product rounded to fp32 and *then* the fp32 sum
  (bitsandbytes runs them as two steps). The kernel is compiled without fp fusion so that the GPU
  does not contract them into one fma, which would round once and differ in the last bit.

Bytes at a Llama-3.2-3B MLP weight ([8192, 3072], bf16 out, nested absmax): 12.6 MB packed,
0.4 MB of absmax codes, 50.3 MB written; 63.3 MB, 21 us at 3.0 TB/s. A lookup and a multiply per
element: bandwidth-bound.

Kernel design: each program takes ``_TILE_BYTES`` (2,048) consecutive packed bytes, as a ``[BLOCKS,
blocksize / 2]`` tile of whole quantization blocks (64 blocks of 64 values by default), so that each
block's scale is one load (and, nested, one 8-bit decode) broadcast along its row. The bytes are
contiguous along the tile's rows so that each of the 128 threads can take 16 of them in one vector
load (sizes the kernel passes as arguments, ``n`` and ``n_bytes``, keep their divisibility by 16
visible to the compiler for the masks), and ``tl.interleave`` puts the two nibbles of each byte back
side by side: 32 contiguous outputs a thread, 64 bytes of bf16. The NF4 level is a gather from a
16-entry fp32 table (L1-resident); profiled in training at the 3B shape on an H200, a launch
averages 12.3 us over the seven projection weights. bitsandbytes' Python and its CUDA dequantizer
were read for the layout; this code is written from the format above.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from math import prod

import torch

from hizli.kernels._triton_utils import lazy_jit, tl
from hizli.kernels._weak import IdWeakMap
from hizli.kernels.dispatch import interpreting, use_triton
from hizli.kernels.launch import BoundLaunch

# The 16 NormalFloat-4 levels (QLoRA, Dettmers et al. 2023, appendix E), as float32. Code 7 is an
# exact zero; the codes are in increasing order.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# Block sizes bitsandbytes quantizes with (quantize_4bit rejects others). The kernel needs a power
# of two (a Triton tile dimension of blocksize / 2); the reference keeps the same set so that both
# paths accept the same states.
SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Packed bytes per program: a 16-byte load for each of 128 threads (4 warps), 4,096 outputs. A
# [3072, 3072] weight is 2,304 programs, about 17 per multiprocessor of an H100: enough warps in
# flight to cover memory latency, small enough tiles that the tail wave is short.
_TILE_BYTES = 2048
_WARPS = 4

# ---------------------------------------------------------------------------------------------
# Triton kernel


@lazy_jit(do_not_specialize=("block0",))
def _nf4_dequant_kernel(
    packed_ptr,
    absmax_ptr,
    code_ptr,
    absmax2_ptr,
    code2_ptr,
    offset_ptr,
    out_ptr,
    n,
    n_bytes,
    n_blocks,
    blocksize2,
    block0,
    HALF: tl.constexpr,
    BLOCKS: tl.constexpr,
    NESTED: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
):
    # One row of the tile per quantization block: HALF = blocksize / 2 bytes each.
    block = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    block_ok = block < n_blocks
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=block_ok, other=0).to(tl.int32)
        # block0: where a row range starts in the whole weight's blocks (the nested scales index those)
        owner = (block + block0) // blocksize2
        scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + owner, mask=block_ok, other=0.0)
        scale = scale + tl.load(offset_ptr)  # a separate rounding: the launch disables fp fusion
    else:
        scale = tl.load(absmax_ptr + block, mask=block_ok, other=0.0)
    scale = scale[:, None]

    byte = block[:, None] * HALF + tl.arange(0, HALF)[None, :]
    packed = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0).to(tl.int32)
    hi = tl.load(code_ptr + (packed >> 4)) * scale
    lo = tl.load(code_ptr + (packed & 0xF)) * scale
    values = tl.interleave(hi, lo)  # [BLOCKS, 2 * HALF]: element 2i from the high nibble of byte i

    if BF16_BY_BITS:
        # Round to nearest even on the bits. Only for Triton's interpreter, whose fp32 -> bf16
        # conversion (3.6) rounds half away from zero and drops the carry into the exponent; compiled
        # kernels convert with the hardware's round-to-nearest-even instead (cvt.rn.bf16.f32).
        bits = values.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = tl.where(values != values, 0x7FC00000, bits)  # a NaN stays a (quiet) NaN
        result = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        result = values.to(out_ptr.dtype.element_ty)
    element = block[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
    tl.store(out_ptr + element, result, mask=element < n)


# ---------------------------------------------------------------------------------------------
# Reading and checking the arguments


@dataclass
class _Spec:
    packed: torch.Tensor  # flat uint8, at least n_bytes long
    shape: tuple[int, ...]
    n: int
    n_bytes: int
    blocksize: int
    n_blocks: int
    dtype: torch.dtype
    absmax: torch.Tensor  # float32 [n_blocks], or uint8 codes when nested
    nested: bool
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    blocksize2: int = 0
    offset: torch.Tensor | None = None
    block0: int = 0  # first block of a row range (``rows=``) in the whole weight
    row_specs: dict = field(default_factory=dict)  # (start, stop) -> its _Spec, made once
    launches: dict = field(default_factory=dict)  # under the interpreter or not -> its BoundLaunch


def _resolve(packed, quant_state, dtype: torch.dtype | None) -> _Spec:
    if quant_state is None:
        quant_state = getattr(packed, "quant_state", None)
        if quant_state is None:
            raise ValueError(
                "dequantize_nf4 needs a quant_state: pass it, or pass the Params4bit weight that carries one"
            )
    if isinstance(packed, torch.nn.Parameter):
        packed = packed.data
    if quant_state.quant_type != "nf4":
        raise ValueError(
            f"dequantize_nf4: quant_state.quant_type={quant_state.quant_type!r} is not supported "
            "(only 'nf4'; use bitsandbytes.functional.dequantize_4bit for fp4)"
        )
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError(
            "dequantize_nf4: quant_state.packing_format_for_cpu=True is bitsandbytes' repacked "
            "CPU layout, not the packed NF4 format this op reads"
        )
    blocksize = int(quant_state.blocksize)
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(
            f"dequantize_nf4: quant_state.blocksize={blocksize} is not supported: use one of "
            f"{SUPPORTED_BLOCKSIZES} (bitsandbytes' block sizes)"
        )
    if dtype is None:
        dtype = quant_state.dtype
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dequantize_nf4: dtype={dtype} is not supported: use bfloat16, float16 or float32")

    shape = tuple(int(s) for s in quant_state.shape)
    n = prod(shape)
    n_bytes = (n + 1) // 2
    n_blocks = -(-n // blocksize)
    device = packed.device
    if not packed.is_contiguous():
        raise ValueError(
            f"dequantize_nf4: packed {tuple(packed.shape)} with strides {packed.stride()} is not contiguous"
        )
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:  # a Params4bit with another quant_storage dtype: the same bytes
        flat = flat.view(torch.uint8)
    if flat.numel() < n_bytes:
        raise ValueError(
            f"dequantize_nf4: packed has {flat.numel()} bytes, quant_state.shape={shape} needs "
            f"{n_bytes} (two 4-bit codes a byte)"
        )

    absmax = quant_state.absmax
    spec = _Spec(flat, shape, n, n_bytes, blocksize, n_blocks, dtype, absmax, bool(quant_state.nested))
    tensors = {"absmax": absmax}
    if spec.nested:
        state2 = quant_state.state2
        if absmax.dtype != torch.uint8:
            raise ValueError(f"dequantize_nf4: a nested quant_state needs uint8 absmax codes, got {absmax.dtype}")
        if state2.dtype not in (None, torch.float32) or state2.code.numel() != 256:
            raise ValueError(
                f"dequantize_nf4: nested absmax must be dequantized to float32 with a 256-entry "
                f"code, got state2.dtype={state2.dtype}, {state2.code.numel()} codes"
            )
        spec.blocksize2 = int(state2.blocksize)
        spec.absmax2 = state2.absmax.float().contiguous()
        spec.code2 = state2.code.float().contiguous()
        offset = quant_state.offset
        spec.offset = torch.as_tensor(offset, dtype=torch.float32, device=device).reshape(1)
        if spec.blocksize2 <= 0 or spec.absmax2.numel() < -(-n_blocks // spec.blocksize2):
            raise ValueError(
                f"dequantize_nf4: state2.absmax has {spec.absmax2.numel()} entries for "
                f"{n_blocks} blocks at state2.blocksize={spec.blocksize2}"
            )
        tensors.update({"state2.absmax": spec.absmax2, "state2.code": spec.code2, "offset": spec.offset})
    else:
        spec.absmax = absmax.float()
    spec.absmax = spec.absmax.reshape(-1).contiguous()
    if spec.absmax.numel() < n_blocks:
        raise ValueError(
            f"dequantize_nf4: quant_state.absmax has {spec.absmax.numel()} entries, "
            f"quant_state.shape={shape} at blocksize {blocksize} needs {n_blocks}"
        )
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"dequantize_nf4: packed is on {device} but quant_state {name} is on {t.device}")
    return spec


# Checked specs per bitsandbytes quant state (held weakly: an entry goes with its state, and nothing
# is written on bitsandbytes' objects): state -> {(data address, device, dtype): _Spec}.
_SPECS = IdWeakMap()


def _specs_of(state) -> dict | None:
    """The state's cache of checked specs (made empty at first), or None for a state without weak
    references (checked at every call)."""
    cache = _SPECS.get(state)
    if cache is None:
        cache = {}
        try:
            _SPECS[state] = cache
        except TypeError:
            return None
    return cache


def _resolve_cached(
    packed, quant_state, out: torch.Tensor | None, dtype: torch.dtype | None, rows: tuple[int, int] | None = None
) -> _Spec:
    """``_resolve``, checked once per weight and dtype: the result is kept per quant_state.

    A training step dequantizes every weight several times (forward, recompute, backward) per
    micro-batch, and checking the state costs more host time than launching the kernel. The cache
    is keyed by the packed data's address and the dtype, so a weight moved or re-quantized (new
    storage) is checked again; only ``out`` is checked on every call.
    """
    state = quant_state if quant_state is not None else getattr(packed, "quant_state", None)
    data = packed.data if isinstance(packed, torch.nn.Parameter) else packed
    want = dtype if dtype is not None else (out.dtype if out is not None else getattr(state, "dtype", None))
    cache = _specs_of(state) if state is not None else None
    key = (data.data_ptr(), data.device, want)
    spec = cache.get(key) if cache is not None else None
    if spec is None:
        spec = _resolve(packed, quant_state, want)
        if cache is not None:
            cache[(data.data_ptr(), data.device, spec.dtype)] = spec
    if rows is not None:
        spec = _row_range(spec, rows)
    if out is not None:  # the one check every call makes: the buffer differs from call to call
        if out.shape != spec.shape or out.dtype != spec.dtype or out.device != spec.packed.device:
            raise ValueError(
                f"dequantize_nf4: out is {tuple(out.shape)} {out.dtype} on {out.device}, expected "
                f"{spec.shape} {spec.dtype} on {spec.packed.device}"
            )
        if not out.is_contiguous():
            raise ValueError(f"dequantize_nf4: out {tuple(out.shape)} with strides {out.stride()} is not contiguous")
    return spec


def _row_range(spec: _Spec, rows: tuple[int, int]) -> _Spec:
    """The spec of rows ``[start, stop)`` of a 2-D weight: a view of its bytes and block scales.

    A range must start and end on a block boundary of the flat sequence (true of every row when
    ``in_features`` is a multiple of the block size, as in the models hizli trains)."""
    kept = spec.row_specs.get(rows)
    if kept is not None:
        return kept
    start, stop = (int(r) for r in rows)
    if len(spec.shape) != 2 or not 0 <= start < stop <= spec.shape[0]:
        raise ValueError(f"dequantize_nf4: rows={rows} is not a non-empty row range of a weight of shape {spec.shape}")
    cols = spec.shape[1]
    first, end = start * cols, stop * cols
    if first % spec.blocksize or (end % spec.blocksize and end != spec.n):
        raise ValueError(
            f"dequantize_nf4: rows={rows} of a [{spec.shape[0]}, {cols}] weight do not start and end on a "
            f"boundary of its {spec.blocksize}-value quantization blocks"
        )
    block0, n = first // spec.blocksize, end - first
    sub = replace(
        spec,
        packed=spec.packed[first // 2 :],
        shape=(stop - start, cols),
        n=n,
        n_bytes=(n + 1) // 2,
        n_blocks=-(-n // spec.blocksize),
        absmax=spec.absmax[block0:],
        block0=spec.block0 + block0,
        row_specs={},
        launches={},
    )
    spec.row_specs[(start, stop)] = sub
    return sub


_code_cache: dict[torch.device, torch.Tensor] = {}


def _nf4_code(device: torch.device) -> torch.Tensor:
    """``NF4_CODE`` as a float32 tensor on ``device``, made once (no host copy per call)."""
    code = _code_cache.get(device)
    if code is None:
        code = _code_cache[device] = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return code


# ---------------------------------------------------------------------------------------------
# Launcher, reference, public op


def _dequantize_triton(spec: _Spec, out: torch.Tensor) -> torch.Tensor:
    if spec.n == 0:
        return out
    interpreted = interpreting()
    bound = spec.launches.get(interpreted)
    if bound is None:
        bound = spec.launches[interpreted] = _bind(spec, interpreted)
    bound(out)
    return out


def _bind(spec: _Spec, interpreted: bool) -> BoundLaunch:
    """The weight's launch with every argument fixed but ``out`` (``hizli.kernels.launch``)."""
    half = spec.blocksize // 2
    blocks = max(1, _TILE_BYTES // half)
    grid = (-(-spec.n_blocks // blocks),)
    dummy = spec.absmax  # placeholders for the nested-only pointers (never read when not nested)
    args = (
        spec.packed,
        spec.absmax,
        _nf4_code(spec.packed.device),
        spec.absmax2 if spec.nested else dummy,
        spec.code2 if spec.nested else dummy,
        spec.offset if spec.nested else dummy,
        None,  # out, given at each call
        spec.n,
        spec.n_bytes,
        spec.n_blocks,
        spec.blocksize2 if spec.nested else 1,
        spec.block0,
    )
    meta = dict(
        HALF=half,
        BLOCKS=blocks,
        NESTED=spec.nested,
        BF16_BY_BITS=spec.dtype == torch.bfloat16 and interpreted,
        num_warps=_WARPS,
        enable_fp_fusion=False,
    )
    return BoundLaunch(_nf4_dequant_kernel, grid, args, meta, open_at=6)


def _block_scales(spec: _Spec) -> torch.Tensor:
    """The fp32 scale of each quantization block, ``[n_blocks]`` (decoding the nested absmax)."""
    if not spec.nested:
        return spec.absmax[: spec.n_blocks]
    q = spec.absmax[: spec.n_blocks].long()
    owner = (torch.arange(spec.n_blocks, device=q.device) + spec.block0) // spec.blocksize2
    # Two fp32 roundings, as bitsandbytes: the product, then the sum (eager torch does not fuse them).
    return spec.code2[q] * spec.absmax2[owner] + spec.offset


def _dequantize_reference(spec: _Spec) -> torch.Tensor:
    data = spec.packed[: spec.n_bytes]
    codes = torch.stack((data >> 4, data & 0x0F), dim=1).reshape(-1)[: spec.n]  # high nibble first
    levels = _nf4_code(data.device)[codes.long()]
    padded = torch.nn.functional.pad(levels, (0, spec.n_blocks * spec.blocksize - spec.n))
    values = padded.view(spec.n_blocks, spec.blocksize) * _block_scales(spec)[:, None]  # fp32
    return values.reshape(-1)[: spec.n].to(spec.dtype).view(spec.shape)


def dequantize_nf4_reference(
    packed: torch.Tensor,
    quant_state=None,
    out: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Pure-PyTorch statement of bitsandbytes' NF4 format (see the module docstring); no bitsandbytes call.

    Same arguments and result as :func:`dequantize_nf4`.
    """
    spec = _resolve_cached(packed, quant_state, out, dtype, rows)
    return _into(_dequantize_reference(spec), out)


def _into(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return result
    out.copy_(result)
    return out


def dequantize_nf4(
    packed: torch.Tensor,
    quant_state=None,
    out: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """A bitsandbytes NF4 weight as ``quant_state.shape`` (``[out_features, in_features]``) in ``dtype``.

    Bit-identical to ``bitsandbytes.functional.dequantize_4bit(packed, quant_state)`` (fp32 product
    rounded once to ``dtype``), with or without double quantization. One Triton launch on CUDA
    (:func:`hizli.kernels.dispatch.use_triton`), the reference elsewhere. Unlike ``dequantize_4bit``,
    a ``packed`` of shape ``[1, k]`` does not transpose the result (bitsandbytes' shim for an old
    transposed layout): the result always has ``quant_state.shape``.

    Args:
        packed: the packed weight: a ``bnb.nn.Params4bit`` (``module.weight`` of a
            ``bnb.nn.Linear4bit``) or its data, any contiguous tensor holding the bytes (usually
            ``[ceil(n / 2), 1]`` uint8).
        quant_state: its ``bitsandbytes.functional.QuantState``; read from ``packed.quant_state``
            when None.
        out: a contiguous tensor of ``quant_state.shape`` on ``packed``'s device to write into (for
            instance a row slice of a stacked weight buffer); returned.
        dtype: bfloat16, float16 or float32; defaults to ``out.dtype`` when ``out`` is given, else to
            ``quant_state.dtype``.
        rows: ``(start, stop)``: only those rows of a 2-D weight (``out`` then has ``stop - start``
            rows); the range must start and end on a quantization-block boundary.

    Returns:
        The dequantized weight or its rows (``out`` when given).

    Raises:
        ValueError: a quant_type other than nf4, a block size outside 32..4096 (powers of two),
            bitsandbytes' CPU-repacked layout, too few bytes or scales for the shape, tensors on
            different devices, a row range off the block boundaries, or an ``out`` of the wrong
            shape, dtype, device or layout.
    """
    spec = _resolve_cached(packed, quant_state, out, dtype, rows)
    tensors = (spec.packed,) if out is None else (spec.packed, out)
    if use_triton("nf4_dequant", *tensors):
        if out is None:
            out = torch.empty(spec.shape, dtype=spec.dtype, device=spec.packed.device)
        return _dequantize_triton(spec, out)
    return _into(_dequantize_reference(spec), out)
