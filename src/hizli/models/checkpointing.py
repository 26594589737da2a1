"""What each decoder layer keeps for backward: everything, only its input, or its input in CPU memory.

Per layer, one of three modes:
- ``keep``: autograd keeps every activation (fastest, most memory);
- ``recompute``: only the layer input is kept; the layer runs again in backward (PyTorch's
  non-reentrant checkpoint);
- ``offload``: as recompute, but the input goes to pinned CPU memory. The copy runs on a side stream
  so it overlaps the next layers' compute, and in backward the input of the layer below is fetched
  back while this one recomputes, so the transfers hide behind compute.

``use_gradient_checkpointing`` in the recipe (True / False / "unsloth") sets what is *allowed*:
False keeps everything, True allows recompute, "unsloth" also allows offload. On a GPU the memory
plan (``hizli.train.memory_plan``) then picks each layer's mode within what is allowed; on a CPU
there is nowhere cheaper to put activations, so "unsloth" means recompute there.

transformers' ``GradientCheckpointingLayer`` calls ``self._gradient_checkpointing_func(fn, *args)``
when ``self.gradient_checkpointing`` is set; we set both attributes per layer, which works across the
transformers 5.x range (the enabling API itself was renamed within it).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

if TYPE_CHECKING:
    from hizli.models.layer_graphs import LayerGraphs

    GraphedLayer = tuple[LayerGraphs, torch.nn.Module]

MODES = ("keep", "recompute", "offload")


class _Offloader:
    """Side-stream copies between the GPU and pinned CPU memory, with one-layer-ahead prefetch.

    The n-th input offloaded in a forward pass goes to the n-th of a list of pinned buffers, reused
    from one micro-batch to the next (a pinned allocation costs hundreds of microseconds of host time,
    even from torch's cache). A buffer is reused only once the input it held is gone (fetched back
    by its backward, or its graph freed): two forward passes before one backward keep both.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.buffers: list[tuple[torch.Tensor, Callable[[], Any]]] = []  # (pinned bytes, its holder's weakref)
        self.next = 0

    def pinned(self, t: torch.Tensor, holder_ref: Callable[[], Any]) -> torch.Tensor:
        """A pinned CPU tensor like ``t``, from the buffer list when its slot is free."""
        nbytes = t.numel() * t.element_size()
        slot, self.next = self.next, self.next + 1
        if slot < len(self.buffers):
            buffer, held_by = self.buffers[slot]
            holder = held_by()
            if holder is not None and holder.cpu is not None:  # still needed: leave it, take a fresh one
                return torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            if buffer.numel() < nbytes:
                buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            self.buffers[slot] = (buffer, holder_ref)
        else:
            buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            self.buffers.append((buffer, holder_ref))
        return buffer[:nbytes].view(t.dtype).view(t.shape)

    def to_cpu(self, t: torch.Tensor, holder_ref: Callable[[], Any]) -> tuple[torch.Tensor, torch.cuda.Event]:
        cpu = self.pinned(t, holder_ref)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            cpu.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        t.record_stream(self.stream)  # the allocator must not reuse t before the copy has read it
        return cpu, done

    def to_gpu(self, cpu: torch.Tensor, copied: torch.cuda.Event) -> tuple[torch.Tensor, torch.cuda.Event]:
        # Allocated from the compute stream's pool: a block allocated on the side stream would be
        # cached in that stream's pool after use, memory the compute stream could not reuse (it
        # showed as reserved-over-allocated under tight caps).
        # The block may have held a tensor that compute-stream work queued so far still reads: the
        # copy waits for that work (it still overlaps the layer recomputed next).
        gpu = torch.empty(cpu.shape, dtype=cpu.dtype, device=self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(copied)
            gpu.copy_(cpu, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        gpu.record_stream(self.stream)
        return gpu, done


_offloaders: dict[torch.device, _Offloader] = {}


def _offloader(device: torch.device) -> _Offloader:
    if device not in _offloaders:
        _offloaders[device] = _Offloader(device)
    return _offloaders[device]


class _Saved:
    """One offloaded layer input, linked to the one saved before it (the layer below)."""

    def __init__(self, below: "_Saved | None") -> None:
        self.below = below
        self.cpu: torch.Tensor | None = None
        self.copied: torch.cuda.Event | None = None
        self.gpu: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None

    def fetch(self, offloader: _Offloader) -> None:
        if self.gpu is None and self.cpu is not None:
            self.gpu, self.ready = offloader.to_gpu(self.cpu, self.copied)


_last_saved: dict[torch.device, _Saved | None] = {}


class _OffloadedCheckpoint(torch.autograd.Function):
    """Run ``fn(hidden, *args)`` keeping only ``hidden``, in pinned CPU memory; recompute in backward.

    LoRA weight gradients accumulate into ``.grad`` inside backward. Where the layer has randomness
    (``options.random``), the RNG state is replayed so dropout in the recompute matches the forward.
    Gradients flow to ``hidden`` only (the other positional arguments of a decoder layer are masks
    and position tensors that need none).
    """

    @staticmethod
    def forward(
        ctx, fn: Callable, hidden: torch.Tensor, options: "LayerOptions", graphed: "GraphedLayer | None", *args: Any
    ) -> torch.Tensor:
        ctx.fn, ctx.args, ctx.device, ctx.n_args, ctx.options = fn, args, hidden.device, len(args), options
        ctx.graphed = graphed if graphed is not None and not options.random and not args else None
        if options.random:
            ctx.cpu_rng = torch.get_rng_state()
            ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device)
        offloader = _offloader(hidden.device)
        ctx.saved = saved = _Saved(_last_saved.get(hidden.device))
        saved.cpu, saved.copied = offloader.to_cpu(hidden.detach(), weakref.ref(saved))
        _last_saved[hidden.device] = saved
        if ctx.graphed is not None:
            graphs, layer = ctx.graphed
            out = graphs.forward(layer, fn, hidden)
            if out is not None:
                return out
        with torch.no_grad():
            return fn(hidden, *args)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        from hizli.models.patch import mlp_outputs_unread

        offloader = _offloader(ctx.device)
        saved: _Saved = ctx.saved
        saved.fetch(offloader)
        torch.cuda.current_stream(ctx.device).wait_event(saved.ready)
        hidden = saved.gpu
        hidden.record_stream(torch.cuda.current_stream(ctx.device))
        unread = mlp_outputs_unread if ctx.options.mlp_unread else contextlib.nullcontext
        dx = None
        if ctx.graphed is not None:
            graphs, layer = ctx.graphed
            dx = graphs.backward(layer, ctx.fn, hidden, grad_out, unread, _release_output)
        if dx is None:
            hidden = hidden.detach().requires_grad_(True)
            with contextlib.ExitStack() as stack:
                if ctx.options.random:
                    stack.enter_context(torch.random.fork_rng(devices=[ctx.device]))
                    torch.set_rng_state(ctx.cpu_rng)
                    torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
                with torch.enable_grad(), unread():
                    out = ctx.fn(hidden, *ctx.args)
            _release_output(out)
            torch.autograd.backward(out, grad_out)
            dx = hidden.grad
        # Fetch the input of the layer below only now: fetched before this backward, it would sit on the
        # GPU through this layer's peak (6 kB a token at the 3B shape). The copy then runs while the host
        # queues the next recompute, which is where a host-bound step has the GPU to spare.
        if saved.below is not None:
            saved.below.fetch(offloader)
        saved.cpu = saved.gpu = saved.below = None
        ctx.saved = ctx.fn = ctx.args = ctx.graphed = None
        return (None, dx, None, None) + (None,) * ctx.n_args


# The last op of a decoder layer is the residual add, whose backward needs none of its inputs or its
# output: the recomputed output's values are never read, only its shape and its graph.
_OUTPUT_NOT_SAVED = frozenset({"AddBackward0"})


def _release_output(out: torch.Tensor) -> None:
    """Free the recomputed layer output's memory before its backward ([T, H]: 6 kB a token at the 3B
    shape, held through the layer's peak otherwise). Only where the op that made it keeps nothing."""
    if (
        isinstance(out, torch.Tensor)
        and out.is_cuda
        and out.grad_fn is not None
        and out.grad_fn.name() in _OUTPUT_NOT_SAVED
        and out._base is None
    ):
        out.untyped_storage().resize_(0)


def new_forward_pass() -> None:
    """Start a new chain of offloaded inputs (called before each decoder forward)."""
    _last_saved.clear()
    for offloader in _offloaders.values():
        offloader.next = 0


@dataclass(frozen=True)
class LayerOptions:
    """What an offloaded layer's recompute may skip, known from the layer (:func:`layer_options`).

    Attributes:
        random: the layer draws random numbers (dropout): its RNG state is kept and replayed.
        mlp_unread: the layer's last op adds its MLP's output to the residual stream, so the
            recompute never reads that output's values, and the model's record asks for the MLP
            to be deferred (``defer_offloaded_mlp``; ``hizli.models.patch.mlp_outputs_unread``).
    """

    random: bool = True
    mlp_unread: bool = False


# Decoder layers whose forward ends in ``residual + self.mlp(...)``, returned as the layer's output.
_RESIDUAL_LAST = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"}


def layer_options(layer: torch.nn.Module, defer_mlp: bool) -> LayerOptions:
    """The recompute options of a decoder layer: random if any dropout in it can draw; its MLP's
    output unread when ``defer_mlp`` and the layer ends in the residual add."""
    random = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in layer.modules()) or any(
        getattr(m, "attention_dropout", 0) for m in layer.modules()
    )
    return LayerOptions(random=bool(random), mlp_unread=defer_mlp and type(layer).__name__ in _RESIDUAL_LAST)


