"""Write GGUF files that llama.cpp, Ollama and LM Studio load, with hizli's own writer.

f32, f16, bf16 and q8_0 are written here, streaming one merged tensor at a time (tensor
descriptions first, then each tensor is merged, converted and written), so memory stays at one
weight matrix beyond the model. Other llama.cpp types (q4_k_m, q5_k_m, ...) are made by writing
f16/bf16 first and running llama.cpp's ``llama-quantize`` on it.

What llama.cpp expects, learned from the gguf package's constants and tensor-name map and from
llama.cpp's converter (convert_hf_to_gguf.py / conversion/llama.py, and src/llama-vocab.cpp for
the pre-tokenizer names); the code is ours:

- tensor names from ``gguf.get_tensor_name_map`` (``blk.N.attn_q.weight``...), PyTorch row-major
  layout (GGUF lists dimensions innermost first; the gguf writer reverses them);
- for the llama architecture, the rows of Q and K are reordered per head from the rotate-half
  layout transformers uses to the interleaved pairs llama.cpp's RoPE rotates;
- norms and other 1-D tensors stay f32 whatever the file type; q8_0 needs rows divisible by 32
  (others fall back to f16);
- tied output embeddings are omitted (llama.cpp then reuses ``token_embd``);
- a byte-level BPE vocabulary as ``gpt2`` tokens, merges and token types, plus the pre-tokenizer
  name that selects llama.cpp's split regex, the special token ids and the chat template.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from hizli import _log
from hizli.export.gguf_vocab import add_tokenizer, tokenizer_metadata
from hizli.export.ollama import ollama_modelfile

BUILT_IN = ("f32", "f16", "bf16", "q8_0")
# llama-quantize's type names (lower case) that hizli passes through
EXTERNAL = (
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "q2_k",
    "q2_k_s",
    "q3_k_s",
    "q3_k_m",
    "q3_k_l",
    "q4_k_s",
    "q4_k_m",
    "q5_k_s",
    "q5_k_m",
    "q6_k",
    "iq2_xxs",
    "iq2_xs",
    "iq2_s",
    "iq2_m",
    "iq3_xxs",
    "iq3_xs",
    "iq3_s",
    "iq3_m",
    "iq4_nl",
    "iq4_xs",
    "iq1_s",
    "iq1_m",
    "tq1_0",
    "tq2_0",
)
# Unsloth's names for the common choices, so recipe code runs unchanged
ALIASES = {
    "not_quantized": "f16",
    "fast_quantized": "q8_0",
    "quantized": "q4_k_m",
    "fp16": "f16",
    "float16": "f16",
    "bfloat16": "bf16",
    "fp32": "f32",
    "float32": "f32",
    "q8": "q8_0",
}
QUANTIZE_ENV = "LLAMA_QUANTIZE"


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str  # gguf.MODEL_ARCH_NAMES value
    permute_qk: bool  # rotate-half -> interleaved RoPE rows (llama.cpp's "norm" RoPE)


ARCHS = {
    "LlamaForCausalLM": ArchSpec("llama", True),
    "MistralForCausalLM": ArchSpec("llama", True),
    "Qwen2ForCausalLM": ArchSpec("qwen2", False),
    "Qwen3ForCausalLM": ArchSpec("qwen3", False),
}


def normalize_quantization(method: str) -> str:
    """Lower-case type name from a user's spelling ('Q8_0', 'fast_quantized', ...)."""
    key = str(method).strip().lower()
    key = ALIASES.get(key, key)
    if key not in BUILT_IN and key not in EXTERNAL:
        raise ValueError(
            f"quantization_method={method!r} is not a GGUF type hizli knows. Built in: {', '.join(BUILT_IN)}; "
            f"through llama.cpp's llama-quantize: {', '.join(EXTERNAL[:12])}, ...; "
            "Unsloth's names not_quantized, fast_quantized and quantized also work"
        )
    return key


def find_llama_quantize() -> str | None:
    """``$LLAMA_QUANTIZE`` if set, else ``llama-quantize`` on PATH, else None."""
    env = os.environ.get(QUANTIZE_ENV)
    if env:
        if not (os.path.isfile(env) and os.access(env, os.X_OK)):
            raise ValueError(
                f"{QUANTIZE_ENV}={env!r} is not an executable file; point it at llama.cpp's llama-quantize"
            )
        return env
    return shutil.which("llama-quantize")


