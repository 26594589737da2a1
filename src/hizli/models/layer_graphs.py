"""CUDA graphs of offloaded decoder layers: each layer's first pass, and its recompute with its backward,
replayed as one launch each.

Under a tight memory cap a step runs several micro-batches with every layer offloaded, and the GPU
waits on the host: each layer's first pass, recompute and backward are a few hundred small Python
calls and kernel launches, paid again by every micro-batch whatever its size. A CUDA graph records
those launches once and replays them with one call. An offloaded layer's work is closed, which is
what makes it graphable: inputs are the layer input (fetched back from CPU memory for backward), the
gradient of its output and the micro-batch's attention metadata; outputs are the layer output, or
the gradient of its input and its LoRA weights' gradients.

A graph replays fixed addresses, so every input lives in a static buffer that each replay's inputs
are copied into, and every output is copied out:

- the layer input, the output gradient and the result are views of buffers sized for the memory
  plan's largest micro-batch (``reserve``), shared by every layer and token count;
- the layer's keyword arguments (rotary tables, positions) are views of such buffers too, copied
  once per micro-batch (every layer gets the same tensors); ``cu_seq_lens_*`` is padded with empty
  sequences to a fixed length and ``max_length_*`` becomes the token count, so a graph serves every
  micro-batch of its length whatever its number of sequences;
- the LoRA gradients land in one scratch set shared by the layers (same shapes) and are added to
  ``.grad`` after the replay, so ``zero_grad(set_to_none=True)`` stays safe.

Graphs are keyed by (layer, direction, token count, arguments' layout); the trainer's token buckets
make token counts repeat. The first call in each direction runs eagerly, compiling the Triton kernels
and loading cuBLAS's outside any capture; every later call captures or replays, so no eager layer
ever runs beside the pool. All graphs share one memory pool: everything a graph allocates is dead
when its capture ends, so the pool holds one layer's working memory at the largest count, apart from
the memory the loss uses (the memory plan counts both, ``Shape.graphed``). A capture that fails (an
operation CUDA cannot record, or memory it cannot get) turns graphs off for the run, with a warning,
and gives their memory back; eager layers go on.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from hizli import _log

# Keyword arguments of a decoder layer that hold sequence boundaries and their longest length.
CU_SEQLENS = ("cu_seq_lens_q", "cu_seq_lens_k")
MAX_LENGTH = ("max_length_q", "max_length_k")
CU_PAD = 8  # sequence boundaries are padded to a multiple of this many entries
STATICS = ("hidden", "grad_out", "result")
CU_CAPACITY = 256  # boundaries a static buffer holds (255 sequences in a micro-batch); more run eagerly
# The trainer's token buckets while graphs are on: lengths repeat more often (a graph per length and
# layer), at up to 1/4 more tokens, which costs GPU time the host-bound step has to spare.
BUCKETS_PER_DOUBLING = 4
# Attention implementations a graph can replay: the others read the sequence boundaries on the host
# (the reference's loop), or build a block mask from them there and cache it (flex), so a replay would
# keep the captured micro-batch's boundaries.
GRAPH_SAFE_ATTENTION = ("flash_attn", "torch_varlen")
# A capture under an allocator cap starts with this much room below the cap: while a capture runs, the
# allocator does not free its cache to make room for a new segment, so one that does not fit runs out
# of memory. Blocks of 1 MiB or less come from segments of their own, which the pool's first block
# does not provide: the first captures make them.
CAPTURE_ROOM = 64 * 2**20


def padded_boundaries(cu: torch.Tensor, length: int) -> torch.Tensor:
    """``cu`` (``[S+1]``, ending at T) extended with T to ``length`` entries: empty sequences at the
    end, which attend to nothing and are attended by nothing."""
    if cu.numel() > length:
        raise ValueError(f"{cu.numel()} sequence boundaries do not fit {length}")
    return torch.cat([cu, cu[-1:].expand(length - cu.numel())])


def boundaries_length(cu: torch.Tensor) -> int:
    return -(-cu.numel() // CU_PAD) * CU_PAD


class _Flat:
    """A buffer that static inputs of every token count are views of, never reallocated once made
    (a graph keeps its address)."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.source: tuple[Any, int] | None = None  # (weakref to the tensor last copied in, its version)

    def view(self, shape: torch.Size, dtype: torch.dtype, device: torch.device, capacity: int) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        if self.buffer is None:
            self.buffer = torch.empty(max(capacity, numel), dtype=dtype, device=device)
        if self.buffer.dtype != dtype or self.buffer.numel() < numel:
            raise _NotGraphable(f"a static input changed dtype or outgrew its buffer ({tuple(shape)}, {dtype})")
        return self.buffer[:numel].view(shape)

    def fill(self, view: torch.Tensor, value: torch.Tensor, prepare: Callable | None = None) -> None:
        """Copy ``value`` (or ``prepare(value)``) in, unless ``value`` is the tensor (same object, same
        version) copied last: every layer of a micro-batch gets the same arguments."""
        if self.source is not None and self.source[0]() is value and self.source[1] == value._version:
            return
        view.copy_(value if prepare is None else prepare(value))
        self.source = (weakref.ref(value), value._version)


