"""Benchmark results: one JSON-lines file per suite (``<dir>/<suite>.jsonl``), one record per line.

A record says what was measured, where, on which code and how to measure it again::

    {"schema": 1, "suite": "recipe", "date": "YYYY-MM-DDTHH:MMZ", "commit": "d5931c3",
     "device": {"type": "cuda", "name": "NVIDIA H200", "memory_gib": 140.4, "cpus": 16},
     "system": "hizli", "env": {"torch": "2.13.0", ...}, "call": "<date>-h200",
     "command": "hizli bench recipe --model llama-3.2-3b --steps 20",
     "settings": {...}, "metrics": {"tokens_per_s": 27612.0, ...}, "note": "..."}

``system`` is who trained (hizli, or a peer such as unsloth_big); ``call`` groups the records one
command produced, so figures compared with each other come from the same call on the same machine.
``benchmarks/results/README.md`` describes each suite's settings and metrics.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
SUITES = ("recipe", "compare", "longest", "kernels", "serve")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2})?Z)?$")
_TOP: dict[str, tuple[type, ...]] = {
    "schema": (int,),
    "suite": (str,),
    "date": (str,),
    "commit": (str, type(None)),
    "device": (dict,),
    "system": (str,),
    "env": (dict,),
    "call": (str,),
    "command": (str,),
    "settings": (dict,),
    "metrics": (dict,),
}
_OPTIONAL: dict[str, tuple[type, ...]] = {"note": (str,)}


def utc_now() -> str:
    """The current time as the records write it (UTC, to the minute)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")


def git_commit(root: str | os.PathLike | None = None) -> str | None:
    """The checkout's short commit, with ``+dirty`` when tracked files differ from it.

    ``HIZLI_BENCH_COMMIT`` wins: a copy of the tree sent to another machine may carry stale git state.
    """
    if os.environ.get("HIZLI_BENCH_COMMIT"):
        return os.environ["HIZLI_BENCH_COMMIT"]
    cwd = str(root or Path(__file__).resolve().parent)
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


def device_info() -> dict[str, Any]:
    """The accelerator the figures come from (the CPU when there is no GPU)."""
    import torch

    cpus = os.cpu_count()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(0),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cpus": cpus,
        }
    name = platform.processor() or platform.machine()
    try:
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        name = names[0] if names else name
    except OSError:
        pass
    return {"type": "cpu", "name": name, "memory_gib": None, "cpus": cpus, "threads": torch.get_num_threads()}


def env_info(extra: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Versions of what the figures depend on (``extra``: more packages, e.g. a peer's)."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("hizli", "torch", "transformers", "peft", "bitsandbytes", "triton", *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def make_record(
    suite: str,
    system: str,
    settings: dict[str, Any],
    metrics: dict[str, Any],
    *,
    command: str,
    call: str | None = None,
    device: dict[str, Any] | None = None,
    env: dict[str, Any] | None = None,
    note: str | None = None,
    date: str | None = None,
) -> dict[str, Any]:
    """A record in the schema; device, env, date and commit are taken from this process when not given."""
    date = date or utc_now()
    device = device if device is not None else device_info()
    record = {
        "schema": SCHEMA_VERSION,
        "suite": suite,
        "date": date,
        "commit": git_commit(),
        "device": device,
        "system": system,
        "env": env if env is not None else env_info(),
        "call": call or f"{date}-{slug(device.get('name', 'unknown'))}",
        "command": command,
        "settings": settings,
        "metrics": metrics,
    }
    if note:
        record["note"] = note
    problems = validate_record(record)
    assert not problems, problems
    return record


def slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200': a device name as a short label."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-") or "unknown"


def validate_record(record: Any) -> list[str]:
    """Every way ``record`` departs from the schema (empty when it follows it)."""
    if not isinstance(record, dict):
        return [f"a record is a JSON object, not {type(record).__name__}"]
    problems = []
    for key, types in _TOP.items():
        if key not in record:
            problems.append(f"missing {key!r}")
        elif not isinstance(record[key], types) or isinstance(record[key], bool):
            problems.append(f"{key!r} is {type(record[key]).__name__}, expected {'/'.join(t.__name__ for t in types)}")
    for key in set(record) - set(_TOP):
        if key not in _OPTIONAL:
            problems.append(f"unknown key {key!r} (allowed: {', '.join([*_TOP, *_OPTIONAL])})")
        elif not isinstance(record[key], _OPTIONAL[key]):
            problems.append(f"{key!r} is {type(record[key]).__name__}")
    if problems:
        return problems
    if record["schema"] != SCHEMA_VERSION:
        problems.append(f"schema {record['schema']}, expected {SCHEMA_VERSION}")
    if record["suite"] not in SUITES:
        problems.append(f"suite {record['suite']!r}: use one of {', '.join(SUITES)}")
    if not _DATE.match(record["date"]):
        problems.append(f"date {record['date']!r}: use YYYY-MM-DD or YYYY-MM-DDTHH:MMZ (UTC)")
    device = record["device"]
    if device.get("type") not in ("cuda", "cpu") or not isinstance(device.get("name"), str):
        problems.append("device needs 'type' (cuda or cpu) and 'name'")
    if not record["command"].strip():
        problems.append("command is empty: say how to measure it again")
    if not record["metrics"]:
        problems.append("metrics is empty")
    for key, value in record["metrics"].items():
        if not _plain(value):
            problems.append(f"metrics[{key!r}] holds a {type(value).__name__}")
    return problems


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def append(folder: str | os.PathLike, records: list[dict[str, Any]]) -> Path:
    """Add ``records`` to ``<folder>/<suite>.jsonl`` (one suite per call); returns the file."""
    suites = {r["suite"] for r in records}
    assert len(suites) == 1, suites
    path = Path(folder) / f"{suites.pop()}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def read(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of one results file, with the line number of any line that is not JSON in the error."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not JSON ({e})") from None
    return records
