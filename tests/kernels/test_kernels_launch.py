"""hizli.kernels.launch: a bound launch, launched directly, passes the compiled kernel the arguments
Triton's own launcher would, and picks the compiled kernel Triton would pick.

No GPU here: Triton's JIT runs for real (binding, specialisation, cache keys) over a stand-in driver,
and its compile step is replaced by one that records what it was asked to compile and returns a
stand-in compiled kernel whose launcher records each launch. The GPU test
(``test_kernels_nf4.py::test_gpu_direct_launch_matches_jit``) runs real kernels both ways.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
knobs = pytest.importorskip("triton.knobs")
jit_module = pytest.importorskip("triton.runtime.jit")
if not hasattr(jit_module, "native_specialize_impl"):
    pytest.skip(
        "this Triton has no native_specialize_impl (hizli launches through the JIT there)", allow_module_level=True
    )

import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402

from hizli.kernels import launch as launch_module  # noqa: E402
from hizli.kernels.launch import ENV, BoundLaunch, launch_mode  # noqa: E402

STREAM = 77


def _probe_body(x_ptr, out_ptr, n, start, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr = False):
    offs = start + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * scale, mask=offs < n)


class _Driver:
    """The three questions Triton's JIT asks the driver, answered for one sm_90 GPU."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return STREAM

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


class _Compiled:
    """A compiled kernel's surface that launches use; records each launch's arguments."""

    def __init__(self, src):
        self.src, self.function, self.packed_metadata, self.launches = src, object(), ("metadata",), []

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        self.launches.append(args)


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(triton_driver, "_active", _Driver())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(ENV, "direct")
    specialize = jit_module.native_specialize_impl
    monkeypatch.setattr(launch_module, "_triton_parts", [specialize, knobs, lambda: 0, lambda device: STREAM])
    k = triton.jit(_probe_body, do_not_specialize=("start",))
    k.device_caches[0]  # makes the device's binder (and sets k.compile)
    k.compiled_kernels = []

    def compile_stub(src, target=None, options=None, **_):
        compiled = _Compiled(src)
        k.compiled_kernels.append(compiled)
        return compiled

    k.compile = compile_stub
    return k


def _bound(kernel, block=32):
    """The probe with x and scale fixed, out, n and start given at each call."""
    x = torch.zeros(128)
    return BoundLaunch(
        kernel,
        (4,),
        (x, None, None, None, 2.0),
        {"BLOCK": block, "num_warps": 2, "enable_fp_fusion": True},
        open_at=1,
        n_open=3,
    )


def _open(n=64, start=0, out_offset=0):
    return (torch.zeros(128)[out_offset:], n, start)  # an offset of one fp32 element: not a multiple of 16


def _is_direct(run_args):
    """A direct launch passes no launch metadata and no hooks; Triton's passes its hook chains."""
    return run_args[6:9] == (None, None, None)


def test_later_calls_launch_the_same_compiled_kernel_with_the_same_arguments(kernel):
    bound, values = _bound(kernel), _open()
    for _ in range(3):
        bound(*values)
    assert len(kernel.compiled_kernels) == 1
    first, *later = kernel.compiled_kernels[0].launches
    assert len(later) == 2 and not _is_direct(first) and all(_is_direct(a) for a in later)
    # grid, stream, function, packed metadata, then every parameter (the FLAG default too) as Triton bound them
    for a in later:
        assert a[:6] == first[:6] == (4, 1, 1, STREAM, kernel.compiled_kernels[0].function, ("metadata",))
        assert a[9:] == first[9:]
        assert a[10:13] == values and a[-2:] == (32, False)


def test_a_new_specialisation_goes_through_triton_and_then_launches_its_own_kernel(kernel):
    bound, aligned, misaligned = _bound(kernel), _open(), _open(out_offset=1)
    bound(*aligned)
    bound(*misaligned)  # out's address is no longer a multiple of 16
    bound(*misaligned)
    bound(*aligned)
    assert len(kernel.compiled_kernels) == 2
    a, m = kernel.compiled_kernels
    assert a.src.attrs != m.src.attrs  # Triton compiled the two alignments apart
    assert [_is_direct(x) for x in a.launches] == [False, True]
    assert [_is_direct(x) for x in m.launches] == [False, True]
    assert m.launches[1][10] is misaligned[0]


def test_ints_specialise_as_in_triton_and_do_not_specialize_is_kept(kernel):
    bound = _bound(kernel)
    bound(*_open(n=64))
    bound(*_open(n=63))  # n no longer a multiple of 16: a kernel of its own
    bound(*_open(n=64, start=3))  # start is do_not_specialize: the first kernel, launched directly
    _bound(kernel, block=64)(*_open(n=64))  # another constexpr: another kernel
    assert len(kernel.compiled_kernels) == 3
    assert [len(c.launches) for c in kernel.compiled_kernels] == [2, 1, 1]
    assert _is_direct(kernel.compiled_kernels[0].launches[1])


def test_a_launch_hook_sees_every_launch(kernel):
    seen = []

    def hook(metadata):
        seen.append(metadata)

    bound = _bound(kernel)
    bound(*_open())
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        bound(*_open())
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    bound(*_open())
    runs = kernel.compiled_kernels[0].launches
    assert [_is_direct(r) for r in runs] == [False, False, True]


def test_jit_mode_always_goes_through_triton(kernel, monkeypatch):
    monkeypatch.setenv(ENV, "jit")
    bound = _bound(kernel)
    for _ in range(3):
        bound(*_open())
    runs = kernel.compiled_kernels[0].launches
    assert len(runs) == 3 and not any(_is_direct(r) for r in runs)


def test_launch_mode_names_the_setting(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert launch_mode() == "jit"
    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(ValueError, match=f"{ENV}='fast'.*jit, direct"):
        launch_mode()
