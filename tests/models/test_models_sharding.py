"""The 4-bit weights FSDP2 shards (``hizli.models.sharding``): a bitsandbytes NF4 layer turned into row
blocks computes the same function, bit for bit, on the CPU reference and on the GPU kernel; random
weights made in place do not depend on how the rows are cut between ranks. The sharded training
itself is checked end to end in tests/train/test_train_distributed.py."""

from __future__ import annotations

import pytest
import torch

from hizli.kernels.nf4 import dequantize_nf4
from hizli.models.sharding import ShardedNF4Linear, quantize_rows, random_rows


def _bnb_layer(out_f: int, in_f: int, device: str, bias: bool = False):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = torch.nn.Linear(in_f, out_f, bias=bias)
    layer = bnb.nn.Linear4bit(
        in_f, out_f, bias=bias, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True
    )
    layer.load_state_dict(dense.state_dict())
    return layer.to(device)  # quantized on the move


def _check_same_layer(device: str) -> None:
    import bitsandbytes.functional as bnbf

    layer = _bnb_layer(192, 256, device, bias=True)
    rows = ShardedNF4Linear.from_linear4bit(layer)
    want = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    got = dequantize_nf4(rows.weight, dtype=torch.float32)
    assert torch.equal(got, want)  # the same codes and scales: a dequantized NF4 weight quantizes back to itself
    # a third of the bytes it had plus fp32 scales, as two tensors of whole rows
    assert rows.codes.shape == (192, 128) and rows.codes.dtype == torch.uint8
    assert rows.scales.shape == (192, 4) and rows.scales.dtype == torch.float32
    x = torch.randn(5, 256, device=device)
    torch.testing.assert_close(rows(x), layer(x), rtol=1e-5, atol=1e-5)


def test_rows_of_a_bitsandbytes_layer_compute_the_same_on_cpu():
    _check_same_layer("cpu")


@pytest.mark.gpu
def test_rows_of_a_bitsandbytes_layer_compute_the_same_on_gpu():
    _check_same_layer("cuda")  # dequantize_nf4 runs the Triton kernel on the row-block state


def test_quantize_rows_keeps_blocks_within_rows_and_rejects_partial_blocks():
    w = torch.randn(3, 128)
    codes, scales = quantize_rows(w)
    # every block's largest magnitude is stored exactly and comes back exactly
    back = dequantize_nf4(ShardedNF4Linear(codes, scales, torch.float32).weight, dtype=torch.float32)
    blocks = w.reshape(3, 2, 64)
    peak = blocks.abs().argmax(dim=2, keepdim=True)
    assert torch.equal(back.reshape(3, 2, 64).gather(2, peak), blocks.gather(2, peak))
    assert (back - w).abs().max() <= 0.2 * w.abs().max()
    with pytest.raises(ValueError, match="in_features=96 is not a multiple of the NF4 block size 64"):
        quantize_rows(torch.randn(2, 96))


def test_random_rows_do_not_depend_on_how_the_rows_are_cut():
    whole = random_rows("layers.0.mlp.up_proj", 0, 200, 16, device="cpu")
    parts = [random_rows("layers.0.mlp.up_proj", a, b, 16, device="cpu") for a, b in ((0, 67), (67, 134), (134, 200))]
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(random_rows("layers.1.mlp.up_proj", 0, 200, 16, device="cpu"), whole)
