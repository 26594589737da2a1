"""Frozen base weights sharded over ranks with PyTorch's FSDP2 (``fully_shard``), 4-bit included.

``shard_base_weights`` puts every decoder layer in its own FSDP2 group, then the decoder: each rank
keeps 1/N of the frozen weights and gathers a layer's whole weights just before it runs (forward,
recompute and backward), freeing them after. The LoRA weights are left out of the groups
(``ignored_params``): each rank keeps them whole, so the fused kernels see whole adapters, any
optimizer works on them (8-bit AdamW included), and their gradients are summed once per step by
``hizli.train.ranks`` exactly as in data-parallel training.

A 4-bit weight is sharded as raw bytes, never as floats. bitsandbytes' ``Params4bit`` cannot be
(its quantization blocks run through the flat weight across row ends, and its state lives beside
the tensor), so each one becomes a :class:`ShardedNF4Linear`: packed NF4 codes ``[out, in / 2]``
uint8 and one fp32 scale per block of a row ``[out, in / blocksize]``, two plain tensors that FSDP2
cuts by rows. The codes are the same as bitsandbytes' (a dequantized NF4 weight quantizes back to
itself), so the model computes the same function. ``quantize_rows`` also lets each rank quantize only
its own rows of a model built on the meta device (``random_nf4_shards``).
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from hizli.kernels._lora import compute_dtype
from hizli.kernels.nf4 import NF4_CODE, dequantize_nf4

BLOCKSIZE = 64


@dataclass
class RowQuantState:
    """What :func:`hizli.kernels.nf4.dequantize_nf4` reads, for blocks that never cross a row end."""

    absmax: torch.Tensor
    shape: tuple[int, int]
    blocksize: int
    dtype: torch.dtype
    quant_type: str = "nf4"
    nested: bool = False
    packing_format_for_cpu: bool = False


def quantize_rows(weight: torch.Tensor, blocksize: int = BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [out, in]`` in NF4, blocks of ``blocksize`` within each row: ``(codes [out, in / 2]
    uint8, high nibble first; scales [out, in / blocksize] fp32)``. Nearest level, as bitsandbytes."""
    out_f, in_f = weight.shape
    if in_f % blocksize:
        raise ValueError(f"in_features={in_f} is not a multiple of the NF4 block size {blocksize}")
    blocks = weight.float().reshape(out_f, in_f // blocksize, blocksize)
    scales = blocks.abs().amax(dim=2)
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    normalized = (blocks / safe[..., None]).reshape(out_f, in_f)
    code = torch.tensor(NF4_CODE, device=weight.device)
    codes = torch.bucketize(normalized, (code[1:] + code[:-1]) / 2).to(torch.uint8)
    return (codes[:, 0::2] << 4) | codes[:, 1::2], scales


class ShardedNF4Linear(torch.nn.Module):
    """A frozen NF4 linear layer whose bytes FSDP2 can shard by rows (see the module docstring).

    ``weight`` looks like bitsandbytes' to hizli's fused LoRA ops: the packed bytes carrying a
    ``quant_state``."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None = None):
        super().__init__()
        self.codes = torch.nn.Parameter(codes, requires_grad=False)
        self.scales = torch.nn.Parameter(scales, requires_grad=False)
        self.bias = torch.nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.out_features, self.in_features = codes.shape[0], codes.shape[1] * 2
        self.blocksize = self.in_features // scales.shape[1]
        self.dtype = dtype

    @classmethod
    def from_linear4bit(cls, layer: Any) -> "ShardedNF4Linear":
        """The same weights as a bitsandbytes ``Linear4bit`` (NF4 only)."""
        import bitsandbytes.functional as bnbf

        weight = layer.weight
        state = weight.quant_state
        if state.quant_type != "nf4":
            raise ValueError(f"parallel='fsdp' shards NF4 weights; this layer is {state.quant_type}")
        full = bnbf.dequantize_4bit(weight.data, state).float()
        codes, scales = quantize_rows(full, BLOCKSIZE)
        bias = layer.bias.detach() if layer.bias is not None else None
        return cls(codes, scales, state.dtype, bias)

    @property
    def weight(self) -> torch.Tensor:
        codes, scales = self.codes, self.scales
        if hasattr(codes, "to_local"):  # sharded (outside a forward): this rank's rows
            codes, scales = codes.to_local(), scales.to_local()
        packed = codes.detach().reshape(-1)
        packed.quant_state = RowQuantState(
            scales.detach().reshape(-1), (codes.shape[0], codes.shape[1] * 2), self.blocksize, self.dtype
        )
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize_nf4(self.weight, dtype=compute_dtype(x))
        bias = self.bias.to(w.dtype) if self.bias is not None else None
        return torch.nn.functional.linear(x.to(w.dtype), w, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 blocks of {self.blocksize}"


def _to_row_nf4(model: torch.nn.Module) -> int:
    """Replace every bitsandbytes 4-bit layer by a :class:`ShardedNF4Linear`; returns how many."""
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child).__name__ == "Linear4bit" and type(child).__module__.startswith("bitsandbytes")
    ]
    for parent, name, child in swaps:
        setattr(parent, name, ShardedNF4Linear.from_linear4bit(child))
    return len(swaps)


def shard_base_weights(model: torch.nn.Module) -> dict[str, int]:
    """Shard ``model``'s frozen weights over the default process group with FSDP2: one group per
    decoder layer, then the decoder (its embedding and final norm). The output head stays whole on
    every rank (the fused loss reads its weight directly). Returns what was done, for the log."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from hizli.models.checkpointing import decoder_layers

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = lm.get_decoder()
    if isinstance(decoder, FSDPModule):  # sharded by an earlier train() call
        return {"layers": 0, "nf4_weights": 0}
    converted = _to_row_nf4(model)
    trainable = {p for p in model.parameters() if p.requires_grad}
    layers = decoder_layers(model)
    with _frozen_integer_parameters():
        for layer in layers:
            fully_shard(layer, ignored_params={p for p in layer.parameters() if p in trainable})
        fully_shard(decoder, ignored_params={p for p in decoder.parameters() if p in trainable})
    return {"layers": len(layers), "nf4_weights": converted}


@contextmanager
def _frozen_integer_parameters():
    """Some torch releases (2.11) wrap each shard as ``nn.Parameter(shard)``, which asks for a gradient
    before copying the original's ``requires_grad`` and so refuses the uint8 NF4 codes. While sharding,
    a parameter of a non-float dtype is made without one (it could never have one)."""
    original = torch.nn.Parameter.__new__

    def new(cls, data=None, requires_grad=True):
        if data is not None and not (data.is_floating_point() or data.is_complex()):
            requires_grad = False
        return original(cls, data, requires_grad)

    torch.nn.Parameter.__new__ = new
    try:
        yield
    finally:
        torch.nn.Parameter.__new__ = original


# ------------------------------------------------------------------------------------------------
# A sharded model made in place: built on the meta device, each rank fills and quantizes its own rows.


def _rows_of(param: torch.Tensor) -> tuple[int, int]:
    """The global rows ``[start, stop)`` this rank holds of ``param`` (FSDP2 cuts dim 0 as torch.chunk)."""
    if not hasattr(param, "to_local"):
        return 0, param.shape[0]
    mesh = param.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    chunk = -(-param.shape[0] // world)
    start = min(rank * chunk, param.shape[0])
    return start, min(start + chunk, param.shape[0])


def random_rows(name: str, start: int, stop: int, columns: int, *, device, seed: int = 0, std: float = 0.02):
    """Rows ``[start, stop)`` of a random ``[*, columns]`` weight called ``name``: the same values
    whichever rank makes them and however the rows are cut (made in tiles of 64 rows, each seeded by
    the name and its index)."""
    tile = 64
    g = torch.Generator(device=device)
    parts = []
    for t in range(start // tile, -(-stop // tile)):
        g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + t) % 2**63)
        block = torch.randn(tile, columns, generator=g, device=device, dtype=torch.float32)
        lo, hi = max(start, t * tile) - t * tile, min(stop, (t + 1) * tile) - t * tile
        parts.append(block[lo:hi])
    return (torch.cat(parts) if parts else torch.empty(0, columns, device=device)) * std


class RandomRows:
    """Random weights (``random_rows``; norms 1, biases 0): speed and memory do not depend on values."""

    def rows(self, name: str, start: int, stop: int, columns: int, device) -> torch.Tensor:
        return random_rows(name, start, stop, columns, device=device)

    def vector(self, name: str, start: int, stop: int, device) -> torch.Tensor:
        return torch.full((stop - start,), 0.0 if name.endswith(".bias") else 1.0, device=device)


class CheckpointRows:
    """Rows of the weights in a folder of safetensors files, read slice by slice (only the rows asked for)."""

    def __init__(self, folder: str) -> None:
        import json
        from pathlib import Path

        root = Path(folder)
        index = root / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: root / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            from safetensors import safe_open

            with safe_open(str(root / "model.safetensors"), "pt") as f:
                self.files = {k: root / "model.safetensors" for k in f.keys()}

    def _key(self, name: str) -> str:
        """A parameter of the LoRA model -> its checkpoint key (``lm_head`` falls back to a tied embedding)."""
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if key not in self.files and key == "lm_head.weight":
            key = "model.embed_tokens.weight"
        if key not in self.files:
            raise KeyError(f"{key} is not in the checkpoint (parameter {name})")
        return key

    def _read(self, name: str, start: int, stop: int, device) -> torch.Tensor:
        from safetensors import safe_open

        key = self._key(name)
        with safe_open(str(self.files[key]), "pt") as f:
            return f.get_slice(key)[start:stop].to(device=device, dtype=torch.float32)

    def rows(self, name: str, start: int, stop: int, columns: int, device) -> torch.Tensor:
        return self._read(name, start, stop, device)

    def vector(self, name: str, start: int, stop: int, device) -> torch.Tensor:
        return self._read(name, start, stop, device)


def sharded_model(
    config, source, *, device: str, dtype: torch.dtype, lora: dict[str, Any], max_seq_length: int
) -> torch.nn.Module:
    """A LoRA model of ``config`` whose frozen base is sharded over the process group without any
    rank ever holding the whole base: built on the meta device, sharded, then each rank reads
    (``source``: ``RandomRows`` or ``CheckpointRows``) and quantizes (NF4, row blocks) only its own
    rows. For bases no GPU of the group could load whole (Llama-3.1-70B in 4-bit on 2 x 24 GB)."""
    from transformers import AutoModelForCausalLM

    from hizli.models.lora import add_lora
    from hizli.models.patch import use_fused_ops, use_hizli_attention
    from hizli.models.record import state_of

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.max_seq_length = max_seq_length
    use_hizli_attention(model)
    if device.startswith("cuda"):
        state_of(model).fused_ops = use_fused_ops(model)
    peft_model = add_lora(model, **lora)
    for module in peft_model.modules():  # frozen projections: NF4 rows (still on meta)
        base = getattr(module, "base_layer", None)
        if isinstance(base, torch.nn.Linear) and hasattr(module, "lora_A"):
            codes = torch.empty(base.out_features, base.in_features // 2, dtype=torch.uint8, device="meta")
            scales = torch.empty(base.out_features, base.in_features // BLOCKSIZE, device="meta")
            bias = torch.empty(base.out_features, dtype=dtype, device="meta") if base.bias is not None else None
            module.base_layer = ShardedNF4Linear(codes, scales, dtype, bias)
    shard_base_weights(peft_model)
    peft_model.to_empty(device=device)
    with torch.no_grad():
        _fill(peft_model, source, device, lora.get("random_state", 3407))
    decoder = peft_model.get_base_model().get_decoder()
    with torch.device(device):  # its buffers were made on meta: make them again
        decoder.rotary_emb = type(decoder.rotary_emb)(config=config)
    return peft_model


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t.data


def _fill(model: torch.nn.Module, source, device: str, lora_seed: int) -> None:
    for name, module in model.named_modules():
        if isinstance(module, ShardedNF4Linear):
            start, stop = _rows_of(module.codes)
            codes, scales = quantize_rows(source.rows(name + ".weight", start, stop, module.in_features, device))
            _local(module.codes).copy_(codes)
            _local(module.scales).copy_(scales)
    for name, param in model.named_parameters():
        if param.requires_grad or name.endswith((".codes", ".scales")):
            continue
        start, stop = _rows_of(param)
        if param.dim() == 1:  # norms, biases
            values = source.vector(name, start, stop, device)
        else:
            values = source.rows(name, start, stop, param.shape[1], device)
        _local(param).copy_(values.to(param.dtype))
    devices = [torch.device(device)] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):  # the same adapter on every rank
        torch.manual_seed(lora_seed)
        for module in model.modules():
            if hasattr(module, "lora_A") and hasattr(module, "reset_lora_parameters"):
                for adapter in module.lora_A:
                    module.reset_lora_parameters(adapter, True)


def load_sharded(model_name: str, *, max_seq_length: int, dtype: Any, lora: dict[str, Any]):
    """``(LoRA model, tokenizer)`` for ``model_name`` (a folder of safetensors, an embedded model or a
    hub id), 4-bit and sharded over the process group as it loads: each rank reads and quantizes only
    its own rows, so no GPU ever holds the whole base. What ``hizli train`` does with
    ``parallel: fsdp`` and ``load_in_4bit: true``."""
    from transformers import AutoConfig

    from hizli.models.loader import LoadInfo, default_device, load_tokenizer, resolve_dtype, resolve_source
    from hizli.models.record import state_of

    src = resolve_source(model_name)
    folder = src.path
    if src.kind == "hub":
        from huggingface_hub import snapshot_download

        folder = snapshot_download(src.path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    elif src.kind not in ("folder", "embedded"):
        raise ValueError(
            f"parallel='fsdp' loads 4-bit bases from safetensors folders or the hub; {model_name!r} is a "
            f"{src.kind}. Convert it to a folder first, or use parallel='ddp'"
        )
    device = default_device()
    torch_dtype = resolve_dtype(dtype, device)
    config = AutoConfig.from_pretrained(folder)
    model = sharded_model(
        config, CheckpointRows(folder), device=device, dtype=torch_dtype, lora=lora, max_seq_length=max_seq_length
    )
    state_of(model).info = LoadInfo(
        source=src.source,
        kind=src.kind,
        dtype=str(torch_dtype).replace("torch.", ""),
        device=device,
        max_seq_length=max_seq_length,
        load_in_4bit_requested=True,
        quantization="nf4 (row blocks, sharded)",
    )
    model.peft_config["default"].base_model_name_or_path = src.source
    return model, load_tokenizer(folder, max_seq_length=max_seq_length)
