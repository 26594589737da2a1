"""Fixtures for the kernel tests: where the Triton kernels run, and an error measure.

Three ways these tests run:

- plain ``pytest``: the references against transformers' own modules on CPU (fast, offline).
- ``pytest -m gpu tests/kernels`` on a CUDA machine: every Triton kernel against its reference.
- ``TRITON_INTERPRET=1 pytest -m interpret tests/kernels`` on a CPU with Triton installed: the same
  kernel tests through Triton's interpreter, at small shapes (how the kernels were developed).

The ``interpret`` marker is registered here so that ``--strict-markers`` accepts it; interpreter tests
also carry ``slow`` so the default ``-m 'not gpu and not slow'`` leaves them out.
"""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "interpret: runs Triton kernels on CPU through TRITON_INTERPRET=1 "
        "(run with TRITON_INTERPRET=1 pytest -m interpret)",
    )


@pytest.fixture(
    params=[
        pytest.param("cuda", marks=pytest.mark.gpu, id="cuda"),
        pytest.param("cpu", marks=[pytest.mark.interpret, pytest.mark.slow], id="interpret"),
    ]
)
def kernel_device(request, monkeypatch) -> torch.device:
    """The device the Triton kernels run on, with ``HIZLI_KERNELS=triton`` set for the test."""
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if request.param == "cpu":
        if not interpreting:
            pytest.skip("interpreter tests need TRITON_INTERPRET=1 set before the first kernel launch")
        pytest.importorskip("triton")
    else:
        if interpreting:
            pytest.skip("TRITON_INTERPRET=1 is set: GPU kernels would run in the interpreter")
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
    monkeypatch.setenv("HIZLI_KERNELS", "triton")
    return torch.device(request.param)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual - expected‖ / ‖expected‖ in float64; NaN or inf anywhere gives inf (never passes)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


@pytest.fixture
def rel():
    return rel_err
