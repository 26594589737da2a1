"""One forward pass over many sequences at once, each with its own place in a slot KV cache.

The server's engine calls :meth:`SlotModel.step` once per decode step with every running sequence:
those that are decoding contribute one token each, those still reading their prompt contribute a
chunk of it. All the tokens of a step go through the linear layers as one flat ``[T, hidden]``
matrix (no padding: the matmuls are where the time goes, and they see only real tokens). Attention
is the only per-sequence part: decode rows are batched over their slots with a length mask,
prompt chunks run causal attention against their own slot.

The cache is one tensor per layer for keys and one for values, ``[slots, kv_heads, capacity,
head_dim]``. Running sequences hold slots ``0..n-1`` (the engine keeps them packed, see
:meth:`SlotModel.move_slot`), so a padded decode attention reads ``cache[:n, :, :longest]``, a view.
Capacity grows by doubling up to the context length, and the cache is dropped when the server is
idle so that memory returns to what the weights need.

Works on decoder models built like Llama (Llama, Mistral, Qwen2/2.5 with q/k/v biases, Qwen3 with
q/k norms, SmolLM2), plain or wrapped in a PEFT LoRA model; several LoRA adapters are served in
one batch through PEFT's per-row ``adapter_names``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass
class Chunk:
    """What one sequence contributes to a step.

    Attributes:
        slot: its row in the KV cache.
        start: position of the first token of ``tokens`` (tokens before it are in the cache).
        tokens: token ids, one for a decode step, a prompt chunk otherwise.
        adapter: LoRA adapter name, or ``BASE_ADAPTER``.
    """

    slot: int
    start: int
    tokens: list[int]
    adapter: str = BASE_ADAPTER


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class SlotModel:
    """A causal LM run step by step over a packed set of sequences.

    Args:
        model: a transformers causal LM built like Llama, or a PEFT model around one.
        max_slots: most sequences decoded together.
        context: longest sequence (prompt + answer) a slot can hold.
    """

    def __init__(self, model: Any, max_slots: int, context: int) -> None:
        self.model = model
        self.peft = hasattr(model, "get_base_model") and hasattr(model, "peft_config")
        base = model.get_base_model() if self.peft else model
        inner = getattr(base, "model", None)
        layers = getattr(inner, "layers", None)
        if inner is None or layers is None or not hasattr(base, "lm_head") or not hasattr(inner, "rotary_emb"):
            raise ValueError(
                f"hizli serve runs decoder models built like Llama (model.layers, rotary_emb, lm_head); "
                f"{type(base).__name__} is not one. Export it as GGUF and serve it with llama.cpp instead"
            )
        self.inner, self.lm_head, self.layers = inner, base.lm_head, list(layers)
        cfg = base.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.vocab_size = cfg.vocab_size
        self.max_slots, self.context = max_slots, context
        self.device = next(base.parameters()).device
        self.dtype = inner.embed_tokens.weight.dtype
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):  # 4-bit: compute dtype
            self.dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        # Decode attention: one padded call over all rows with a length mask, or one call per row
        # without padding. On a 2-core CPU per row was faster at 16 and 32 rows (no work on the
        # padding, about 10-25% less attention time); on a GPU one launch beats many.
        self.padded_decode = self.device.type != "cpu"
        self.mixed = False  # True: rows may use different adapters (PEFT's per-row adapter_names)
        self.capacity = 0
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []

    # -- cache ---------------------------------------------------------------------------------

    def reserve(self, length: int) -> None:
        """Make every slot able to hold ``length`` tokens (grows by doubling, keeps the contents)."""
        if length <= self.capacity:
            return
        if length > self.context:
            raise ValueError(f"sequence of {length} tokens is longer than the context ({self.context})")
        new = min(self.context, max(length, 2 * self.capacity, 256))
        shape = (self.max_slots, self.n_kv, new, self.head_dim)
        grown_k, grown_v = [], []
        for i in range(len(self.layers)):
            # zeros, not empty: the padded decode attention reads past a row's length (masked out),
            # and uninitialised memory may hold NaN, which a mask does not remove (NaN * 0 = NaN)
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if self.capacity:
                k[:, :, : self.capacity] = self.k_cache[i]
                v[:, :, : self.capacity] = self.v_cache[i]
            grown_k.append(k)
            grown_v.append(v)
        self.k_cache, self.v_cache, self.capacity = grown_k, grown_v, new

    def release(self) -> None:
        """Drop the cache (the server is idle); the next step allocates it again."""
        self.k_cache, self.v_cache, self.capacity = [], [], 0

    @torch.inference_mode()  # the cache is made of inference tensors (allocated inside step)
    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` cached positions of slot ``src`` into slot ``dst``."""
        if length and self.capacity:
            for k, v in zip(self.k_cache, self.v_cache):
                k[dst, :, :length] = k[src, :, :length]
                v[dst, :, :length] = v[src, :, :length]

    # -- forward -------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, decode: list[Chunk], prefill: list[Chunk]) -> torch.Tensor:
        """Run one step; return next-token logits ``[len(decode) + len(prefill), vocab]`` (fp32).

        Row ``i`` of the result belongs to ``(decode + prefill)[i]`` and scores the token after
        its last one. Decode chunks must hold one token each and occupy slots ``0..len(decode)-1``
        in order (the engine keeps them packed).
        """
        chunks = decode + prefill
        assert chunks, "step() needs at least one sequence"
        assert all(c.slot == i and len(c.tokens) == 1 for i, c in enumerate(decode)), "decode slots not packed"
        self.reserve(max(c.start + len(c.tokens) for c in chunks))
        dev = self.device
        tokens = torch.tensor([t for c in chunks for t in c.tokens], device=dev)
        positions = torch.tensor([c.start + j for c in chunks for j in range(len(c.tokens))], device=dev)
        slots = torch.tensor([c.slot for c in chunks for _ in c.tokens], device=dev)
        lengths = [len(c.tokens) for c in chunks]
        kw = {"adapter_names": [c.adapter for c in chunks for _ in c.tokens]} if self.mixed else {}

        x = self.inner.embed_tokens(tokens)  # [T, hidden]
        cos, sin = self.inner.rotary_emb(x[None], positions[None])
        cos, sin = cos[0, :, None, :].to(self.dtype), sin[0, :, None, :].to(self.dtype)  # [T, 1, D]
        n_dec = len(decode)
        dec_lengths = torch.tensor([c.start + 1 for c in decode], device=dev)
        longest = int(dec_lengths.max()) if n_dec else 0
        dec_mask = (
            None
            if not self.padded_decode
            else (
                (torch.arange(longest, device=dev)[None, :] < dec_lengths[:, None])[:, None, None, :] if n_dec else None
            )
        )
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = _proj(attn.q_proj, h, kw).view(-1, self.n_heads, self.head_dim)
            k = _proj(attn.k_proj, h, kw).view(-1, self.n_kv, self.head_dim)
            v = _proj(attn.v_proj, h, kw).view(-1, self.n_kv, self.head_dim)
            if getattr(attn, "q_norm", None) is not None:  # Qwen3
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[slots, :, positions] = k.to(kc.dtype)
            vc[slots, :, positions] = v.to(vc.dtype)
            outs = []
            if n_dec and self.padded_decode:
                qd = q[:n_dec].to(kc.dtype).unsqueeze(2)  # [B, H, 1, D]
                o = F.scaled_dot_product_attention(
                    qd, kc[:n_dec, :, :longest], vc[:n_dec, :, :longest], attn_mask=dec_mask, enable_gqa=True
                )
                outs.append(o.reshape(n_dec, -1))
            elif n_dec:
                qd = q[:n_dec].to(kc.dtype).unsqueeze(2)
                for j, c in enumerate(decode):
                    end = c.start + 1
                    o = F.scaled_dot_product_attention(
                        qd[j : j + 1], kc[j : j + 1, :, :end], vc[j : j + 1, :, :end], enable_gqa=True
                    )
                    outs.append(o.reshape(1, -1))
            offset = n_dec
            for c, n in zip(prefill, lengths[n_dec:]):
                end = c.start + n
                qp = q[offset : offset + n].to(kc.dtype).transpose(0, 1)[None]  # [1, H, n, D]
                causal = torch.ones(n, end, dtype=torch.bool, device=dev).tril(diagonal=c.start)
                o = F.scaled_dot_product_attention(
                    qp,
                    kc[c.slot : c.slot + 1, :, :end],
                    vc[c.slot : c.slot + 1, :, :end],
                    attn_mask=causal,
                    enable_gqa=True,
                )
                outs.append(o[0].transpose(0, 1).reshape(n, -1))
                offset += n
            o = torch.cat(outs) if len(outs) > 1 else outs[0]
            x = x + _proj(attn.o_proj, o.to(x.dtype), kw)
            h = layer.post_attention_layernorm(x)
            x = x + self._mlp(layer.mlp, h, kw)
        last = torch.tensor([sum(lengths[: j + 1]) - 1 for j in range(len(chunks))], device=dev)
        h = self.inner.norm(x[last])
        return self.lm_head(h).float()

    @staticmethod
    def _mlp(mlp: Any, h: torch.Tensor, kw: dict) -> torch.Tensor:
        if kw and hasattr(mlp, "gate_proj"):  # per-row adapters must reach the projections themselves
            return _proj(mlp.down_proj, mlp.act_fn(_proj(mlp.gate_proj, h, kw)) * _proj(mlp.up_proj, h, kw), kw)
        return mlp(h)


def _proj(module: Any, h: torch.Tensor, kw: dict) -> torch.Tensor:
    """A projection; LoRA layers also get the per-row adapter names, plain ones cannot take them."""
    return module(h, **kw) if kw and hasattr(module, "lora_A") else module(h)