def offloaded_checkpoint(
    fn: Callable,
    hidden: torch.Tensor,
    *args: Any,
    options: LayerOptions = LayerOptions(),
    graphed: "GraphedLayer | None" = None,
) -> torch.Tensor:
    """Checkpoint function with the signature transformers' layers call. On a CPU: recompute.
    ``graphed``: (the model's ``LayerGraphs``, this layer): its first pass and backward replay CUDA
    graphs where they can."""
    if not hidden.is_cuda:
        return plain_checkpoint(fn, hidden, *args)
    if not hidden.requires_grad:
        # The LoRA weights live inside fn; the output must require grad for backward to reach them.
        hidden = hidden.detach().requires_grad_(True)
    return _OffloadedCheckpoint.apply(fn, hidden, options, graphed, *args)


def plain_checkpoint(fn: Callable, *args: Any) -> torch.Tensor:
    from torch.utils.checkpoint import checkpoint

    return checkpoint(fn, *args, use_reentrant=False)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules transformers checkpoints (its decoder layers), in forward order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def allowed_modes(requested: bool | str, on_gpu: bool) -> tuple[str, ...]:
    """What ``use_gradient_checkpointing=requested`` permits for each layer."""
    if requested not in (True, False, "unsloth"):
        raise ValueError(
            f'use_gradient_checkpointing={requested!r}: use True (recompute), "unsloth" '
            "(recompute, or offload layer inputs to CPU memory on a GPU) or False (keep all activations)"
        )
    if requested is False:
        return ("keep",)
    if requested == "unsloth" and on_gpu:
        return ("keep", "recompute", "offload")
    return ("keep", "recompute")


