"""Route a transformers model through hizli's fast ops, using transformers' documented hooks.

Attention: we register an attention function and a mask function under the name "hizli"
(``AttentionInterface`` / ``AttentionMaskInterface``) and select it with the model's
``_attn_implementation``. For a padding-free batch (the trainer passes ``cu_seq_lens_q`` and friends,
the names transformers uses for packed sequences) the function runs variable-length causal attention
that never crosses a sequence boundary, and the mask function builds no ``T x T`` mask at all.
Everything else (padded batches, generation with a KV cache) goes to transformers' own SDPA path.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch

if TYPE_CHECKING:
    from hizli.models.record import HizliState

NAME = "hizli"
_varlen = contextvars.ContextVar("hizli_varlen", default=False)
_mlp_unread = contextvars.ContextVar("hizli_mlp_unread", default=False)


@contextmanager
def padding_free() -> Iterator[None]:
    """Mark the forward passes inside as padding-free (no dense mask is built for them)."""
    token = _varlen.set(True)
    try:
        yield
    finally:
        _varlen.reset(token)


@contextmanager
def mlp_outputs_unread() -> Iterator[None]:
    """Mark the forward passes inside as recomputations for backward whose MLP outputs nobody reads
    (``hizli.models.checkpointing`` sets it around an offloaded layer that ends in its residual add):
    the fused MLP then defers all its work to backward (``lora_mlp(output_unread=True)``)."""
    token = _mlp_unread.set(True)
    try:
        yield
    finally:
        _mlp_unread.reset(token)


def _attention(
    module, query, key, value, attention_mask, *, dropout: float = 0.0, scaling: float | None = None, **kwargs: Any
):
    """query ``[B, Hq, T, D]``, key/value ``[B, Hkv, T, D]`` -> ``([B, T, Hq, D], None)``."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or attention_mask is not None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    from hizli.kernels.attention import varlen_attention

    if dropout and module.training:
        raise ValueError(
            "attention dropout is not supported on hizli's padding-free path; "
            "set the model config's attention_dropout to 0"
        )
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    out = varlen_attention(q, k, v, cu, int(kwargs.get("max_length_q") or 0), scale=scaling)
    return out.unsqueeze(0), None


def _mask(*args: Any, **kwargs: Any):
    if _varlen.get():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, _mask)


def use_hizli_attention(model: torch.nn.Module) -> bool:
    """Select hizli's attention on ``model`` (and every sub-config); False if the model can't."""
    register()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or not getattr(base, "_supports_attention_backend", False):
        return False
    current = getattr(config, "_attn_implementation", None)
    if current not in (None, "sdpa", "eager", NAME):
        return False  # the user chose something else (flash_attention_2, flex): leave it
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(NAME)
    else:
        config._attn_implementation = NAME
    return True


# ------------------------------------------------------------------------------------------------
# Fused ops on the training path, per module instance (other models in the process are untouched).

# Classes whose semantics the kernels reproduce exactly: RMSNorm as ``weight * normed`` (not Gemma's
# ``1 + weight``), an MLP ``down(act(gate(x)) * up(x))`` with SiLU, attention with q/k/v/o projections
# and rotate-half RoPE and no q/k norms.
_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"}
_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}
_ATTENTIONS = {"LlamaAttention", "MistralAttention", "Qwen2Attention"}


def _norm_forward(self, hidden_states):
    from hizli.kernels.rms_norm import rms_norm

    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_QKV = ("q_proj", "k_proj", "v_proj")


def _make_mlp_forward(record: HizliState):
    def forward(self, x):
        if self.training:  # eval and generation keep bitsandbytes' inference kernels (see fused_lora)
            from hizli.kernels.lora_mlp import lora_mlp
            from hizli.models.fused_lora import group_parts

            parts = group_parts(self, _MLP_PROJECTIONS)
            if parts is not None:
                return lora_mlp(
                    x,
                    parts,
                    copies=record.compute_copies,
                    output_unread=_mlp_unread.get(),
                    in_pieces=record.defer_offloaded_mlp,
                )
        from hizli.kernels.swiglu import swiglu

        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))

    return forward


