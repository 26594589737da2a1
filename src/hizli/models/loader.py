"""Load a causal LM and its tokenizer the way the recipe asks: hub id, folder, .gguf, or embedded name.

``load(...)`` is what ``FastLanguageModel.from_pretrained`` calls. It resolves where the weights
come from, picks the dtype, quantizes to NF4 when asked and possible, and fixes the tokenizer's pad
token. What it did is recorded on the model as ``model.hizli.info`` and shown by the memory report.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hizli import _log
from hizli._startup import gc_paused, import_bitsandbytes
from hizli.models.embedded import EMBEDDED, embedded_path

# Tried in order when the tokenizer has no pad token or pads with EOS. Llama 3.1/3.2 reserve
# <|finetune_right_pad_id|> for exactly this.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>", "<unk>")


@dataclass
class LoadInfo:
    """What ``load`` actually did; printed in reports and used to reload saved adapters."""

    source: str  # what the user passed, absolutised for local paths
    kind: str  # embedded | gguf | folder | hub | adapter
    dtype: str
    device: str
    max_seq_length: int
    load_in_4bit_requested: bool
    quantization: str  # "nf4" or "none (<reason>)"
    adapter: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def is_4bit(self) -> bool:
        return self.quantization == "nf4"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


_DTYPE_NAMES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}


def resolve_dtype(dtype: Any, device: str):
    """``None``/"auto": bf16 where the GPU supports it, else fp16 on a GPU, fp32 on a CPU."""
    import torch

    if dtype is None or dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        name = str(dtype).replace("torch.", "")
    else:
        name = _DTYPE_NAMES.get(str(dtype).lower())
    if name not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype={dtype!r} is not supported; use None (auto), 'bfloat16', 'float16' or 'float32'")
    if name == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"dtype='bfloat16' was asked for, but {torch.cuda.get_device_name()} has no bfloat16 "
            "support; use dtype=None (picks float16 here) or dtype='float16'"
        )
    return getattr(torch, name)


def _bnb_4bit_problem(device: str) -> str | None:
    """Why NF4 cannot be used here, or None if it can."""
    try:
        import_bitsandbytes()
    except Exception as e:  # ImportError, or a broken native library
        return f"bitsandbytes cannot be imported ({type(e).__name__}: {e})"
    return None


@dataclass
class Source:
    kind: str  # embedded | gguf | folder | hub | adapter
    path: str  # what to hand to transformers (folder or hub id)
    source: str  # what to record


def resolve_source(model_name: str) -> Source:
    """Work out what ``model_name`` names. Local paths win over hub ids of the same spelling."""
    if not isinstance(model_name, (str, os.PathLike)) or not str(model_name).strip():
        raise ValueError(
            f"model_name={model_name!r}: pass a hub id (e.g. 'unsloth/Llama-3.2-3B-Instruct'), a local "
            f"folder, a .gguf file, or an embedded model ({', '.join(EMBEDDED)})"
        )
    name = str(model_name)
    embedded = embedded_path(name) if name.lower() in EMBEDDED else None
    if embedded is not None:
        from hizli.models.gguf_cache import converted_folder

        return Source("embedded", str(converted_folder(embedded)), name.lower())
    p = Path(name).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ValueError(f"model_name={name!r} is a file but not a .gguf file; pass its folder instead")
        from hizli.models.gguf_cache import converted_folder

        return Source("gguf", str(converted_folder(p)), str(p.resolve()))
    if p.is_dir():
        if (p / "adapter_config.json").is_file():
            return Source("adapter", str(p.resolve()), str(p.resolve()))
        if (p / "config.json").is_file():
            return Source("folder", str(p.resolve()), str(p.resolve()))
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return resolve_source(str(ggufs[0]))
        raise ValueError(
            f"model folder {str(p)!r} holds neither config.json (a transformers model), "
            "adapter_config.json (a LoRA adapter) nor a single .gguf file"
        )
    looks_local = (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or name.endswith(".gguf")
        or ("/" in name and p.parent.is_dir())
    )
    near = _near_miss(p)
    if looks_local or (near and "/" not in name):  # a typo of a local or embedded name is not a hub id
        hint = f"; did you mean {near!r}?" if near else ""
        raise FileNotFoundError(f"model_name={name!r}: no such file or folder, and not an embedded model{hint}")
    return Source("hub", name, name)


def _near_miss(p: Path) -> str | None:
    """The local entry (beside ``p``) or embedded model name that ``p`` most likely misspells, if any."""
    import difflib

    folder = p.parent if str(p.parent) not in ("", ".") else Path(".")
    try:
        local = [e.name for e in folder.iterdir()] if folder.is_dir() else []
    except OSError:
        local = []
    name = p.name
    embedded = [e for e in EMBEDDED if len(name) >= 4 and (e.startswith(name.lower()) or name.lower().startswith(e))]
    if embedded and p.parent == Path("."):
        return embedded[0]
    found = difflib.get_close_matches(name, local, n=1, cutoff=0.8)
    if found:
        return str(folder / found[0]) if folder != Path(".") else found[0]
    if p.parent == Path("."):
        found = difflib.get_close_matches(name.lower(), list(EMBEDDED), n=1, cutoff=0.6)
        return found[0] if found else None
    return None


def hub_unavailable(name: str, revision: str | None = None) -> str | None:
    """Why the Hugging Face Hub cannot provide ``name`` now, or None: offline mode, or the Hub's host
    cannot be reached (checked with one short connection instead of the client's minute of retries).
    A model already in the local Hugging Face cache, or a configured proxy, is left to the client."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return None
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1 is set and it is not in the local Hugging Face cache"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    import socket
    from urllib.parse import urlparse

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection(
            (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=HUB_PROBE_SECONDS
        ).close()
    except OSError as e:
        return f"the Hub ({constants.ENDPOINT}) cannot be reached from here ({e.strerror or e})"
    return None


HUB_PROBE_SECONDS = 5.0  # one TCP connect; a reachable Hub answers in well under a second


@gc_paused()  # transformers and bitsandbytes import here and the model is built: see hizli._startup
def load(
    model_name: str,
    max_seq_length: int = 2048,
    dtype: Any = None,
    load_in_4bit: bool = True,
    *,
    token: str | None = None,
    device_map: Any = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    revision: str | None = None,
    attn_implementation: str = "sdpa",
    adapter_trainable: bool = True,
    fast_path: bool = True,
):
    """Load ``(model, tokenizer)``; see ``FastLanguageModel.from_pretrained`` for the arguments."""
    if not isinstance(max_seq_length, int) or max_seq_length < 8:
        raise ValueError(f"max_seq_length={max_seq_length!r} must be an integer >= 8 (the recipe uses 2048)")
    src = resolve_source(model_name)
    if src.kind == "hub":
        problem = hub_unavailable(src.path, revision)
        if problem is not None:
            raise OSError(
                f"model_name={src.source!r} is not a local folder, a file or an embedded model "
                f"({', '.join(EMBEDDED)}), so it would come from the Hugging Face Hub, but {problem}. "
                "Pass a local folder or .gguf file, or connect and try again"
            )
    if src.kind == "adapter":
        return _load_adapter(
            src,
            max_seq_length=max_seq_length,
            dtype=dtype,
            load_in_4bit=load_in_4bit,
            token=token,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
            attn_implementation=attn_implementation,
            trainable=adapter_trainable,
            fast_path=fast_path,
        )

    seconds = _Stopwatch()  # where loading goes: model.hizli.load_seconds, shown by `hizli bench`
    if device_map in ("auto", "balanced", "sequential") and os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        raise ValueError(
            f"device_map={device_map!r} under torchrun spreads one model over this host's GPUs, so every "
            "rank would load it over the same GPUs and train alone. Leave device_map out: each rank "
            "then loads its model on cuda:LOCAL_RANK (or use parallel='fsdp' for a model one GPU cannot hold)"
        )
    device = default_device() if device_map is None else _device_of(device_map)
    torch_dtype = resolve_dtype(dtype, device)
    if fast_path:  # first, so that it compiles while transformers and bitsandbytes import
        _start_kernel_warmup(src, device, torch_dtype, bool(load_in_4bit), revision)
    seconds.lap("setup")
    from transformers import AutoModelForCausalLM

    quantization = "none (load_in_4bit=False)"
    kwargs: dict[str, Any] = {}
    if load_in_4bit:
        problem = _bnb_4bit_problem(device)
        if problem is None:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch_dtype,
            )
            quantization = "nf4"
        else:
            quantization = f"none ({problem})"
            _log.warn_once(
                "no-4bit",
                f"load_in_4bit=True but {problem}: loading in full precision ({_short(torch_dtype)}) "
                "instead; memory use will be about 4x higher. Install bitsandbytes>=0.46 for 4-bit.",
            )
    hub = dict(token=token, revision=revision) if src.kind == "hub" else {}
    seconds.lap("imports")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src.path,
            dtype=torch_dtype,
            device_map=device_map if device_map is not None else {"": device},
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
            **kwargs,
            **hub,
        )
    except OSError as e:
        raise _explain_load_error(src, e, allow_pickle) from e
    if _is_prequantized_4bit(model) and quantization != "nf4":
        quantization = "nf4"
    seconds.lap("weights")
    tokenizer = load_tokenizer(
        src.path,
        token=token if src.kind == "hub" else None,
        trust_remote_code=trust_remote_code,
        max_seq_length=max_seq_length,
    )
    from hizli.models.record import state_of

    record = state_of(model)
    record.info = LoadInfo(
        source=src.source,
        kind=src.kind,
        dtype=_short(torch_dtype),
        device=device,
        max_seq_length=max_seq_length,
        load_in_4bit_requested=bool(load_in_4bit),
        quantization=quantization,
    )
    model.max_seq_length = max_seq_length
    seconds.lap("tokenizer")
    from hizli.models.patch import use_hizli_attention

    if fast_path and attn_implementation == "sdpa":
        use_hizli_attention(model)
    if fast_path and device.startswith("cuda"):
        from hizli.models import warmup
        from hizli.models.patch import use_fused_ops

        record.fused_ops = use_fused_ops(model)
        warmup.prime_in_background(device)
    from hizli.models.inference import accept_encodings_in_generate

    accept_encodings_in_generate(model)
    seconds.lap("fast_path")
    record.load_seconds = seconds.laps
    return model, tokenizer


