"""The background kernel compile (``hizli.models.warmup`` over ``hizli.kernels._precompile``): it runs
every kernel of a training step, it never gets in the way when it fails, and on a GPU it compiles
exactly the variants that training then launches (so the first step compiles nothing)."""

from __future__ import annotations

import importlib
import json
import logging
import os
import pkgutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hizli.kernels import _precompile
from hizli.kernels._triton_utils import LazyJit
from hizli.models import warmup

ROOT = Path(__file__).resolve().parents[2]


def test_shapes_come_from_a_llama_like_config_and_nothing_else(tiny_config):
    shapes = warmup.KernelShapes.from_config(tiny_config, torch.bfloat16, nf4=True)
    assert shapes == warmup.KernelShapes(
        hidden=tiny_config.hidden_size,
        intermediate=tiny_config.intermediate_size,
        heads=tiny_config.num_attention_heads,
        kv_heads=tiny_config.num_key_value_heads,
        head_dim=tiny_config.head_dim,
        vocab=tiny_config.vocab_size,
        dtype="bfloat16",
        nf4=True,
    )
    assert warmup.KernelShapes.from_config(SimpleNamespace(vocab_size=10), torch.bfloat16, True) is None
    assert warmup.KernelShapes.from_config(tiny_config, torch.float32, True) is None  # no fp32 fast path


def test_the_kernel_list_names_every_triton_kernel_of_the_fast_path():
    # Kernels are named *_kernel; the other jit functions (_rope_heads, _capped) are device functions
    # that kernels call.
    import hizli.kernels

    names = set()
    for module in pkgutil.iter_modules(hizli.kernels.__path__):
        mod = importlib.import_module(f"hizli.kernels.{module.name}")
        names |= {
            name
            for name, value in vars(mod).items()
            if name.endswith("_kernel")
            and (isinstance(value, LazyJit) or type(value).__name__ in ("JITFunction", "InterpretedFunction"))
        }
    assert names == set(warmup.KERNELS)


@pytest.mark.parametrize("nf4", [True, False], ids=["nf4", "16-bit"])
def test_exercise_runs_a_whole_training_step_of_kernels_on_cpu(tiny_config, nf4):
    # On a CPU the same calls take the references: this is what keeps the warm-up in step with the
    # fused layers' signatures (an error here would only show on a GPU as a slower first step).
    shapes = warmup.KernelShapes.from_config(tiny_config, torch.bfloat16, nf4=nf4)
    warmup.exercise(shapes, "cpu", tokens=7)


@pytest.mark.parametrize("nf4", [True, False], ids=["nf4", "16-bit"])
def test_exercise_launches_the_triton_kernels(tiny_config, kernel_device, nf4):
    # The same through Triton: on the GPU, or in Triton's interpreter on a CPU
    shapes = warmup.KernelShapes.from_config(tiny_config, torch.bfloat16, nf4=nf4)
    warmup.exercise(shapes, kernel_device, tokens=5)


def test_nothing_starts_on_a_cpu_or_when_turned_off(tiny_config, monkeypatch):
    assert not warmup.start(tiny_config, torch.bfloat16, "cpu", nf4=True)
    monkeypatch.setenv(warmup.ENV, "0")
    assert not warmup.enabled("cuda:0")
    warmup.wait()  # nothing pending: returns at once


def _spawn_unconditionally(monkeypatch):
    monkeypatch.setattr(warmup, "enabled", lambda device: True)
    monkeypatch.setattr(warmup, "cache_has_kernels", lambda names: False)
    monkeypatch.setattr(warmup, "_room_for_it", lambda config, shapes, device: True)


def _wait_and_read_debug_log(caplog) -> str:
    """``warmup.wait()``, returning what hizli logged meanwhile at debug level."""
    caplog.set_level(logging.DEBUG, logger="hizli")
    logging.getLogger("hizli").propagate = True
    try:
        warmup.wait(timeout=120)
    finally:
        logging.getLogger("hizli").propagate = False
    return caplog.text


def test_the_background_process_runs_a_step_from_a_fresh_interpreter(tiny_config, monkeypatch, caplog):
    # On a CPU it runs the references: started from another folder with no PYTHONPATH of ours, the
    # process imports hizli, runs a step's worth of kernels and exits cleanly, which wait() sees.
    _spawn_unconditionally(monkeypatch)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.chdir(Path(warmup.__file__).anchor)  # not the repository root either
    assert warmup.start(tiny_config, torch.bfloat16, "cpu", nf4=True)
    assert "exited with" not in _wait_and_read_debug_log(caplog)