def _missing_quantize_message(method: str) -> str:
    return (
        f"quantization_method={method!r} needs llama.cpp's llama-quantize program, which was not found "
        f"(looked at ${QUANTIZE_ENV} and PATH). Build it once: `git clone https://github.com/ggml-org/llama.cpp "
        "&& cmake -S llama.cpp -B llama.cpp/build && cmake --build llama.cpp/build --target llama-quantize -j`, "
        f"then put llama.cpp/build/bin on PATH or set {QUANTIZE_ENV}=/path/to/llama-quantize. "
        f"Or use a type hizli writes itself: {', '.join(BUILT_IN)}"
    )


def gguf_file_name(stem: str, method: str) -> str:
    return f"{stem}.{method.upper()}.gguf"


def save_gguf(
    model,
    save_directory: str | os.PathLike,
    tokenizer=None,
    quantization_method: str | Sequence[str] = "q8_0",
    *,
    file_stem: str | None = None,
    modelfile: bool = True,
    overwrite: bool = True,
    progress: bool = False,
    **unknown: Any,
) -> list[Path]:
    """Merge the LoRA adapter and write one GGUF file per quantization method, plus an Ollama Modelfile.

    Args:
        model: a ``PeftModel`` (merged on the fly, never modified) or a transformers causal LM of a
            supported architecture (Llama, Mistral, Qwen2, Qwen3).
        save_directory: output folder, written through a staging folder and moved into place.
        tokenizer: the model's tokenizer (byte-level BPE); its vocabulary, special tokens and chat
            template go into the file's metadata.
        quantization_method: ``"f32"``, ``"f16"``, ``"bf16"``, ``"q8_0"`` (written by hizli), any
            llama-quantize type such as ``"q4_k_m"``, or a list of them.
        file_stem: file name before ``.<TYPE>.gguf``; default: the output folder's name.
        modelfile: also write an Ollama ``Modelfile`` for the first file.
        overwrite: replace files in a non-empty folder (``False``: refuse with a ValueError).
        progress: show a tqdm bar over the tensors.

    Returns:
        Paths of the GGUF files, in the order asked for.
    """
    if unknown:
        raise TypeError(f"save_pretrained_gguf() got unexpected argument(s): {', '.join(sorted(unknown))}")
    if tokenizer is None:
        raise ValueError(
            "save_pretrained_gguf needs the tokenizer (GGUF files carry the vocabulary): "
            "model.save_pretrained_gguf(dir, tokenizer, quantization_method='q8_0')"
        )
    methods = [quantization_method] if isinstance(quantization_method, str) else list(quantization_method)
    if not methods:
        raise ValueError("quantization_method=[]: name at least one type, e.g. 'q8_0'")
    methods = list(dict.fromkeys(normalize_quantization(m) for m in methods))
    quantize_bin = None
    if any(m in EXTERNAL for m in methods):
        quantize_bin = find_llama_quantize()
        if quantize_bin is None:
            raise ValueError(_missing_quantize_message(next(m for m in methods if m in EXTERNAL)))
    spec = arch_spec(model)
    vocab = tokenizer_metadata(tokenizer, model)  # fails early on unsupported tokenizers
    from hizli.export.staging import staged_output

    target = Path(save_directory).expanduser()
    stem = file_stem or target.resolve().name or "model"
    with staged_output(target, overwrite=overwrite) as staging:
        written: dict[str, Path] = {}
        for method in [m for m in methods if m in BUILT_IN]:
            written[method] = staging / gguf_file_name(stem, method)
            write_gguf(model, written[method], vocab, method, spec=spec, name=stem, progress=progress)
        external = [m for m in methods if m in EXTERNAL]
        if external:
            from hizli.export.merge import compute_dtype

            import torch

            base_type = "bf16" if compute_dtype(model) == torch.bfloat16 else "f16"
            source = written.get(base_type)
            scratch = None
            if source is None:
                scratch = staging / f".{stem}.{base_type}.tmp.gguf"
                write_gguf(model, scratch, vocab, base_type, spec=spec, name=stem, progress=progress)
                source = scratch
            for method in external:
                written[method] = staging / gguf_file_name(stem, method)
                run_llama_quantize(quantize_bin, source, written[method], method)
            if scratch is not None:
                scratch.unlink()
        if modelfile:
            first = written[methods[0]]
            (staging / "Modelfile").write_text(ollama_modelfile(first.name, tokenizer))
    return [target / written[m].name for m in methods]


