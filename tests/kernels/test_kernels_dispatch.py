"""HIZLI_KERNELS: auto, triton, reference; and no Triton import until a kernel runs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hizli.kernels import dispatch


def test_modes_on_cpu(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for value in ("", "auto", "AUTO", "reference"):
        monkeypatch.setenv("HIZLI_KERNELS", value)
        assert dispatch.use_triton("op", x) is False
    monkeypatch.setenv("HIZLI_KERNELS", "fast")
    with pytest.raises(ValueError, match="HIZLI_KERNELS='fast'"):
        dispatch.use_triton("op", x)


def test_triton_mode_says_why_it_cannot_run(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv("HIZLI_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    with pytest.raises(ValueError, match="CUDA tensors"):
        dispatch.use_triton("rms_norm", x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.use_triton("rms_norm", x) is True  # the interpreter runs kernels on CPU tensors
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(ValueError, match="does not import"):
        dispatch.use_triton("rms_norm", x)


def test_auto_without_triton_is_the_reference(monkeypatch):
    monkeypatch.setenv("HIZLI_KERNELS", "auto")
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert dispatch.use_triton("op", torch.zeros(1)) is False


def test_reset_clears_the_import_check():
    dispatch.reset()
    assert dispatch.triton_available.cache_info().currsize == 0


def test_importing_and_running_references_never_imports_triton():
    code = (
        "import sys, torch\n"
        "from hizli.kernels import attention, cross_entropy, dispatch, rms_norm, rope, swiglu\n"
        "x = torch.randn(3, 8)\n"
        "rms_norm.rms_norm(x, torch.ones(8)); swiglu.swiglu(x, x)\n"
        "cross_entropy.fused_linear_cross_entropy(x, torch.randn(5, 8), torch.tensor([0, 1, 4]))\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HIZLI_KERNELS": "auto"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
