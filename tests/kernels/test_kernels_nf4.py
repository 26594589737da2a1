"""NF4 dequantization, bit for bit: the reference against bitsandbytes on CPU, the Triton kernel against
the reference (interpreter and GPU) and against bitsandbytes' CUDA kernel (GPU).

Every comparison is ``torch.equal``: both sides compute ``NF4_CODE[c] * absmax`` in fp32 and round
once to the output dtype, so there is no tolerance to choose.

bitsandbytes 0.50.2's CPU kernel (the AVX-512 path, taken when ``in_features`` is a multiple of 16
and the block size is below 2,048) finds a block's scale from the row and column, which is wrong
when ``in_features`` is not a multiple of the block size (blocks then straddle rows: [4, 64] at
block size 128 takes the first block's scale for rows 2 and 3). Its CUDA kernel and its pure-PyTorch
backend index the flat sequence, as the format is written. The CPU comparisons through the public
``dequantize_4bit`` therefore use shapes that avoid that path; the straddling shapes are compared
with bitsandbytes' pure-PyTorch backend, and with its CUDA kernel on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from hizli.kernels import nf4
from hizli.kernels.nf4 import NF4_CODE, dequantize_nf4, dequantize_nf4_reference

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]

# (shape, blocksize) that bitsandbytes' CPU dequantize_4bit gets right (see the module docstring):
# in_features a multiple of the block size, or not a multiple of 16 (its scalar path, blocks straddle
# rows there), or odd n (its PyTorch fallback, a half-filled last byte), or block size 4096.
CPU_CASES = [
    ((48, 64), 64),
    ((64, 128), 128),
    ((24, 256), 128),
    ((40, 136), 64),  # 136 = 2 x 64 + 8: blocks straddle rows
    ((3, 40), 32),  # 120 values: 3 full blocks + a partial one of 24
    ((7, 33), 64),  # odd n = 231: a padding nibble and a partial last block
    ((6, 1024), 4096),  # blocks of 4 rows, the last one half full
]
# Blocks straddling rows where bitsandbytes' CPU kernel indexes scales per row.
STRADDLE_CASES = [((48, 64), 128), ((96, 96), 64), ((4, 64), 128)]


def _case_id(case) -> str:
    (rows, cols), blocksize = case
    return f"{rows}x{cols}-bs{blocksize}"


def _quantize(shape, dtype, blocksize, nested, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=gen) * 0.05).to(dtype).to(device)
    return F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")


def _flat_block_truth(packed, qs):
    """bitsandbytes' own pure-PyTorch dequantization (its "default" backend), flat block indexing."""
    default_ops = pytest.importorskip("bitsandbytes.backends.default.ops")
    compute = getattr(default_ops, "_dequantize_4bit_compute", None)
    if compute is None:
        pytest.skip("bitsandbytes has no pure-PyTorch 4-bit backend to compare with here")
    absmax = qs.absmax
    if qs.nested:
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    return compute(
        packed.reshape(-1),
        absmax.float(),
        F.get_4bit_type("nf4", device=packed.device),
        qs.blocksize,
        qs.shape,
        qs.dtype,
    )


# ---------------------------------------------------------------------------------------------
# Reference against bitsandbytes (CPU, default suite)


def test_code_table_is_bitsandbytes_nf4():
    assert torch.equal(torch.tensor(NF4_CODE, dtype=torch.float32), F.get_4bit_type("nf4", device="cpu"))
    _, qs = _quantize((4, 64), torch.float32, 64, nested=False)
    assert torch.equal(torch.tensor(NF4_CODE, dtype=torch.float32), qs.code.float())


@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "nested"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CPU_CASES, ids=_case_id)
def test_reference_matches_bitsandbytes(case, dtype, nested):
    shape, blocksize = case
    packed, qs = _quantize(shape, dtype, blocksize, nested)
    want = F.dequantize_4bit(packed, qs)
    got = dequantize_nf4_reference(packed, qs)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got, want)
    assert torch.equal(dequantize_nf4(packed, qs), want)  # the public op picks the reference on CPU


@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "nested"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", STRADDLE_CASES, ids=_case_id)
def test_reference_matches_bitsandbytes_flat_blocks(case, dtype, nested):
    shape, blocksize = case
    packed, qs = _quantize(shape, dtype, blocksize, nested)
    assert torch.equal(dequantize_nf4_reference(packed, qs), _flat_block_truth(packed, qs))