def run_llama_quantize(binary: str, source: Path, dest: Path, method: str) -> None:
    """``llama-quantize SOURCE DEST TYPE``; a failure raises with the tool's last output lines."""
    cmd = [binary, str(source), str(dest), method.upper()]
    _log.info(f"running {' '.join(cmd)}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not dest.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"llama-quantize failed (exit code {proc.returncode}) making {method}:\n{tail}")


# --------------------------------------------------------------------------------------------------
# the model


def arch_spec(model) -> ArchSpec:
    from hizli.export.merge import unwrap

    base = unwrap(model)
    archs = getattr(base.config, "architectures", None) or [type(base).__name__]
    for a in archs:
        if a in ARCHS:
            return ARCHS[a]
    raise ValueError(
        f"GGUF export supports {', '.join(ARCHS)}; this model is {archs[0]}. Save it with "
        "save_pretrained_merged and convert that folder with llama.cpp's convert_hf_to_gguf.py"
    )


def _rope_parameters(config) -> dict:
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rp = dict(rp)
    if "rope_theta" not in rp and getattr(config, "rope_theta", None) is not None:
        rp["rope_theta"] = config.rope_theta
    return rp


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llama3_rope_factors(config) -> "Any | None":
    """Per-frequency divisors for Llama 3.1/3.2 RoPE scaling (llama.cpp's ``rope_freqs`` tensor).

    Shape:
        ``(head_dim // 2,)``; llama.cpp divides each RoPE frequency by its factor. Long wavelengths
        are divided by ``factor``, short ones kept, and the band between is blended smoothly.
    """
    import torch

    rp = _rope_parameters(config)
    if rp.get("rope_type", rp.get("type")) != "llama3":
        return None
    dim = _head_dim(config)
    base = float(rp["rope_theta"])
    factor = float(rp["factor"])
    low, high = float(rp["low_freq_factor"]), float(rp["high_freq_factor"])
    old_ctx = float(rp["original_max_position_embeddings"])
    freqs = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    wavelen = 2 * math.pi / freqs
    smooth = ((old_ctx / wavelen - low) / (high - low)).clamp(0, 1)
    # smooth = 1 for short wavelengths (kept), 0 for long ones (divided by factor)
    divisor = 1.0 / (smooth + (1 - smooth) / factor)
    return divisor.to(torch.float32)


def _permute_rows(w, n_head: int):
    """Reorder the rows of a Q or K projection from rotate-half to interleaved RoPE pairs.

    Shape:
        w: ``(n_head * head_dim, in)`` (or ``(n_head * head_dim,)`` for a bias); same shape out.
        Within each head, rows ``[0..d/2)`` and ``[d/2..d)`` are the two halves that
        transformers rotates together; llama.cpp rotates rows ``(2i, 2i+1)``.
    """
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _metadata(writer, config, spec: ArchSpec, name: str, file_type: int, vocab_size: int) -> None:
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    rp = _rope_parameters(config)
    if rp.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(rp["rope_theta"]))
    import gguf

    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rp["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rp["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rp["original_max_position_embeddings"]))
    elif rope_type not in ("default", "llama3", None):
        raise ValueError(f"rope type {rope_type!r} has no GGUF equivalent in hizli's writer yet")
    writer.add_vocab_size(int(vocab_size))
    writer.add_file_type(int(file_type))


# --------------------------------------------------------------------------------------------------
# tensors


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def _tensor_type(method: str, shape: tuple[int, ...]):
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) < 2 or method == "f32":
        return T.F32
    if method == "q8_0":
        return T.Q8_0 if shape[-1] % 32 == 0 else T.F16
    return {"f16": T.F16, "bf16": T.BF16}[method]


def _to_bytes(t, qtype):
    """Convert an fp32 CPU tensor to the numpy array the gguf writer stores for ``qtype``."""
    import gguf
    import numpy as np
    import torch

    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return t.to(torch.float32).numpy()
    if qtype == T.F16:
        return t.to(torch.float16).numpy()
    if qtype == T.BF16:
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
    assert qtype == T.Q8_0
    return quantize_q8_0(t).numpy()


