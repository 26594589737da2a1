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
from typing import Any, Iterator

import torch

NAME = "hizli"
_varlen = contextvars.ContextVar("hizli_varlen", default=False)


@contextmanager
def padding_free() -> Iterator[None]:
    """Mark the forward passes inside as padding-free (no dense mask is built for them)."""
    token = _varlen.set(True)
    try:
        yield
    finally:
        _varlen.reset(token)


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               **kwargs: Any):
    """query ``[B, Hq, T, D]``, key/value ``[B, Hkv, T, D]`` -> ``([B, T, Hq, D], None)``."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or attention_mask is not None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    from hizli.kernels.attention import varlen_attention

    if dropout and module.training:
        raise ValueError("attention dropout is not supported on hizli's padding-free path; "
                         "set the model config's attention_dropout to 0")
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