def test_params4bit_weight_and_other_storage():
    """A Linear4bit's weight object (its quant_state read from it), and a bf16 quant_storage view."""
    torch.manual_seed(0)
    layer = (
        bnb.nn.Linear4bit(64, 48, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
        .to(torch.bfloat16)
        .to("cpu")
    )  # .to(device) quantizes
    weight = layer.weight
    assert weight.dtype == torch.uint8 and weight.quant_state is not None
    want = F.dequantize_4bit(weight.data, weight.quant_state)
    assert torch.equal(dequantize_nf4(weight), want)
    assert torch.equal(dequantize_nf4(weight.data, weight.quant_state), want)

    w = torch.randn(48, 64).bfloat16()
    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    assert torch.equal(dequantize_nf4(packed, qs), F.dequantize_4bit(packed, qs))


def test_out_and_dtype():
    """``out`` (a row slice of a stacked buffer) is written and returned; its dtype is the default."""
    packed, qs = _quantize((48, 64), torch.bfloat16, 64, nested=True)
    want = F.dequantize_4bit(packed, qs)
    buffer = torch.full((80, 64), float("nan"), dtype=torch.bfloat16)
    got = dequantize_nf4(packed, qs, out=buffer[16:64])
    assert got.data_ptr() == buffer[16:64].data_ptr()
    assert torch.equal(buffer[16:64], want)
    assert buffer[:16].isnan().all() and buffer[64:].isnan().all()

    # fp32 out of a bf16 state: the fp32 products themselves, which bitsandbytes gives for an fp32 state.
    qs32 = F.QuantState(
        absmax=qs.absmax,
        shape=qs.shape,
        code=qs.code,
        blocksize=qs.blocksize,
        quant_type="nf4",
        dtype=torch.float32,
        offset=qs.offset,
        state2=qs.state2,
    )
    want32 = F.dequantize_4bit(packed, qs32)
    assert torch.equal(dequantize_nf4(packed, qs, out=torch.empty(48, 64)), want32)
    assert torch.equal(dequantize_nf4(packed, qs, dtype=torch.float32), want32)
    assert torch.equal(dequantize_nf4(packed, qs, dtype=torch.float16), want32.half())  # one rounding


def test_checks_are_cached_per_weight_but_out_is_checked_every_call():
    """The checked state is kept for the next call (the hot path of training), keyed by the packed
    bytes' storage and the dtype, so other bytes under the same state are decoded as themselves."""
    packed, qs = _quantize((48, 64), torch.bfloat16, 64, nested=True)
    first = dequantize_nf4(packed, qs)
    assert torch.equal(dequantize_nf4(packed, qs), first)
    other = packed.clone()
    other[:8] = 0x12  # different codes for the first 16 values
    got = dequantize_nf4(other, qs)
    assert torch.equal(got, F.dequantize_4bit(other, qs)) and not torch.equal(got, first)
    as_fp32 = dequantize_nf4(packed, qs, dtype=torch.float32)  # another dtype: its own cache entry
    assert as_fp32.dtype == torch.float32 and torch.equal(as_fp32.bfloat16(), first)
    with pytest.raises(ValueError, match=r"out is \(64, 48\)"):
        dequantize_nf4(packed, qs, out=torch.empty(64, 48, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# Errors


def _state(**changes):
    packed, qs = _quantize((8, 64), torch.bfloat16, 64, nested=False)
    for key, value in changes.items():
        setattr(qs, key, value)
    return packed, qs


def test_errors_name_the_setting():
    packed, qs = _state(quant_type="fp4")
    with pytest.raises(ValueError, match="quant_type='fp4'"):
        dequantize_nf4(packed, qs)
    packed, qs = _state(blocksize=48)
    with pytest.raises(ValueError, match="blocksize=48"):
        dequantize_nf4(packed, qs)
    packed, qs = _state(packing_format_for_cpu=True)
    with pytest.raises(ValueError, match="packing_format_for_cpu"):
        dequantize_nf4(packed, qs)
    packed, qs = _state()
    with pytest.raises(ValueError, match="needs a quant_state"):
        dequantize_nf4(packed)
    with pytest.raises(ValueError, match="dtype=torch.int8"):
        dequantize_nf4(packed, qs, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"has 255 bytes, quant_state.shape=\(8, 64\) needs 256"):
        dequantize_nf4(packed[:255], qs)
    with pytest.raises(ValueError, match="not contiguous"):
        dequantize_nf4(torch.stack([packed, packed], dim=1)[:, 0], qs)


def test_errors_on_out():
    packed, qs = _state()
    with pytest.raises(ValueError, match=r"out is \(64, 8\)"):
        dequantize_nf4(packed, qs, out=torch.empty(64, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="torch.float16 on cpu, expected"):
        dequantize_nf4(packed, qs, out=torch.empty(8, 64, dtype=torch.float16), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="on meta"):
        dequantize_nf4(packed, qs, out=torch.empty(8, 64, dtype=torch.bfloat16, device="meta"))
    with pytest.raises(ValueError, match="not contiguous"):
        dequantize_nf4(packed, qs, out=torch.empty(64, 8, dtype=torch.bfloat16).t())


# ---------------------------------------------------------------------------------------------
# Triton kernel against the reference (interpreter on CPU, or a GPU)

KERNEL_CASES = [
    ((48, 64), 64),
    ((96, 96), 64),  # blocks straddle rows
    ((40, 136), 128),
    ((5, 7), 64),  # odd n: the last byte's low nibble is padding
    ((7, 33), 32),
    ((3, 2048), 4096),  # one block spans rows, one tile row per program
]


@pytest.mark.parametrize("tile", [2048, 128], ids=["tile2048", "tile128"])
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "nested"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=_case_id)
def test_kernel_matches_reference(kernel_device, monkeypatch, case, dtype, nested, tile):
    """The 128-byte tile makes several programs (and a partial last one) out of these small shapes."""
    monkeypatch.setattr(nf4, "_TILE_BYTES", tile)
    shape, blocksize = case
    packed, qs = _quantize(shape, dtype, blocksize, nested, device=kernel_device)
    want = dequantize_nf4_reference(packed, qs)
    got = dequantize_nf4(packed, qs)
    assert got.device.type == kernel_device.type and got.dtype == dtype and got.shape == shape
    assert torch.equal(got, want)


def test_kernel_into_out_slices(kernel_device, monkeypatch):
    """Two weights into row slices of one buffer, written twice (the buffer reused), other dtype than the state."""
    monkeypatch.setattr(nf4, "_TILE_BYTES", 256)
    first = _quantize((40, 96), torch.float16, 64, nested=True, device=kernel_device, seed=1)
    second = _quantize((24, 96), torch.bfloat16, 64, nested=False, device=kernel_device, seed=2)
    buffer = torch.full((64, 96), float("nan"), dtype=torch.bfloat16, device=kernel_device)
    for _ in range(2):
        dequantize_nf4(*first, out=buffer[:40])
        dequantize_nf4(*second, out=buffer[40:])
        assert torch.equal(buffer[:40], dequantize_nf4_reference(*first, dtype=torch.bfloat16))
        assert torch.equal(buffer[40:], dequantize_nf4_reference(*second))
        buffer.fill_(float("nan"))


# Row ranges whose blocks start inside a group of the nested scales (256 blocks a group): rows 300-450 of
# a [600, 64] weight start at block 300, past the first group's end.
ROW_RANGES = [(0, 1), (300, 450), (255, 600), (0, 600)]


@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "nested"])
def test_reference_rows_are_the_whole_weights_rows(nested):
    packed, qs = _quantize((600, 64), torch.bfloat16, 64, nested)
    whole = dequantize_nf4_reference(packed, qs)
    whole_fp32 = dequantize_nf4_reference(packed, qs, dtype=torch.float32)
    for start, stop in ROW_RANGES:
        assert torch.equal(dequantize_nf4_reference(packed, qs, rows=(start, stop)), whole[start:stop])
        out = torch.full((stop - start, 64), float("nan"), dtype=torch.float32)
        dequantize_nf4_reference(packed, qs, out=out, rows=(start, stop))
        assert torch.equal(out, whole_fp32[start:stop])


def test_row_range_errors_name_the_range():
    packed, qs = _quantize((40, 96), torch.bfloat16, 64, nested=False)  # blocks straddle rows
    with pytest.raises(ValueError, match=r"rows=\(1, 3\).*boundary"):
        dequantize_nf4_reference(packed, qs, rows=(1, 3))
    with pytest.raises(ValueError, match=r"rows=\(0, 41\)"):
        dequantize_nf4_reference(packed, qs, rows=(0, 41))
    with pytest.raises(ValueError, match="expected"):
        dequantize_nf4_reference(packed, qs, rows=(0, 2), out=torch.empty(3, 96, dtype=torch.bfloat16))


@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "nested"])
def test_kernel_rows_match_reference(kernel_device, monkeypatch, nested):
    monkeypatch.setattr(nf4, "_TILE_BYTES", 256)
    packed, qs = _quantize((600, 64), torch.float16, 64, nested, device=kernel_device)
    for start, stop in ROW_RANGES:
        want = dequantize_nf4_reference(packed, qs, rows=(start, stop))
        assert torch.equal(dequantize_nf4(packed, qs, rows=(start, stop)), want)


