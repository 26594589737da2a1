"""Fused 4-bit LoRA projections: the attention's q/k/v group, its o projection and the whole SwiGLU MLP.

PEFT computes each LoRA projection of a 4-bit model as about six separate steps (bitsandbytes
dequantises the NF4 weight and multiplies, PEFT clones the result, runs ``lora_A``, ``lora_B``,
scales and adds), each a Python call and a kernel launch, and autograd keeps every intermediate. With
small micro-batches (a tight memory budget) the step becomes bound by those Python calls rather
than by the GPU. Here one autograd function covers a group of projections that share an input:

- forward: the q/k/v weights are dequantised into one ``[sum(out), in]`` buffer (one matmul for
  the three; gate and up take turns in one weight-sized buffer, to keep the transient small), the
  input goes through all the group's ``lora_A`` at once (``[T, n*r]``), and each ``lora_B`` product
  is accumulated into its slice of the output by ``addmm_`` (no extra pass over the activations, no
  clone);
- backward: the weights are dequantised again rather than kept (the dequantised MLP weights alone
  would be 100 MB per layer), the ``lora_A`` gradients of the group come from one matmul, and the
  MLP overwrites its saved gate/up outputs with their gradients.

What is saved for backward: the input ``x``, the tiny ``x @ A^T`` (``[T, n*r]``) and, for the MLP,
its gate and up outputs ``[2, T, I]`` (not ``silu(gate) * up``, which backward recomputes).

Given the rotary tables (``lora_group(..., rope=(cos, sin))``), the q/k/v group also rotates q and k
in its own output buffer, and its backward rotates their gradients back in the buffer it builds.

The maths is PEFT's: ``y = x W^T + s (x A^T) B^T`` with ``s = lora_alpha / r`` (or rsLoRA's), in
the autocast dtype (or the input's without autocast). The adapters stay PEFT modules, so saving,
merging and loading do not change. Any layer the fused maths does not cover exactly (dropout > 0,
DoRA, a bias, several active adapters, a merged or disabled adapter, bitsandbytes' CPU-repacked
layout) runs PEFT's own path instead; so do eval and generation, where bitsandbytes' 4-bit
inference kernels are faster for one token at a time.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from hizli.models.lora_casts import ComputeCopies, compute_copy

# ------------------------------------------------------------------------------------------------
# Which layers the fused path computes exactly


def lora_parts(layer: torch.nn.Module) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, float] | None:
    """``(base_layer, A, B, scaling)`` for a PEFT LoRA layer the fused maths reproduces, else None."""
    lora_a = getattr(layer, "lora_A", None)
    if lora_a is None or getattr(layer, "disable_adapters", True) or getattr(layer, "merged", True):
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in lora_a:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return None
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, torch.nn.Identity) and getattr(dropout, "p", 1.0) > 0:
        return None
    b = layer.lora_B[name]
    base = layer.base_layer
    if getattr(b, "bias", None) is not None or getattr(base, "bias", None) is not None:
        return None
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:
        if getattr(state, "packing_format_for_cpu", False) or state.quant_type not in ("nf4", "fp4"):
            return None
    elif not isinstance(base, torch.nn.Linear):
        return None
    return base, lora_a[name].weight, b.weight, float(layer.scaling[name])


def group_parts(module: torch.nn.Module, names: Sequence[str]) -> list | None:
    """``lora_parts`` of each named projection of ``module``; None unless all of them qualify."""
    parts = []
    for name in names:
        p = lora_parts(getattr(module, name))
        if p is None:
            return None
        parts.append(p)
    return parts


def model_uses_fused_lora(model: torch.nn.Module) -> bool:
    """Whether ``model``'s MLPs were routed through hizli (``use_fused_ops``) and their LoRA layers
    take the fused path (the memory plan's activation sizes depend on it)."""
    from hizli.models.patch import routed_through_hizli

    for module in model.modules():
        if routed_through_hizli(module) and hasattr(module, "gate_proj") and hasattr(module, "down_proj"):
            return group_parts(module, ("gate_proj", "up_proj", "down_proj")) is not None
    return False


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype PEFT's matmuls would run in: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# ------------------------------------------------------------------------------------------------
# Dequantisation


def _dequantize_into(base: torch.nn.Module, out: torch.Tensor) -> None:
    """Write ``base``'s weight, dequantised if 4-bit, into ``out`` (``[out_features, in_features]``)."""
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        out.copy_(weight)
        return
    if state.quant_type == "nf4":
        from hizli.kernels.nf4 import dequantize_nf4  # Triton on CUDA, its PyTorch reference elsewhere

        dequantize_nf4(weight, state, out=out)
        return
    import bitsandbytes.functional as bnbf

    out.copy_(bnbf.dequantize_4bit(weight.data, state))


def dequantized(bases: Sequence[torch.nn.Module], sizes: Sequence[int], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """The weights of ``bases`` stacked by rows, ``[sum(sizes), in_features]`` in ``dtype``."""
    in_features = bases[0].in_features
    w = torch.empty((sum(sizes), in_features), dtype=dtype, device=device)
    row = 0
    for base, size in zip(bases, sizes):
        _dequantize_into(base, w[row:row + size])
        row += size
    return w


# ------------------------------------------------------------------------------------------------
# Autograd functions


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False)


class _LoraGroup(torch.autograd.Function):
    """``y_i = x W_i^T + s_i (x A_i^T) B_i^T`` for projections sharing the input ``x``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bases: tuple, scalings: tuple, dtype: torch.dtype, rope: tuple | None,
                copies: ComputeCopies | None, *ab: torch.Tensor):
        a_list, b_list = ab[0::2], ab[1::2]
        sizes = [b.shape[0] for b in b_list]
        ranks = [a.shape[0] for a in a_list]
        with _no_autocast(x.device):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            a_cat = torch.cat([compute_copy(a, dtype, copies) for a in a_list]) if len(a_list) > 1 \
                else compute_copy(a_list[0], dtype, copies)
            b_list = [compute_copy(b, dtype, copies) for b in b_list]
            w = dequantized(bases, sizes, dtype, x.device)
            y = x2 @ w.t()
            del w
            xa = x2 @ a_cat.t()
            col = r0 = 0
            for b, s, size, r in zip(b_list, scalings, sizes, ranks):
                y[:, col:col + size].addmm_(xa[:, r0:r0 + r], b.t(), alpha=s)
                col, r0 = col + size, r0 + r
            if rope is not None:
                _rotate_qk(y, x.shape[:-1], sizes, rope, backward=False)
        ctx.save_for_backward(x2, xa, a_cat, *b_list)  # b_list: the compute-dtype copies
        ctx.bases, ctx.scalings, ctx.dtype, ctx.rope = bases, scalings, dtype, rope
        ctx.sizes, ctx.ranks, ctx.x_shape, ctx.x_dtype = sizes, ranks, x.shape, x.dtype
        ctx.a_dtypes = [a.dtype for a in a_list]
        ctx.b_dtypes = [b.dtype for b in ab[1::2]]
        lead = x.shape[:-1]
        return tuple(part.view(*lead, size) for part, size in zip(y.split(sizes, dim=1), sizes))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        x2, xa, a_cat, *b_list = ctx.saved_tensors
        dtype, sizes, ranks, scalings = ctx.dtype, ctx.sizes, ctx.ranks, ctx.scalings
        n_tokens = x2.shape[0]
        with _no_autocast(x2.device):
            parts = [torch.zeros((n_tokens, size), dtype=dtype, device=x2.device) if g is None
                     else g.reshape(n_tokens, size).to(dtype) for g, size in zip(grads, sizes)]
            dy = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            if ctx.rope is not None:  # back through the rotation, in dy (a fresh buffer: three parts)
                _rotate_qk(dy, ctx.x_shape[:-1], sizes, ctx.rope, backward=True)
                parts = list(dy.split(sizes, dim=1))
            d_xa, d_b = [], []
            r0 = 0
            for part, b, b_dtype, s, r in zip(parts, b_list, ctx.b_dtypes, scalings, ranks):
                d_xa.append((part @ b).mul_(s))
                d_b.append((part.t() @ xa[:, r0:r0 + r]).mul_(s).to(b_dtype))
                r0 += r
            del parts
            d_xa_cat = torch.cat(d_xa, dim=1) if len(d_xa) > 1 else d_xa[0]
            d_a = (d_xa_cat.t() @ x2).split(ranks, dim=0)
            dx = None
            if ctx.needs_input_grad[0]:
                w = dequantized(ctx.bases, sizes, dtype, x2.device)
                dx = dy @ w
                del w
                dx.addmm_(d_xa_cat, a_cat)
                dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        ab_grads: list[torch.Tensor] = []
        for da, db, a_dtype in zip(d_a, d_b, ctx.a_dtypes):
            ab_grads += [da.to(a_dtype), db]
        return (dx, None, None, None, None, None, *ab_grads)


def _rotate_qk(y: torch.Tensor, lead: torch.Size, sizes: Sequence[int], rope: tuple, backward: bool) -> None:
    """Rotary embedding on the q and k columns of a q/k/v group's ``[tokens, sum(sizes)]`` buffer, in
    place: the rotated q and k need no tensors of their own (8 kB a token at the 3B shape, kept for
    attention's backward in every recomputed layer)."""
    from hizli.kernels.rope import rope_in_place

    cos, sin = rope
    d = cos.shape[-1]
    q = y[:, :sizes[0]].view(*lead, sizes[0] // d, d)
    k = y[:, sizes[0]:sizes[0] + sizes[1]].view(*lead, sizes[1] // d, d)
    rope_in_place(q, k, cos, sin, backward=backward)


class _LoraSwiGLU(torch.autograd.Function):
    """The Llama MLP ``down(silu(gate(x)) * up(x))`` with LoRA on all three projections."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bases: tuple, scalings: tuple, dtype: torch.dtype,
                copies: ComputeCopies | None, a_gate, b_gate, a_up, b_up, a_down, b_down):
        from hizli.kernels.swiglu import swiglu_forward

        inter = b_gate.shape[0]
        r_gate = a_gate.shape[0]
        s_gate, s_up, s_down = scalings
        with _no_autocast(x.device):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            a_cat = torch.cat([compute_copy(a_gate, dtype, copies), compute_copy(a_up, dtype, copies)])
            ctx.b_dtypes = (b_gate.dtype, b_up.dtype, b_down.dtype)
            b_gate, b_up, b_down = (compute_copy(b, dtype, copies) for b in (b_gate, b_up, b_down))
            # gate and up outputs in one [2, T, I] buffer; one dequantized weight at a time (50 MB at
            # the 3B shape rather than 100: that is ~450 tokens more per micro-batch under a tight cap)
            gu = torch.empty((2, x2.shape[0], inter), dtype=dtype, device=x.device)
            w = torch.empty((inter, x2.shape[1]), dtype=dtype, device=x.device)
            for i, base in enumerate(bases[:2]):
                _dequantize_into(base, w)  # stream order: the previous matmul has read w by then
                torch.mm(x2, w.t(), out=gu[i])
            del w
            xa = x2 @ a_cat.t()
            gu[0].addmm_(xa[:, :r_gate], b_gate.t(), alpha=s_gate)
            gu[1].addmm_(xa[:, r_gate:], b_up.t(), alpha=s_up)
            h = swiglu_forward(gu[0], gu[1])
            a_d = compute_copy(a_down, dtype, copies)
            ha = h @ a_d.t()
            w = dequantized(bases[2:], (b_down.shape[0],), dtype, x.device)
            y = h @ w.t()
            del w, h
            y.addmm_(ha, b_down.t(), alpha=s_down)
        ctx.save_for_backward(x2, xa, gu, ha, a_cat, a_d, b_gate, b_up, b_down)
        ctx.bases, ctx.scalings, ctx.dtype, ctx.x_shape, ctx.x_dtype = bases, scalings, dtype, x.shape, x.dtype
        ctx.a_dtypes = (a_gate.dtype, a_up.dtype, a_down.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from hizli.kernels.swiglu import swiglu_backward, swiglu_forward

        x2, xa, gu, ha, a_cat, a_d, b_gate, b_up, b_down = ctx.saved_tensors
        dtype = ctx.dtype
        s_gate, s_up, s_down = ctx.scalings
        inter, r_gate = b_gate.shape[0], a_cat.shape[0] - b_up.shape[1]
        gate, up = gu[0], gu[1]
        with _no_autocast(x2.device):
            dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
            # down projection
            h = swiglu_forward(gate, up)
            d_b_down = (dy2.t() @ ha).mul_(s_down)
            d_ha = (dy2 @ b_down).mul_(s_down)
            d_a_down = d_ha.t() @ h
            del h
            w = dequantized(ctx.bases[2:], (b_down.shape[0],), dtype, x2.device)
            dh = dy2 @ w
            del w
            dh.addmm_(d_ha, a_d)
            # SwiGLU: the gradients overwrite gate and up, which nothing needs any more
            d_gate, d_up = swiglu_backward(dh, gate, up, out=(gate, up))
            del dh
            # gate and up projections
            d_xa = torch.cat([(d_gate @ b_gate).mul_(s_gate), (d_up @ b_up).mul_(s_up)], dim=1)
            d_b_gate = (d_gate.t() @ xa[:, :r_gate]).mul_(s_gate)
            d_b_up = (d_up.t() @ xa[:, r_gate:]).mul_(s_up)
            d_a_gate, d_a_up = (d_xa.t() @ x2).split([r_gate, a_cat.shape[0] - r_gate], dim=0)
            dx = None
            if ctx.needs_input_grad[0]:
                w = torch.empty((inter, x2.shape[1]), dtype=dtype, device=x2.device)
                _dequantize_into(ctx.bases[0], w)
                dx = d_gate @ w
                _dequantize_into(ctx.bases[1], w)
                dx.addmm_(d_up, w)
                del w
                dx.addmm_(d_xa, a_cat)
                dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        a_gate_t, a_up_t, a_down_t = ctx.a_dtypes
        b_gate_t, b_up_t, b_down_t = ctx.b_dtypes
        return (dx, None, None, None, None, d_a_gate.to(a_gate_t), d_b_gate.to(b_gate_t), d_a_up.to(a_up_t),
                d_b_up.to(b_up_t), d_a_down.to(a_down_t), d_b_down.to(b_down_t))


# ------------------------------------------------------------------------------------------------
# Entry points used by the patched module forwards


def lora_group(x: torch.Tensor, parts: list, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
               copies: ComputeCopies | None = None) -> tuple[torch.Tensor, ...]:
    """Outputs of a group of LoRA projections sharing ``x`` (``parts`` from :func:`group_parts`).

    ``rope=(cos, sin)`` (the rotary module's ``[B, T, head_dim]`` tables, no gradient) for a q/k/v
    group: q and k come out rotated, as transformers' ``apply_rotary_pos_emb`` would make them.
    ``copies``: the training run's kept compute-dtype adapter weights (None: cast at every use).
    """
    bases = tuple(p[0] for p in parts)
    scalings = tuple(p[3] for p in parts)
    ab: list[Any] = []
    for _base, a, b, _s in parts:
        ab += [a, b]
    if rope is not None and (len(parts) != 3 or any(t.requires_grad for t in rope)):
        raise ValueError("lora_group: rope= is for a q/k/v group of three projections with constant cos/sin")
    return _LoraGroup.apply(x, bases, scalings, compute_dtype(x), rope, copies, *ab)


def lora_swiglu_mlp(x: torch.Tensor, parts: list, copies: ComputeCopies | None = None) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` for gate/up/down ``parts`` from :func:`group_parts`
    (``copies`` as in :func:`lora_group`)."""
    (g_base, a_g, b_g, s_g), (u_base, a_u, b_u, s_u), (d_base, a_d, b_d, s_d) = parts
    return _LoraSwiGLU.apply(x, (g_base, u_base, d_base), (s_g, s_u, s_d), compute_dtype(x), copies,
                             a_g, b_g, a_u, b_u, a_d, b_d)