class _NotGraphable(Exception):
    """This call cannot replay a graph; it runs eagerly."""


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph, or a replay function where graphs are emulated (tests)
    hidden: torch.Tensor
    grad_out: torch.Tensor | None
    result: torch.Tensor  # the input gradient, or the output of a forward graph
    params: list[torch.nn.Parameter]
    scratch: list[torch.Tensor | None]  # per parameter: where its gradient lands (None: it gets none)


@dataclass
class LayerGraphs:
    """The graphs of a model's offloaded layers and the static buffers they share.

    Attributes:
        capacity: tokens the static buffers hold (the memory plan's largest micro-batch); a larger
            micro-batch runs eagerly.
        capture: ``capture(fn) -> replay``: runs ``fn``'s host code once, recording its GPU work (a
            CUDA graph in the shared pool). Tests emulate it on a CPU: run ``fn``, replay ``fn``.
    """

    capacity: int = 0
    capture: Callable[[Callable[[], None]], Callable[[], None]] | None = None
    graphs: dict[tuple, _Graph] = field(default_factory=dict)
    seen: set = field(default_factory=set)  # directions ("forward", "backward") that have run eagerly once
    replays: int = 0
    eager: int = 0
    failed: str | None = None  # why a capture failed (graphs are then off for the run)
    refused: set = field(default_factory=set)  # keys whose call cannot be graphed (e.g. not one output)
    pool_bytes: int = 0  # the pool is made this large before the first capture (``reserve``)
    cap_bytes: int = 0  # the allocator's cap (``max_memory_gib``), 0 without one
    _flats: dict[str, _Flat] = field(default_factory=dict)
    _scratch: dict[tuple, list[torch.Tensor]] = field(default_factory=dict)
    _pool: Any = None
    _mempool: Any = None
    _stream: Any = None

    def reserve(self, tokens: int, pool_bytes: int = 0, cap_bytes: int = 0) -> None:
        """Size the static buffers for micro-batches of up to ``tokens``, and the pool for graphs that
        use ``pool_bytes`` (the memory plan's count); forgets every graph when that grows (their buffers
        are made again). ``cap_bytes``: the allocator's cap, if the run sets one."""
        if tokens > self.capacity:
            self.graphs.clear()
            self._flats.clear()
            self.capacity = tokens
        self.pool_bytes = max(self.pool_bytes, pool_bytes)
        self.cap_bytes = cap_bytes

    def pool_gib(self) -> float | None:
        """Memory the graphs' pool holds (None before the first capture, or without ``MemPool``)."""
        if self._mempool is None or not hasattr(self._mempool, "snapshot"):
            return None
        return round(sum(s["total_size"] for s in self._mempool.snapshot()) / 2**30, 3)

    def _flat(self, name: str) -> _Flat:
        if name not in self._flats:
            self._flats[name] = _Flat()
        return self._flats[name]

    def _static(self, name: str, value: torch.Tensor, tokens: int) -> torch.Tensor:
        per_token = value.numel() // tokens if tokens else 0
        if not tokens or per_token * tokens != value.numel():
            raise _NotGraphable(f"argument {name} does not scale with the token count")
        return self._flat(name).view(value.shape, value.dtype, value.device, per_token * self.capacity)

    def _layout(self, keywords: dict[str, Any], tokens: int) -> tuple[tuple, dict[str, Any], list]:
        """(key part, keywords pointing at static views, [(path, view, value, prepare)] to fill) of a
        call; ``prepare`` (or None) turns the value into what the view holds."""
        key, static, fills = [], {}, []
        for name in sorted(keywords):
            value = keywords[name]
            if name in CU_SEQLENS and isinstance(value, torch.Tensor):
                cu_len = boundaries_length(value)
                view = self._flat(name).view(torch.Size([cu_len]), value.dtype, value.device, CU_CAPACITY)
                static[name] = view
                fills.append((name, view, value, functools.partial(padded_boundaries, length=cu_len)))
                key.append((name, "cu", cu_len))
            elif name in MAX_LENGTH and isinstance(value, int):
                static[name] = tokens  # an upper bound: only the attention kernels' grids grow
                key.append((name, "max"))
            elif isinstance(value, torch.Tensor):
                view = self._static(name, value, tokens)
                static[name] = view
                fills.append((name, view, value, None))
                key.append((name, value.dtype, tuple(value.shape)))
            elif isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
                views = []
                for i, v in enumerate(value):
                    path = f"{name}.{i}"
                    view = self._static(path, v, tokens)
                    views.append(view)
                    fills.append((path, view, v, None))
                    key.append((path, v.dtype, tuple(v.shape)))
                static[name] = tuple(views)
            else:
                try:
                    hash(value)
                except TypeError:
                    raise _NotGraphable(f"argument {name} is neither a tensor nor hashable") from None
                static[name] = value
                key.append((name, value))
        return tuple(key), static, fills

    def _start(self, layer, fn: Callable, hidden: torch.Tensor, direction: str, *extra: Any) -> tuple | None:
        """(graph key, keywords pointing at static views) of a call, its static inputs filled; None
        where it runs eagerly. Each direction's first call runs eagerly, compiling the Triton kernels
        and loading the cuBLAS ones outside any capture; later token counts capture at once (kernels
        are specialised on divisibility by 16, which bucketed counts share), so an eager layer never
        runs beside the graphs' pool."""
        tokens = hidden.shape[-2] if hidden.dim() >= 2 else 0
        if self.failed is not None or not isinstance(fn, functools.partial) or not 0 < tokens <= self.capacity:
            return None
        layout_key, keywords, fills = self._layout(dict(fn.keywords), tokens)
        key = (id(layer), direction, tokens, tuple(hidden.shape), hidden.dtype, *extra, layout_key, len(fn.args))
        if direction not in self.seen or key in self.refused:
            self.seen.add(direction)
            return None
        for path, view, value, prepare in fills:
            self._flat(path).fill(view, value, prepare)
        return key, keywords

    def _entry(self, layer, fn: Callable, hidden: torch.Tensor, direction: str, record: Callable, *extra: Any):
        """This call's graph (``record(call)`` captures it the first time), or None to run eagerly."""
        try:
            started = self._start(layer, fn, hidden, direction, *extra)
            if started is None:
                self.eager += 1
                return None
            key, keywords = started
            entry = self.graphs.get(key)
            if entry is None:
                self.refused.add(key)  # until the capture succeeds
                if self.capture is None:  # a real capture (an emulated one replays the host code too)
                    _check_attention(hidden)
                try:
                    entry = record(functools.partial(fn.func, *fn.args, **keywords))
                except RuntimeError as e:  # out of memory included: a capture cannot have the cache freed
                    self._turn_off(e)
                    return None
                self.graphs[key] = entry
                self.refused.discard(key)
            return entry
        except _NotGraphable:
            self.eager += 1
            return None

    def _turn_off(self, error: BaseException) -> None:
        """A capture failed (an operation CUDA cannot record, or no memory for it): eager layers from
        now on, and the graphs' memory (pool, static buffers, gradient scratch) goes back."""
        self.failed = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        self.graphs.clear()
        self._flats.clear()
        self._scratch.clear()
        real = self._stream is not None
        self._mempool = self._pool = self._stream = None
        if real:
            torch.cuda.empty_cache()
        _log.warn_once("layer-graphs-failed", f"CUDA graphs of offloaded layers are off for this run: {self.failed}")
        self.eager += 1

    def forward(self, layer: torch.nn.Module, fn: Callable, hidden: torch.Tensor) -> torch.Tensor | None:
        """``fn(hidden)`` without autograd (an offloaded layer's first pass) through a graph; None
        where this call must run eagerly (the caller then does)."""
        entry = self._entry(layer, fn, hidden, "forward", lambda call: self._record_forward(call, hidden))
        if entry is None:
            return None
        entry.hidden.copy_(hidden)
        entry.graph()
        self.replays += 1
        return entry.result.clone()

    def backward(
        self,
        layer: torch.nn.Module,
        fn: Callable,
        hidden: torch.Tensor,
        grad_out: torch.Tensor,
        recompute_context: Callable[[], Any],
        release: Callable[[Any], None],
    ) -> torch.Tensor | None:
        """The gradient of ``fn(hidden)``'s input for ``grad_out``, LoRA gradients added to ``.grad``,
        through a graph; None where this call must run eagerly (the caller then does)."""
        if hidden.shape != grad_out.shape:
            self.eager += 1
            return None

        def record(call):
            return self._record(layer, call, hidden, grad_out, recompute_context, release)

        entry = self._entry(layer, fn, hidden, "backward", record, grad_out.dtype)
        if entry is None:
            return None
        with torch.no_grad():
            entry.hidden.copy_(hidden)
            entry.grad_out.copy_(grad_out)
        entry.graph()
        self.replays += 1
        _add_gradients(entry)
        return entry.result.clone()

    def _statics(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views for (the layer input, the output gradient, the result: output or input gradient)."""
        room = self.capacity * hidden.shape[-1]
        return tuple(self._flat(name).view(hidden.shape, hidden.dtype, hidden.device, room) for name in STATICS)

    def _record_forward(self, call, hidden) -> _Graph:
        static_hidden, _, out_buffer = self._statics(hidden)

        def work() -> None:
            with torch.no_grad():
                out = call(static_hidden)
                if not isinstance(out, torch.Tensor) or out.shape != out_buffer.shape:
                    raise _NotGraphable("the layer's output is not one tensor shaped like its input")
                out_buffer.copy_(out)

        return _Graph((self.capture or self._cuda_capture)(work), static_hidden, None, out_buffer, [], [])

    def _record(self, layer, call, hidden, grad_out, recompute_context, release) -> _Graph:
        static_hidden, static_grad, dx = self._statics(hidden)
        static_hidden = static_hidden.detach().requires_grad_(True)
        if grad_out.dtype != hidden.dtype:
            raise _NotGraphable("the output gradient's dtype differs from the input's")
        params = [p for p in layer.parameters() if p.requires_grad]
        scratch_key = tuple((tuple(p.shape), p.dtype, p.device) for p in params)
        if scratch_key not in self._scratch:
            self._scratch[scratch_key] = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]
        buffers = self._scratch[scratch_key]
        got: list[bool] = []

        def work() -> None:
            with torch.enable_grad(), recompute_context():
                out = call(static_hidden)
            release(out)
            grads = torch.autograd.grad(out, [static_hidden, *params], static_grad, allow_unused=True)
            dx.copy_(grads[0])
            got.clear()
            for buffer, g in zip(buffers, grads[1:]):
                got.append(g is not None)
                if g is not None:
                    buffer.copy_(g)

        replay = (self.capture or self._cuda_capture)(work)
        scratch = [b if ok else None for b, ok in zip(buffers, got)]
        return _Graph(replay, static_hidden, static_grad, dx, params, scratch)

    def _make_pool(self, device: torch.device) -> None:
        """The graphs' shared pool, made ``pool_bytes`` large before any capture. Grown capture by
        capture instead, each larger token count adds segments that smaller ones then leave idle: the
        pool becomes the sum of its sizes, not the largest."""
        if not hasattr(torch.cuda, "MemPool"):
            self._pool = torch.cuda.graph_pool_handle()
            return
        self._mempool = torch.cuda.MemPool()
        self._pool = self._mempool.id
        if self.pool_bytes:
            torch.cuda.empty_cache()  # inside use_mem_pool the allocator would not free the cache for it
            with torch.cuda.use_mem_pool(self._mempool, device=device):
                block = torch.empty(self.pool_bytes, dtype=torch.uint8, device=device)
            del block  # back to the pool, which keeps it for the captures to split

    def _make_room(self, device: torch.device) -> None:
        """Before a capture under an allocator cap: free the allocator's cache if less than
        ``CAPTURE_ROOM`` is left below the cap (a capture cannot have it freed)."""
        if self.cap_bytes and torch.cuda.memory_reserved(device) + CAPTURE_ROOM > self.cap_bytes:
            torch.cuda.empty_cache()

    def _cuda_capture(self, work: Callable[[], None]) -> Callable[[], None]:
        current = torch.cuda.current_stream()
        if self._stream is None:
            # One capture stream for all graphs: cuBLAS keeps a workspace per stream, and one made
            # during a capture would stay in the pool. A first matmul on it outside any capture makes it.
            self._stream = torch.cuda.Stream()
            self._stream.wait_stream(current)
            with torch.cuda.stream(self._stream):
                # The caching allocator hands a free block only to the stream it was made on: the
                # pool's first block is made on the stream the captures run on, or they never use it.
                self._make_pool(current.device)
                for dtype in (torch.bfloat16, torch.float16, torch.float32):
                    a = torch.ones(16, 16, dtype=dtype, device=current.device)
                    torch.addmm(a, a, a)
            current.wait_stream(self._stream)
        self._make_room(current.device)
        graph = torch.cuda.CUDAGraph()
        self._stream.wait_stream(current)
        # Not torch.cuda.graph(): its garbage collection and cache flush on entry cost tens of
        # milliseconds per capture, and a step captures every layer.
        with torch.cuda.stream(self._stream):
            graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
            try:
                work()
            finally:
                try:
                    graph.capture_end()
                except RuntimeError:
                    _stop_routing(current.device, self._pool)
                    raise
        current.wait_stream(self._stream)
        return graph.replay


def _stop_routing(device: torch.device, pool: Any) -> None:
    """After a capture CUDA invalidated: some PyTorch versions raise from ``capture_end`` before they
    stop sending allocations to the graphs' pool, and while that lasts the allocator never frees its
    cache to retry an allocation that does not fit. Ends it, and drops the pool reference the capture
    took (the pair ``use_mem_pool`` closes with), where PyTorch has not."""
    end, release = (getattr(torch._C, name, None) for name in ("_cuda_endAllocateToPool", "_cuda_releasePool"))
    if end is None or release is None:
        return
    try:
        end(device.index, pool)
    except RuntimeError:  # PyTorch had ended it, and dropped its reference
        return
    release(device.index, pool)


def _check_attention(hidden: torch.Tensor) -> None:
    from hizli.kernels.attention import chosen_implementation

    name = chosen_implementation(hidden.device, hidden.dtype)
    if name not in GRAPH_SAFE_ATTENTION:
        raise _NotGraphable(f"attention {name!r} cannot be replayed by a graph")


def _add_gradients(entry: _Graph) -> None:
    """Add the scratch gradients of a replay to the parameters' ``.grad`` (made where there is none)."""
    present, added = [], []
    for p, s in zip(entry.params, entry.scratch):
        if s is None:
            continue
        if p.grad is None:
            p.grad = s.clone()
        else:
            present.append(p.grad)
            added.append(s)
    if present:
        torch._foreach_add_(present, added)