def apply_layer_modes(model: torch.nn.Module, modes: Sequence[str]) -> None:
    """Set each decoder layer's mode (``keep`` / ``recompute`` / ``offload``)."""
    from hizli.models.record import state_of

    layers = decoder_layers(model)
    assert len(layers) == len(modes), (len(layers), len(modes))
    record = state_of(model)
    defer_mlp, graphs = record.defer_offloaded_mlp, record.layer_graphs
    for layer, mode in zip(layers, modes):
        assert mode in MODES, mode
        layer.gradient_checkpointing = mode != "keep"
        layer._gradient_checkpointing_func = (
            functools.partial(
                offloaded_checkpoint,
                options=layer_options(layer, defer_mlp),
                graphed=None if graphs is None else (graphs, layer),
            )
            if mode == "offload"
            else plain_checkpoint
        )
    if any(m != "keep" for m in modes):
        # checkpointed layers need an input that requires grad for their LoRA gradients to flow
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()
    state_of(model).layer_modes = list(modes)


def set_checkpointing(model: torch.nn.Module, mode: bool | str) -> str:
    """Apply the recipe's ``use_gradient_checkpointing`` uniformly (before any memory plan).

    Returns the mode every layer got: "off", "recompute" or "offload".
    """
    on_gpu = any(p.is_cuda for p in model.parameters())
    allowed = allowed_modes(mode, on_gpu)
    layers = decoder_layers(model)
    if not layers and mode is not False:
        raise ValueError(
            f"{type(model).__name__} has no layers that support checkpointing; pass use_gradient_checkpointing=False"
        )
    uniform = allowed[-1]
    apply_layer_modes(model, [uniform] * len(layers))
    from hizli.models.record import state_of

    state_of(model).allowed_modes = allowed
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if mode is not False and hasattr(base, "config"):
        base.config.use_cache = False
    return {"keep": "off"}.get(uniform, uniform)