class _Stopwatch:
    """Seconds between successive ``lap(name)`` calls, in order."""

    def __init__(self) -> None:
        import time

        self._clock = time.perf_counter
        self._last = self._clock()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = self._clock()
        self.laps[name] = round(now - self._last, 3)
        self._last = now


def _start_kernel_warmup(src: Source, device: str, dtype, nf4: bool, revision: str | None = None) -> None:
    """Compile the fast path's kernels in the background while the weights load (see
    ``hizli.models.warmup``). It needs the model's config.json on disk, read without importing
    transformers (most of what there is to overlap): a local folder's, or a hub model's already in
    the Hugging Face cache (a first download is long enough for the kernels to compile at first use).
    Any problem here only means the kernels compile at first use instead."""
    from types import SimpleNamespace

    from hizli.models import warmup

    if not warmup.enabled(device):
        return
    try:
        config_file = _local_config_file(src, revision)
        if config_file is None:
            return
        config = json.loads(config_file.read_text(), object_hook=lambda d: SimpleNamespace(**d))
        warmup.start(config, dtype, device, nf4)
    except Exception as e:  # noqa: BLE001 - from_pretrained, next, reports real problems with the model
        _log.debug(f"no background kernel compile: {e!r}")


def _local_config_file(src: Source, revision: str | None) -> Path | None:
    """``config.json`` of a folder or of a hub model in the local cache (no network), else None."""
    if src.kind == "folder":
        path = Path(src.path) / "config.json"
        return path if path.is_file() else None
    if src.kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(src.path, "config.json", revision=revision)
        return Path(found) if isinstance(found, str) else None
    return None