# ---------------------------------------------------------------------------------------------
# Triton kernel against bitsandbytes' CUDA kernel

# Llama-3.2-3B projections: q/o, k/v, gate/up, down ([out_features, in_features]).
LLAMA_3B_SHAPES = [(3072, 3072), (1024, 3072), (8192, 3072), (3072, 8192)]


def _cuda_triton(monkeypatch) -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if nf4.interpreting():
        pytest.skip("TRITON_INTERPRET=1 is set: GPU kernels would run in the interpreter")
    monkeypatch.setenv("HIZLI_KERNELS", "triton")
    return torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "nested"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", LLAMA_3B_SHAPES + [(40, 96)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_kernel_matches_bitsandbytes_cuda(monkeypatch, shape, dtype, nested):
    """(40, 96): blocks straddling rows, which bitsandbytes' CUDA kernel indexes flat as well."""
    device = _cuda_triton(monkeypatch)
    packed, qs = _quantize(shape, dtype, 64, nested, device=device)
    assert packed.is_cuda and qs.absmax.is_cuda
    want = F.dequantize_4bit(packed, qs)
    got = dequantize_nf4(packed, qs)
    assert got.is_cuda and got.dtype == dtype
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_kernel_out_reuse_cuda(monkeypatch, dtype):
    """q, k and v of a Llama-3B layer into one [5120, 3072] buffer, as the fused LoRA layer stacks them,
    twice over a buffer filled with NaN in between; and the Linear4bit weight object passed directly."""
    device = _cuda_triton(monkeypatch)
    torch.manual_seed(0)
    layers = [
        bnb.nn.Linear4bit(3072, rows, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
        .to(dtype)
        .to(device)
        for rows in (3072, 1024, 1024)
    ]
    want = torch.cat([F.dequantize_4bit(layer.weight.data, layer.weight.quant_state) for layer in layers])
    buffer = torch.empty((5120, 3072), dtype=dtype, device=device)
    for _ in range(2):
        buffer.fill_(float("nan"))
        row = 0
        for layer in layers:
            rows = layer.out_features
            got = dequantize_nf4(layer.weight, out=buffer[row : row + rows])
            assert got.data_ptr() == buffer[row : row + rows].data_ptr()
            row += rows
        assert torch.equal(buffer, want)


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "nested"])
def test_gpu_direct_launch_matches_jit(monkeypatch, nested):
    """HIZLI_TRITON_LAUNCH=direct (hizli.kernels.launch): after the first launch of each output
    alignment, launches skip Triton's JIT launcher and write the same bits as bitsandbytes, into an
    aligned buffer and into one whose address is 2 bytes off (a kernel compiled apart), in turn."""
    device = _cuda_triton(monkeypatch)
    monkeypatch.setenv("HIZLI_TRITON_LAUNCH", "direct")
    packed, qs = _quantize((1024, 3072), torch.bfloat16, 64, nested, device=device)
    want = F.dequantize_4bit(packed, qs)
    spare = torch.empty(want.numel() + 8, dtype=torch.bfloat16, device=device)
    outs = {"aligned": spare[8:].view(want.shape), "2 bytes off": spare[1 : 1 + want.numel()].view(want.shape)}
    for _ in range(3):
        for name, out in outs.items():
            out.fill_(float("nan"))
            dequantize_nf4(packed, qs, out=out)
            assert torch.equal(out, want), name
    bound = nf4._resolve_cached(packed, qs, None, None).launches[False]
    assert len(bound.compiled) == 2  # one compiled kernel per alignment, each then launched directly