def _make_attention_forward(original, record: HizliState):
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        # generation (a cache), eval and attention kinds we do not know keep transformers' own path
        impl = self.config._attn_implementation
        if (
            not self.training
            or kwargs.get("cache") is not None
            or kwargs.get("past_key_values") is not None
            or impl not in ALL_ATTENTION_FUNCTIONS
        ):
            return original(
                hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, **kwargs
            )
        from hizli.kernels.lora_qkv import lora_qkv
        from hizli.kernels.rope import rope
        from hizli.models.fused_lora import group_parts

        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)
        qkv_parts = group_parts(self, _QKV, base_bias=True)
        cos, sin = position_embeddings
        if qkv_parts is not None and not (cos.requires_grad or sin.requires_grad):
            # q and k come out rotated, in the group's own output buffer
            q, k, v = (
                t.view(shape).transpose(1, 2)
                for t in lora_qkv(hidden_states, qkv_parts, rope=(cos, sin), copies=record.compute_copies)
            )
        else:
            q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
            k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
            v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
            q, k = rope(q, k, cos, sin)
        out, weights = ALL_ATTENTION_FUNCTIONS[impl](
            self, q, k, v, attention_mask, dropout=self.attention_dropout, scaling=self.scaling, **kwargs
        )
        out = out.reshape(*input_shape, -1).contiguous()
        o_parts = group_parts(self, ("o_proj",))
        if o_parts is None:
            return self.o_proj(out), weights
        return lora_qkv(out, o_parts, copies=record.compute_copies)[0], weights

    return forward


def use_fused_ops(model: torch.nn.Module) -> dict[str, int]:
    """Route RMSNorm, SwiGLU MLPs and RoPE of known classes through hizli's kernels (which dispatch
    to Triton on CUDA and to their references elsewhere). Returns how many modules of each kind."""
    import types

    from hizli.models.record import state_of

    record = state_of(model)  # the fused LoRA layers read the training run's weight copies there
    counts = {"rms_norm": 0, "swiglu": 0, "rope": 0}
    for module in model.modules():
        name = type(module).__name__
        if routed_through_hizli(module):
            continue
        if name in _NORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_norm_forward, module)
            counts["rms_norm"] += 1
        elif name in _MLPS and getattr(getattr(module, "config", None), "hidden_act", None) in ("silu", "swish"):
            module.forward = types.MethodType(_make_mlp_forward(record), module)
            counts["swiglu"] += 1
        elif name in _ATTENTIONS and not hasattr(module, "q_norm"):
            module.forward = types.MethodType(_make_attention_forward(module.forward, record), module)
            counts["rope"] += 1
        else:
            continue
    return counts


def routed_through_hizli(module: torch.nn.Module) -> bool:
    """Whether ``use_fused_ops`` replaced ``module``'s forward (known by the forward itself, so
    nothing is written on the module)."""
    func = getattr(module.__dict__.get("forward"), "__func__", None)
    return getattr(func, "__qualname__", None) in _FUSED_FORWARDS


_FUSED_FORWARDS = {
    _norm_forward.__qualname__,
    f"{_make_mlp_forward.__qualname__}.<locals>.forward",
    f"{_make_attention_forward.__qualname__}.<locals>.forward",
}


def model_uses_fused_lora(model: torch.nn.Module) -> bool:
    """Whether every LoRA projection of ``model``'s decoder runs through the fused ops: its MLPs and
    attention modules routed through hizli (``use_fused_ops``), their LoRA layers qualifying, and
    ``HIZLI_KERNELS`` not sending the ops to their references. The memory plan's activation sizes
    depend on it: a projection PEFT's layers run (a trained bias, dropout, DoRA) keeps more per token, so
    such a model is planned as unfused."""
    from hizli.kernels.dispatch import kernels_mode
    from hizli.models.fused_lora import group_parts

    if kernels_mode() == "reference":
        return False
    mlp = attention = None
    for module in model.modules():
        if mlp is None and hasattr(module, "gate_proj") and hasattr(module, "down_proj"):
            mlp = module
        if attention is None and hasattr(module, "q_proj") and hasattr(module, "o_proj"):
            attention = module
    groups = [(mlp, ("gate_proj", "up_proj", "down_proj"), False)]
    if attention is not None:
        groups += [(attention, _QKV, True), (attention, ("o_proj",), False)]
    return mlp is not None and all(
        routed_through_hizli(module) and group_parts(module, names, bias) is not None for module, names, bias in groups
    )