def test_a_background_compile_that_fails_costs_nothing(tiny_config, monkeypatch, caplog):
    # The background process asked for a GPU this machine lacks (or any other failure): waiting
    # for it returns, says why at debug level, and leaves no log file behind.
    _spawn_unconditionally(monkeypatch)
    device = "cuda:0" if not torch.cuda.is_available() else "cuda:99"
    assert warmup.start(tiny_config, torch.bfloat16, device, nf4=True)
    log_file = _precompile._process_log
    assert "background kernel compile exited with" in _wait_and_read_debug_log(caplog)
    assert not os.path.exists(log_file)
    assert _precompile._process is None


def test_it_starts_only_where_the_gpu_has_room_beside_the_model(monkeypatch):
    from hizli.bench.shapes import config_for

    config = config_for("llama-3.2-3b")  # 2.3 GB in 4-bit, 6.4 GB in bf16
    free = {}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 * 2**30))
    for nf4, fits, too_small in ((True, 6 * 2**30, 4 * 2**30), (False, 10 * 2**30, 8 * 2**30)):
        shapes = warmup.KernelShapes.from_config(config, torch.bfloat16, nf4=nf4)
        free["bytes"] = fits
        assert warmup._room_for_it(config, shapes, "cuda:0")
        free["bytes"] = too_small
        assert not warmup._room_for_it(config, shapes, "cuda:0")


def test_a_warm_triton_cache_needs_no_background_compile(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    assert not warmup.cache_has_kernels(warmup.KERNELS)
    for i, name in enumerate(warmup.KERNELS):
        (tmp_path / f"hash{i}").mkdir()
        (tmp_path / f"hash{i}" / f"{name}.cubin").write_bytes(b"")
    assert warmup.cache_has_kernels(warmup.KERNELS)
    (tmp_path / "hash0" / f"{warmup.KERNELS[0]}.cubin").unlink()
    assert not warmup.cache_has_kernels(warmup.KERNELS)


def _cubins(cache: Path) -> set[str]:
    return {str(p.relative_to(cache)) for p in cache.rglob("*.cubin")}


@pytest.mark.gpu
def test_after_the_warm_up_the_first_training_steps_compile_nothing(tmp_path):
    """The real check of the variants: a fresh Triton cache, the warm-up process for the bench's
    tiny Llama shape, then ``hizli bench`` on that shape (4-bit, LoRA, fast path) with the warm-up
    off. Every kernel it launches must already be in the cache: no new compiled kernel appears."""
    tok = ROOT / ".gpu-bundle" / "tok" / "tokenizer.json"
    if not tok.is_file():
        pytest.skip("needs the GPU bundle's Llama 3 tokenizer (bash ../shared/gpu/make_bundle.sh)")
    from hizli.bench.shapes import config_for

    cache = tmp_path / "triton"
    env = {
        **os.environ,
        "TRITON_CACHE_DIR": str(cache),
        "HIZLI_BENCH_CACHE": str(tmp_path / "models"),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("HIZLI_KERNELS", None)
    # bf16: what hizli bench trains in on a GPU that has it (fp16 variants differ only in dtype)
    shapes = warmup.KernelShapes.from_config(config_for("tiny"), torch.bfloat16, nf4=True)
    subprocess.run(
        [sys.executable, "-m", "hizli.models.warmup", json.dumps(asdict(shapes)), "cuda"],
        env=env,
        check=True,
        timeout=300,
    )
    compiled = _cubins(cache)
    assert {Path(c).stem for c in compiled} == set(warmup.KERNELS)

    bench = [
        sys.executable,
        "-m",
        "hizli.cli",
        "bench",
        "--model",
        "tiny",
        "--tokenizer",
        str(tok),
        "--steps",
        "3",
        "--seq-len",
        "512",
        "--json",
        str(tmp_path / "bench.json"),
    ]
    subprocess.run(bench, env={**env, warmup.ENV: "0"}, check=True, timeout=600, cwd=tmp_path)
    assert json.loads((tmp_path / "bench.json").read_text())["metrics"]["losses"]
    assert _cubins(cache) - compiled == set()