def quantize_q8_0(t, chunk_blocks: int = 1 << 16):
    """ggml's Q8_0 with torch: blocks of 32 along the last dim -> fp16 scale + 32 int8, 34 bytes a block.

    Matches ggml's reference quantizer bit for bit (scale ``amax / 127``, values ``x * (1 / scale)``
    rounded half away from zero). Chunks of 64k blocks (8 MiB) stay mostly in cache: 3-4x faster than one
    pass over the whole tensor, and faster than the numpy quantizer in the gguf package.

    Shape:
        t: ``(..., k)`` float with ``k % 32 == 0`` -> uint8 ``(..., k // 32 * 34)``.
    """
    import torch

    shape = t.shape
    blocks = t.reshape(-1, 32)
    out = torch.empty(blocks.shape[0], 34, dtype=torch.uint8)
    for start in range(0, blocks.shape[0], chunk_blocks):
        b = blocks[start : start + chunk_blocks].to(torch.float32)
        d = b.abs().amax(dim=1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        x = b * inv
        a = x.abs()
        q = a.floor()
        q += (a - q) >= 0.5  # exact: a - floor(a) and the comparison round nothing
        q.copysign_(x)
        out[start : start + chunk_blocks, :2] = d.to(torch.float16).view(torch.uint8)
        out[start : start + chunk_blocks, 2:] = q.to(torch.int8).view(torch.uint8)
    return out.reshape(*shape[:-1], shape[-1] // 32 * 34)


@dataclass
class _GGUFTensor:
    name: str
    shape: tuple[int, ...]
    qtype: Any
    load: Callable[[], Any]  # -> fp32 CPU tensor, already in llama.cpp's layout


def _gguf_tensors(model, spec: ArchSpec, method: str) -> list[_GGUFTensor]:
    import gguf
    import torch

    from hizli.export.merge import merge_plan

    plan = merge_plan(model)
    config = plan.config
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == spec.gguf_arch)
    names = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    out: list[_GGUFTensor] = []
    factors = llama3_rope_factors(config) if spec.gguf_arch == "llama" else None
    if factors is not None:
        out.append(
            _GGUFTensor("rope_freqs.weight", tuple(factors.shape), gguf.GGMLQuantizationType.F32, lambda f=factors: f)
        )
    for t in plan.tensors:
        gname = names.get_name(t.name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ValueError(f"tensor {t.name!r} has no GGUF name for the {spec.gguf_arch} architecture")
        heads = None
        if spec.permute_qk and re.search(r"\.attn_q\.(weight|bias)$", gname):
            heads = n_head
        elif spec.permute_qk and re.search(r"\.attn_k\.(weight|bias)$", gname):
            heads = n_kv

        def load(t=t, heads=heads):
            w = t.load(torch.float32)
            return _permute_rows(w, heads) if heads else w

        out.append(_GGUFTensor(gname, t.shape, _tensor_type(method, t.shape), load))
    return out


def write_gguf(
    model,
    path: Path,
    vocab: dict,
    method: str,
    *,
    spec: ArchSpec | None = None,
    name: str = "model",
    progress: bool = False,
) -> Path:
    """Write one GGUF file of a built-in type; tensors are merged and converted one at a time."""
    import gguf
    from tqdm.auto import tqdm

    from hizli.export.merge import unwrap

    spec = spec or arch_spec(model)
    config = unwrap(model).config
    tensors = _gguf_tensors(model, spec, method)
    writer = gguf.GGUFWriter(str(path), spec.gguf_arch)
    try:
        _metadata(writer, config, spec, name, getattr(gguf.LlamaFileType, _FILE_TYPES[method]), len(vocab["tokens"]))
        add_tokenizer(writer, vocab)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for t in tensors:
            _declare(writer, t)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = tqdm(total=len(tensors), desc=f"writing {path.name}", unit="tensor", disable=not progress)
        for t in tensors:
            array = _to_bytes(t.load(), t.qtype)
            write_tensor(writer, array)
            bar.update(1)
        bar.close()
    finally:
        writer.close()
    return path


def _declare(writer, t: _GGUFTensor) -> None:
    import gguf
    import numpy as np

    T = gguf.GGMLQuantizationType
    if t.qtype in (T.F32, T.F16):
        dtype = np.float32 if t.qtype == T.F32 else np.float16
        writer.add_tensor_info(t.name, t.shape, np.dtype(dtype), math.prod(t.shape) * np.dtype(dtype).itemsize)
    else:
        byte_shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
        writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=t.qtype)


def write_tensor(writer, array) -> None:
    """One tensor's bytes, in declaration order (a seam for tests that inject a crash)."""
    writer.write_tensor_data(array)
