"""Every Triton kernel compiles for sm_90 (no GPU needed) and spills no registers at the recipe's sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_spills(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    out = tmp_path / "compile.json"
    cmd = [sys.executable, "-m", "hizli.cli", "bench", "kernels", "--compile", "--json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert len(rows) >= 8
    spilled = [r for r in rows if r["spill_bytes"]]
    assert not spilled, spilled