def load_tokenizer(
    path: str, *, token: str | None = None, trust_remote_code: bool = False, max_seq_length: int | None = None
):
    """The tokenizer with a pad token distinct from EOS where the vocabulary has one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, token=token, trust_remote_code=trust_remote_code)
    set_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    if max_seq_length:
        tokenizer.model_max_length = max_seq_length
    return tokenizer


def set_pad_token(tokenizer) -> None:
    """Pad with a token that is not EOS, so EOS is never confused with padding."""
    eos = tokenizer.eos_token
    if tokenizer.pad_token is not None and tokenizer.pad_token != eos:
        return
    vocab = tokenizer.get_vocab()
    for candidate in PAD_CANDIDATES:
        if candidate in vocab and candidate != eos:
            tokenizer.pad_token = candidate
            return
    if tokenizer.pad_token is None:
        # No spare token: pad with EOS. Harmless for training here, since hizli's collators mask
        # padding by length, never by token id.
        tokenizer.pad_token = eos
        _log.warn_once("pad-eos", "the tokenizer has no spare token for padding; padding with EOS")


def _load_adapter(
    src: Source,
    *,
    max_seq_length,
    dtype,
    load_in_4bit,
    token,
    device_map,
    trust_remote_code,
    allow_pickle,
    attn_implementation,
    trainable,
    fast_path,
):
    from peft import PeftModel

    folder = Path(src.path)
    if not (folder / "adapter_model.safetensors").is_file() and not allow_pickle:
        pickled = [p.name for p in folder.glob("adapter_model.*") if p.suffix in (".bin", ".pt", ".pth")]
        raise ValueError(
            f"adapter folder {src.path!r} has no adapter_model.safetensors"
            + (
                f" (only {', '.join(pickled)}, a pickle file that can run code when loaded); pass "
                "allow_pickle=True if you trust it"
                if pickled
                else ""
            )
        )
    config = json.loads((folder / "adapter_config.json").read_text())
    base_name = config.get("base_model_name_or_path")
    if not base_name:
        raise ValueError(
            f"{src.path}/adapter_config.json does not say which base model it was trained on "
            "(base_model_name_or_path); load the base yourself and use peft.PeftModel.from_pretrained"
        )
    base, tokenizer = load(
        base_name,
        max_seq_length=max_seq_length,
        dtype=dtype,
        load_in_4bit=load_in_4bit,
        token=token,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        attn_implementation=attn_implementation,
        fast_path=fast_path,
    )
    from hizli.models.record import state_of

    record = state_of(base)
    model = PeftModel.from_pretrained(base, src.path, is_trainable=trainable)
    if any((Path(src.path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = load_tokenizer(src.path, trust_remote_code=trust_remote_code, max_seq_length=max_seq_length)
    assert record.info is not None and state_of(model) is record  # PEFT forwards model.hizli to the base
    record.info.adapter = src.path
    from hizli.models.lora import attach_methods

    attach_methods(model)
    return model, tokenizer


def _is_prequantized_4bit(model) -> bool:
    q = getattr(model.config, "quantization_config", None)
    if q is None:
        return False
    q = q if isinstance(q, dict) else q.to_dict()
    return bool(q.get("load_in_4bit")) and q.get("bnb_4bit_quant_type", "nf4") == "nf4"


def _device_of(device_map: Any) -> str:
    if isinstance(device_map, dict) and len(set(map(str, device_map.values()))) == 1:
        value = next(iter(device_map.values()))
        return f"cuda:{value}" if isinstance(value, int) else str(value)
    if isinstance(device_map, int):
        return f"cuda:{device_map}"
    if isinstance(device_map, str) and device_map not in ("auto", "balanced", "sequential"):
        return device_map
    return default_device()


def _short(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _explain_load_error(src: Source, e: OSError, allow_pickle: bool) -> Exception:
    text = str(e)
    if "safetensors" in text.lower() and not allow_pickle:
        return ValueError(
            f"{src.source!r} has no safetensors weights. hizli loads only safetensors or GGUF by default, "
            "because pickle files (.bin/.pt) can run code when loaded; pass allow_pickle=True if you "
            "trust this model"
        )
    if src.kind == "hub":
        return OSError(
            f"could not load {src.source!r} from the Hugging Face Hub ({text.splitlines()[0] if text else e!r}). "
            "Check the name and your network or HF_TOKEN, or pass a local folder or .gguf file"
        )
    return OSError(f"could not load the model at {src.path!r}: {text}")
