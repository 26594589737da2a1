"""Merge LoRA adapters into their base weights and save a plain transformers folder.

The merge never touches the user's live model: each output tensor is computed on demand into fresh
memory (``W' = dequant(W) + scaling * B @ A`` in fp32, then cast), one tensor at a time, so peak
extra memory is one weight matrix, not a second copy of the model. ``merge_plan`` is shared with
the GGUF writer, which streams the same tensors into its file.

NF4 bases are dequantized exactly as bitsandbytes computes with them. On CPUs with AVX512-BF16,
bitsandbytes 0.50 repacks a Linear4bit's weight the first time it runs in eval mode (nibbles
re-tiled, absmax turned into bf16); its own inverse re-quantizes absmax and mutates the module, so
we decode that layout ourselves instead.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hizli import _log

SAVE_METHODS = ("merged_16bit", "merged_4bit", "lora")
_SAVE_METHOD_ALIASES = {
    "merged_16bit": "merged_16bit",
    "merged-16bit": "merged_16bit",
    "merged": "merged_16bit",
    "16bit": "merged_16bit",
    "merged_4bit": "merged_4bit",
    "merged-4bit": "merged_4bit",
    "merged_4bit_forced": "merged_4bit",
    "4bit": "merged_4bit",
    "lora": "lora",
}


@dataclass
class PlannedTensor:
    """One tensor of the merged model, computed only when ``load`` is called.

    Attributes:
        name: transformers state-dict name, e.g. ``model.layers.0.self_attn.q_proj.weight``.
        shape: the tensor's shape, e.g. ``(out_features, in_features)`` for a linear weight.
        dtype: the dtype it has in the model (for floats, the merge may cast it).
        load: ``load(dtype) -> Tensor`` on CPU; floating tensors are cast to ``dtype``, others kept.
    """

    name: str
    shape: tuple[int, ...]
    dtype: Any
    load: Callable[[Any], Any]

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point

    def nbytes(self, dtype) -> int:
        import math

        itemsize = (dtype if self.is_float else self.dtype).itemsize
        return math.prod(self.shape) * itemsize


@dataclass
class MergePlan:
    """Everything needed to write the merged model: config, tensors in order, and tying."""

    base: Any  # the transformers model under the PEFT wrapper (never modified)
    config: Any  # a copy of base.config, without quantization_config, tie flag set
    tensors: list[PlannedTensor]
    tied: bool  # lm_head shares the input embedding (so it is not written)


def unwrap(model):
    """The transformers model under a ``peft.PeftModel`` (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def compute_dtype(model):
    """The floating dtype the model computes in: bnb's compute dtype for 4-bit, else the embeddings'."""
    import torch

    base = unwrap(model)
    q = getattr(base.config, "quantization_config", None)
    if q is not None:
        qd = q if isinstance(q, dict) else q.to_dict()
        name = qd.get("bnb_4bit_compute_dtype")
        if isinstance(name, str) and hasattr(torch, name.replace("torch.", "")):
            return getattr(torch, name.replace("torch.", ""))
    emb = base.get_input_embeddings()
    if emb is not None and emb.weight.dtype.is_floating_point:
        return emb.weight.dtype
    return torch.float32


def merge_plan(model) -> MergePlan:
    """List the merged model's tensors without computing any of them.

    Works on a ``PeftModel`` (LoRA merged in; ``modules_to_save`` copies replace their originals),
    on a 4-bit model (dequantized) and on a plain model. Raises ValueError for DoRA adapters.
    """
    base = unwrap(model)
    tensors: list[PlannedTensor] = []
    seen: dict[int, str] = {}
    aliases: dict[str, str] = {}
    _walk(base, "", tensors, seen, aliases)
    out_emb = base.get_output_embeddings()
    out_name = _module_name(base, out_emb)
    tied = bool(out_name) and f"{out_name}.weight" in aliases
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if getattr(config, "tie_word_embeddings", False) and not tied and out_name:
        # modules_to_save or a LoRA on lm_head/embeddings made the two differ: write both, untied
        _log.info("the output and input embeddings differ after merging; writing both (untied)")
    config.tie_word_embeddings = tied
    return MergePlan(base=base, config=config, tensors=tensors, tied=tied)


def _module_name(root, target) -> str | None:
    if target is None:
        return None
    for name, module in root.named_modules():
        if module is target:
            return name
        if getattr(module, "original_module", None) is target or getattr(module, "base_layer", None) is target:
            return name
    return None


def _walk(module, prefix: str, out: list[PlannedTensor], seen: dict[int, str], aliases: dict[str, str]) -> None:
    from peft.tuners.lora import LoraLayer

    if isinstance(module, LoraLayer):
        _plan_lora_layer(module, prefix, out, seen, aliases)
        return
    if _is_modules_to_save(module):
        active = [] if module.disable_adapters else list(module.active_adapters)
        inner = (
            module.modules_to_save[active[0]]
            if active and active[0] in module.modules_to_save
            else module.original_module
        )
        _walk(inner, prefix, out, seen, aliases)
        return
    for pname, p in module._parameters.items():
        if p is not None:
            _add(out, seen, aliases, prefix + pname, p, _dense_loader(module, p))
    for bname, b in module._buffers.items():
        if b is not None and bname not in module._non_persistent_buffers_set:
            _add(out, seen, aliases, prefix + bname, b, _plain_loader(b))
    for cname, child in module._modules.items():
        if child is not None:
            _walk(child, f"{prefix}{cname}.", out, seen, aliases)


def _is_modules_to_save(module) -> bool:
    return hasattr(module, "modules_to_save") and hasattr(module, "original_module")


def _add(out, seen, aliases, name, tensor, load) -> None:
    if id(tensor) in seen:  # tied weights: the same Parameter reached under two names
        aliases[name] = seen[id(tensor)]
        return
    seen[id(tensor)] = name
    out.append(PlannedTensor(name=name, shape=_logical_shape(tensor), dtype=_logical_dtype(tensor), load=load))


def _plan_lora_layer(layer, prefix, out, seen, aliases) -> None:
    base_layer = layer.get_base_layer()
    for name in layer.active_adapters:
        if layer.use_dora.get(name, False):
            raise ValueError(
                "this model uses DoRA adapters (use_dora=True), which hizli cannot merge yet; "
                "save the adapter with save_method='lora' instead"
            )
    weight = base_layer.weight
    load = _merged_loader(layer, base_layer)
    _add(out, seen, aliases, prefix + "weight", weight, load)
    for pname, p in base_layer._parameters.items():
        if pname != "weight" and p is not None:
            _add(out, seen, aliases, prefix + pname, p, _bias_loader(layer, pname, p))


def _is_4bit(p) -> bool:
    return type(p).__name__ == "Params4bit" and getattr(p, "quant_state", None) is not None


def _logical_shape(p) -> tuple[int, ...]:
    if _is_4bit(p):
        return tuple(int(s) for s in p.quant_state.shape)
    return tuple(p.shape)


def _logical_dtype(p):
    import torch

    if _is_4bit(p):
        qs = p.quant_state
        return getattr(qs, "original_dtype", None) or qs.dtype or torch.float32
    return p.dtype


def dense_weight(p):
    """A full-precision copy of a weight (dequantized from NF4/FP4 if needed), fp32, on its device.

    Shape:
        ``p.quant_state.shape`` for 4-bit weights, else ``p.shape``.
    """
    import torch

    if not _is_4bit(p):
        return p.detach().to(torch.float32, copy=True)
    qs = p.quant_state
    if getattr(qs, "packing_format_for_cpu", False):
        return _dequantize_cpu_packed(p.data, qs)
    import bitsandbytes.functional as F

    return F.dequantize_4bit(p.data, qs).to(torch.float32)


def _dequantize_cpu_packed(packed, qs, block_n: int = 32):
    """Decode bitsandbytes' AVX512-BF16 CPU layout ([N, K/2] uint8, absmax [K/blocksize, N] bf16).

    The layout (bitsandbytes.functional._convert_weight_packed_for_cpu) tiles rows in blocks of
    ``block_n``; within a tile, each 64-code group holds 32 low nibbles then 32 high nibbles. We undo
    the tiling to recover the code of every (row, column), then scale by the block's absmax, the same
    numbers the kernel multiplies with.
    """
    import torch

    n, k_half = packed.shape
    k = k_half * 2
    low = packed & 0xF
    high = (packed >> 4) & 0xF
    groups = torch.cat([low.reshape(-1, block_n), high.reshape(-1, block_n)], dim=-1)  # [-1, 64]
    codes = groups.reshape(n // block_n, k_half, block_n, 2).transpose(1, 2).reshape(n, k)
    table = qs.code.to(torch.float32)
    absmax = qs.absmax.to(torch.float32).T  # [N, K/blocksize]
    values = table[codes.long()].reshape(n, k // qs.blocksize, qs.blocksize)
    return (values * absmax.unsqueeze(-1)).reshape(n, k)


def _dense_loader(module, p):
    def load(dtype):

        t = dense_weight(p) if p.is_floating_point() or _is_4bit(p) else p.detach().clone()
        if t.is_floating_point():
            t = t.to(dtype)
        return t.to("cpu", copy=False).contiguous() if t.device.type != "cpu" else t.contiguous()

    return load


def _plain_loader(b):
    def load(dtype):
        t = b.detach().clone()
        if t.is_floating_point():
            t = t.to(dtype)
        return t.cpu().contiguous()

    return load


def _active_unmerged(layer) -> list[str]:
    if layer.disable_adapters:
        return []
    merged = set(getattr(layer, "merged_adapters", []))
    return [a for a in layer.active_adapters if a in layer.lora_A and a not in merged]


def _merged_loader(layer, base_layer):
    def load(dtype):
        import torch

        with torch.no_grad():
            w = dense_weight(base_layer.weight)  # fp32, fresh memory
            for name in _active_unmerged(layer):
                w += _delta(layer, name, w.shape).to(w.device)
        return w.to(dtype).cpu().contiguous()

    return load


def _delta(layer, adapter: str, shape):
    """``scaling * B @ A`` in fp32 (PEFT's get_delta_weight runs in the adapter dtype, bf16 on GPUs)."""
    import torch

    a, b = layer.lora_A[adapter], layer.lora_B[adapter]
    if isinstance(a, torch.nn.Linear) and isinstance(b, torch.nn.Linear):
        delta = (b.weight.float() @ a.weight.float()) * layer.scaling[adapter]
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T
    else:  # embeddings and other layer kinds: PEFT knows their layout
        delta = layer.get_delta_weight(adapter).float()
    assert tuple(delta.shape) == tuple(shape), (delta.shape, shape)
    return delta


def _bias_loader(layer, pname, p):
    def load(dtype):
        t = p.detach().float().clone()
        if pname == "bias":
            for name in _active_unmerged(layer):
                lb = layer.lora_B[name]
                if getattr(layer, "lora_bias", {}).get(name, False) and getattr(lb, "bias", None) is not None:
                    t += lb.bias.detach().float().to(t.device)
        return t.to(dtype).cpu().contiguous()

    return load


# --------------------------------------------------------------------------------------------------
# saving


def normalize_save_method(save_method: str) -> str:
    key = str(save_method).strip().lower()
    if key not in _SAVE_METHOD_ALIASES:
        raise ValueError(
            f"save_method={save_method!r} is not known; use 'merged_16bit' (LoRA merged into full-precision "
            "weights), 'merged_4bit' (merged, then quantized to NF4) or 'lora' (the adapter only)"
        )
    return _SAVE_METHOD_ALIASES[key]


def resolve_dtype(dtype, model):
    """``None``: the model's compute dtype (bf16/fp16 on GPUs, fp32 on a CPU). Else a name or torch dtype."""
    import torch

    if dtype is None or dtype == "auto":
        return compute_dtype(model)
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.float16, torch.bfloat16):
            return dtype
    else:
        names = {
            "float32": torch.float32,
            "fp32": torch.float32,
            "float16": torch.float16,
            "fp16": torch.float16,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
        }
        if str(dtype).lower().replace("torch.", "") in names:
            return names[str(dtype).lower().replace("torch.", "")]
    raise ValueError(f"dtype={dtype!r}: use None (the model's own), 'bfloat16', 'float16' or 'float32'")


def parse_size(size: int | str) -> int:
    """Bytes from 5000000, '5GB', '500MB' or '2GiB'."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b)?\s*", str(size).lower())
    if not m:
        raise ValueError(f"max_shard_size={size!r}: give bytes (an integer) or a size like '5GB' or '500MB'")
    unit = m.group(2) or "b"
    base = 1024 if "i" in unit else 1000
    power = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


def save_merged(
    model,
    save_directory: str | os.PathLike,
    tokenizer=None,
    save_method: str = "merged_16bit",
    *,
    dtype: Any = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = True,
    progress: bool = False,
    **unknown: Any,
) -> Path:
    """Save the model with its LoRA merged in, as a folder any transformers code can load.

    Args:
        model: a ``PeftModel`` from ``get_peft_model`` (or any transformers causal LM; its own
            weights are then saved, dequantized when 4-bit). Never modified.
        save_directory: output folder. Written in a staging folder beside it and moved into place
            when complete.
        tokenizer: saved beside the weights, chat template included (a warning if missing).
        save_method: ``"merged_16bit"``: unquantized weights in ``dtype``; ``"merged_4bit"``:
            merged in full precision, then quantized to NF4 with bitsandbytes (for transformers
            inference; not for GGUF); ``"lora"``: the adapter only (PEFT format).
        dtype: weight dtype for merged_16bit (and the compute dtype for merged_4bit). ``None``: the
            model's compute dtype, i.e. bf16/fp16 on GPUs and fp32 for a model on a CPU, so the
            saved model computes exactly what the adapter model did. Pass ``"bfloat16"`` or
            ``"float16"`` for half the size.
        max_shard_size: largest safetensors file; bigger models are split with an index file.
        overwrite: replace files in a non-empty folder (``False``: refuse with a ValueError).
        progress: show a tqdm bar over the tensors.

    Returns:
        The output folder.
    """
    if unknown:
        raise TypeError(f"save_pretrained_merged() got unexpected argument(s): {', '.join(sorted(unknown))}")
    method = normalize_save_method(save_method)
    from hizli.export.staging import staged_output

    if method == "lora":
        with staged_output(save_directory, overwrite=overwrite) as staging:
            _save_adapter(model, staging)
            _save_tokenizer(tokenizer, staging)
        return Path(save_directory)
    torch_dtype = resolve_dtype(dtype, model)
    with staged_output(save_directory, overwrite=overwrite) as staging:
        if method == "merged_16bit":
            write_merged_folder(model, staging, dtype=torch_dtype, max_shard_size=max_shard_size, progress=progress)
        else:
            _write_merged_4bit(model, staging, torch_dtype, max_shard_size, progress)
        _save_tokenizer(tokenizer, staging)
    return Path(save_directory)


def write_merged_folder(
    model, folder: Path, *, dtype, max_shard_size: int | str = "5GB", progress: bool = False
) -> dict[str, Any]:
    """Write config, generation config and sharded safetensors of the merged model into ``folder``.

    Returns:
        ``{"files": [...], "total_size": bytes}`` for the weight files.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    plan = merge_plan(model)
    limit = parse_size(max_shard_size)
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in plan.tensors:
        n = t.nbytes(dtype)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    total = sum(t.nbytes(dtype) for t in plan.tensors)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map: dict[str, str] = {}
    bar = tqdm(total=len(plan.tensors), desc="merging", unit="tensor", disable=not progress)
    for fname, shard in zip(names, shards):
        tensors = {}
        for t in shard:
            tensors[t.name] = t.load(dtype)
            weight_map[t.name] = fname
            bar.update(1)
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config = plan.config
    config.dtype = dtype
    config.save_pretrained(folder)
    _save_generation_config(plan.base, folder)
    return {"files": names, "total_size": total}


def _save_generation_config(base, folder: Path) -> None:
    gen = getattr(base, "generation_config", None)
    if gen is None:
        return
    try:
        gen.save_pretrained(folder)
    except ValueError as e:  # transformers refuses inconsistent sampling settings; keep the ids
        _log.warn_once("export-genconfig", f"generation config not saved as is ({e}); saving its token ids only")
        from transformers import GenerationConfig

        GenerationConfig(
            bos_token_id=gen.bos_token_id, eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id
        ).save_pretrained(folder)


def _write_merged_4bit(model, staging: Path, dtype, max_shard_size, progress) -> None:
    """Merge in full precision into a scratch folder, reload it through bitsandbytes NF4, save that."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:
        raise ValueError(
            f"save_method='merged_4bit' needs bitsandbytes ({type(e).__name__}: {e}); install bitsandbytes>=0.46 "
            "or use save_method='merged_16bit'"
        ) from e
    base = unwrap(model)
    scratch = staging / ".merged-full-precision"
    scratch.mkdir()
    write_merged_folder(model, scratch, dtype=dtype, max_shard_size=max_shard_size, progress=progress)
    old = getattr(base.config, "quantization_config", None)
    old = (old if isinstance(old, dict) else old.to_dict()) if old is not None else {}
    qconfig = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=old.get("bnb_4bit_quant_type", "nf4"),
        bnb_4bit_use_double_quant=old.get("bnb_4bit_use_double_quant", True),
        bnb_4bit_compute_dtype=dtype,
    )
    device = next(base.parameters()).device
    quantized = AutoModelForCausalLM.from_pretrained(
        scratch,
        quantization_config=qconfig,
        dtype=dtype,
        device_map={"": str(device)},
        use_safetensors=True,
    )
    quantized.save_pretrained(staging, max_shard_size=max_shard_size)
    del quantized
    shutil.rmtree(scratch)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _save_adapter(model, folder: Path) -> None:
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise ValueError(
            "save_method='lora' saves LoRA adapters, but this model has none; call "
            "FastLanguageModel.get_peft_model first, or use save_method='merged_16bit'"
        )
    # Built from named_parameters, not state_dict(): bitsandbytes' Linear4bit rewrites its weight
    # in place when its state_dict is taken after CPU inference (see the module docstring).
    state = {name: p for name, p in model.named_parameters()}
    for mname, module in model.named_modules():
        for bname, b in module._buffers.items():
            if b is not None and bname not in module._non_persistent_buffers_set:
                state[f"{mname}.{bname}" if mname else bname] = b
    model.save_pretrained(folder, state_dict=state)


def _save_tokenizer(tokenizer, folder: Path) -> None:
    if tokenizer is None:
        _log.warn_once(
            "export-no-tokenizer",
            f"no tokenizer was passed, so {folder.name} has weights but no tokenizer or chat template; "
            "pass the tokenizer (model.save_pretrained_merged(dir, tokenizer)) to make it loadable on its own",
        )
        return
    tokenizer.save_pretrained(folder)
    if not getattr(tokenizer, "chat_template", None):
        _log.warn_once("export-no-template", "the tokenizer has no chat template; the export has none either")
