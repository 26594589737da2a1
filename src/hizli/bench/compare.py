"""``hizli bench compare``: hizli next to its peers on one GPU, each figure against the peer run at the
same memory (DESIGN.md §5).

Every system trains the reference recipe (``bench.shape`` with random weights, the Llama 3 tokenizer
with the llama-3.1 template, real ShareGPT conversations) in its own process with empty compile
caches, so first-step times are cold starts for all. Three matched pairs:

- **capped**: hizli with ``max_memory_gib`` = the peak of the faster of Unsloth's two seed modes
  (``unsloth``: the recipe's padded collator; ``unsloth_best``: its padding-free default), against
  that mode;
- **large GPU**: hizli's defaults against ``unsloth_big`` (padding-free, 8 x 1, no checkpointing);
- **T4 class**: fp16 under a 15 GiB cap: hizli (``--dtype fp16 --max-memory-gib 15``) against Unsloth
  fp16 at the largest per-device batch that fits the cap (``unsloth_t4``, found by search: batches
  grow x2 from a first guess made from a seed mode's peak, then bisect; each try is a full run).

``hf`` (transformers + PEFT + bitsandbytes) and ``liger`` run too, for reference. A peer whose package
is not importable is skipped with a note. The peers' code is ``src/hizli/bench/peers.py``; the GPU
machine gets their packages from ``../shared/gpu/make_bundle.sh --peers``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import hizli

HIZLI_SYSTEMS = ("hizli", "hizli_capped", "hizli_t4")
PEER_MODULES = {
    "unsloth": "unsloth",
    "unsloth_best": "unsloth",
    "unsloth_big": "unsloth",
    "unsloth_t4": "unsloth",
    "hf": "trl",
    "liger": "liger_kernel",
}
SYSTEMS = ("unsloth_best", "unsloth", "hizli_capped", "unsloth_big", "hizli", "unsloth_t4", "hizli_t4", "hf", "liger")
# (label, hizli system, peer) in the order the table shows them
PAIRS = (
    ("capped at the seed modes' peak", "hizli_capped", "seed"),
    ("large GPU", "hizli", "unsloth_big"),
    ("T4 class (fp16, cap)", "hizli_t4", "unsloth_t4"),
)


@dataclass
class CompareBench:
    """What ``hizli bench compare`` runs."""

    shape: str = "llama-3.2-3b"
    steps: int = 20
    systems: tuple[str, ...] = SYSTEMS
    data: str = ".gpu-bundle/data/sharegpt.jsonl"
    tokenizer: str = ".gpu-bundle/tok/tokenizer.json"
    work: str = "/tmp/hizli-compare"
    t4_cap_gib: float = 15.0
    t4_max_batch: int = 64
    t4_max_tries: int = 6
    t4_first_batch: int | None = None  # None: from a seed mode's peak (``t4_first_batch``)
    hizli_args: list[str] = field(default_factory=list)
    timeout_s: int = 400


def cold_caches(work: Path, system: str) -> dict[str, str]:
    """Empty compile caches for one system's run (Triton's, TorchInductor's, Unsloth's generated code),
    so each starts as on a machine that never ran it and the first-step figures compare cold starts."""
    root = work / "caches" / system
    shutil.rmtree(root, ignore_errors=True)
    env = {
        "TRITON_CACHE_DIR": root / "triton",
        "TORCHINDUCTOR_CACHE_DIR": root / "inductor",
        "UNSLOTH_COMPILE_LOCATION": root / "unsloth_compiled_cache",
    }
    for folder in env.values():
        folder.mkdir(parents=True, exist_ok=True)
    return {k: str(v) for k, v in env.items()}


def runs_folder(bench: CompareBench) -> Path:
    """``work/runs/SHAPE``: each run's log and result, kept per shape so that comparing the next shape
    does not overwrite them."""
    folder = Path(bench.work) / "runs" / Path(bench.shape).name.replace(".json", "")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _run(cmd: list[str], log: Path, timeout: int, env: dict[str, str]) -> int | None:
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.time()
    try:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        print(f"  timed out after {timeout} s (log {log})", flush=True)
        return None
    print(f"  exit {proc.returncode} after {time.time() - t0:.0f} s (log {log})", flush=True)
    if proc.returncode != 0:
        print("  " + "\n  ".join(log.read_text().splitlines()[-15:]), flush=True)
    return proc.returncode


def run_hizli(bench: CompareBench, model: Path, name: str, extra: list[str]) -> dict[str, Any] | None:
    """``hizli bench recipe`` in its own process; its record's settings and metrics, flattened."""
    work, runs = Path(bench.work), runs_folder(bench)
    out = runs / f"{name}.json"
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "hizli.cli",
        "bench",
        "recipe",
        "--model",
        str(model),
        "--data",
        bench.data,
        "--steps",
        str(bench.steps),
        "--json",
        str(out),
        *extra,
        *bench.hizli_args,
    ]
    src = str(Path(hizli.__file__).resolve().parent.parent)
    env = {
        **os.environ,
        **cold_caches(work, name),
        "PYTHONPATH": os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    _run(cmd, runs / f"{name}.log", bench.timeout_s, env)
    if not out.is_file():
        return None
    record = json.loads(out.read_text())
    s, m = record["settings"], record["metrics"]
    return {
        **m,
        "system": name,
        "batch": s["batch"],
        "grad_accum": s["grad_accum"],
        "dtype": s["dtype"],
        "cap_gib": s["max_memory_gib"],
        "command": record["command"],
        "env": record["env"],
        "memory_plan": record.get("memory_plan"),
    }


def run_peer(
    bench: CompareBench, model: Path, kind: str, batch: int | None = None, cap_gib: float | None = None
) -> dict[str, Any] | None:
    """One peer run (``peers.py`` as a script, so the peer's process imports nothing from hizli)."""
    work, runs = Path(bench.work), runs_folder(bench)
    name = kind + (f"-b{batch}" if batch else "")
    out = runs / f"{name}.json"
    out.unlink(missing_ok=True)
    settings = {
        "kind": kind,
        "model": str(model),
        "steps": bench.steps,
        "data": bench.data,
        "out": str(out),
        "batch": batch,
        "cap_gib": cap_gib,
    }
    (runs / f"{name}.settings.json").write_text(json.dumps(settings))
    # hizli sets this allocator option on import; a peer runs with its own choice
    env = {
        k: v for k, v in os.environ.items() if not (k == "PYTORCH_CUDA_ALLOC_CONF" and v == "expandable_segments:True")
    }
    env.update(cold_caches(work, name))
    cmd = [sys.executable, str(Path(__file__).with_name("peers.py")), str(runs / f"{name}.settings.json")]
    _run(cmd, runs / f"{name}.log", bench.timeout_s, env)
    return json.loads(out.read_text()) if out.is_file() else None


def t4_first_batch(found: dict[str, dict], cap_gib: float) -> int:
    """Where the T4 search starts: the largest power of two of rows per micro-batch that a seed mode's
    measured peak says fits ``cap_gib``, charging that whole peak (weights included) to its 2 rows, so
    that the guess errs low; 1 when no seed mode ran. Each try is a full Unsloth run (a minute or
    more): starting at 8 instead of 1 saves three of them."""
    peaks = [
        r["peak_reserved_gib"]
        for k in ("unsloth", "unsloth_best")
        if (r := found.get(k)) and r.get("peak_reserved_gib")
    ]
    if not peaks:
        return 1
    rows = int(2 * cap_gib / min(peaks))
    return 1 << (rows.bit_length() - 1) if rows >= 1 else 1


def search_t4_batch(
    try_batch, cap_gib: float, max_batch: int, max_tries: int, start: int = 1
) -> tuple[dict | None, list[dict]]:
    """The fastest run among the batches that fit ``cap_gib``, searching the largest batch that fits
    (x2 from ``start``, then bisection, below ``start`` if it does not fit; at most ``max_tries``
    runs); also every try. ``try_batch(b)`` returns a result dict or None (did not finish: out of
    memory, error, time-out)."""
    from hizli.bench.longest.search import Trial, find_longest

    tries: list[dict] = []

    def attempt(batch: int) -> Trial:
        if len(tries) >= max_tries:
            return Trial(len=batch, ok=False, error="try limit", fatal=True)
        r = try_batch(batch)
        ok = r is not None and r.get("peak_reserved_gib", cap_gib + 1) <= cap_gib
        tries.append(
            {
                "batch": batch,
                "ok": ok,
                "tokens_per_s": (r or {}).get("tokens_per_s"),
                "peak_reserved_gib": (r or {}).get("peak_reserved_gib"),
                "result": r,
            }
        )
        return Trial(len=batch, ok=ok)

    find_longest(attempt, start=min(start, max_batch), limit=max_batch, resolution=1, recheck="never")
    fitting = [t for t in tries if t["ok"]]
    best = max(fitting, key=lambda t: t["tokens_per_s"] or 0)["result"] if fitting else None
    return best, [{k: v for k, v in t.items() if k != "result"} for t in tries]


def matched(found: dict[str, dict]) -> list[dict[str, Any]]:
    """Each hizli figure against the peer at the same memory (rows of the headline table)."""
    seed = [found[k] for k in ("unsloth", "unsloth_best") if found.get(k)]
    faster_seed = max(seed, key=lambda r: r["tokens_per_s"]) if seed else None
    rows = []
    for label, mine, theirs in PAIRS:
        h = found.get(mine)
        peer = faster_seed if theirs == "seed" else found.get(theirs)
        if not h or not peer:
            continue
        rows.append(
            {
                "pair": label,
                "hizli": mine,
                "peer": peer["system"],
                "hizli_tokens_per_s": h["tokens_per_s"],
                "hizli_peak_gib": h["peak_reserved_gib"],
                "peer_tokens_per_s": peer["tokens_per_s"],
                "peer_peak_gib": peer["peak_reserved_gib"],
                "peer_batch": peer.get("batch"),
                "cap_gib": h.get("cap_gib"),
                "ratio": round(h["tokens_per_s"] / peer["tokens_per_s"], 3) if h["tokens_per_s"] else None,
                "hizli_first_step_s": h.get("first_step_s"),
                "peer_first_step_s": peer.get("first_step_s"),
            }
        )
    return rows


def render(found: dict[str, dict], rows: list[dict[str, Any]]) -> str:
    """The matched-memory table, then every system's figures."""
    lines = [f"{'at the same memory':<32}{'hizli tok/s':>12}{'GiB':>7}  {'peer':<16}{'tok/s':>9}{'GiB':>7}{'ratio':>8}"]
    for r in rows:
        peer = r["peer"] + (f" b{r['peer_batch']}" if r["peer"] == "unsloth_t4" else "")
        lines.append(
            f"{r['pair']:<32}{r['hizli_tokens_per_s'] or 0:>12.0f}{r['hizli_peak_gib'] or 0:>7.2f}  "
            f"{peer:<16}"
            f"{r['peer_tokens_per_s']:>9.0f}{r['peer_peak_gib']:>7.2f}{r['ratio'] or 0:>8.3f}"
        )
    lines += [
        "",
        f"{'system':<14}{'tokens/s':>10}{'peak GiB':>10}{'cap GiB':>9}{'batch':>7}{'dtype':>6}"
        f"{'first step s':>14}{'loss first':>12}{'loss last':>11}",
    ]
    for name, r in found.items():
        losses = r.get("losses") or [float("nan")]
        cap = r.get("cap_gib")
        lines.append(
            f"{name:<14}{r.get('tokens_per_s') or 0:>10.0f}{r.get('peak_reserved_gib') or 0:>10.2f}"
            f"{'-' if cap is None else f'{cap:.3f}':>9}{r.get('batch', 2):>4}x{r.get('grad_accum', 4):<2}"
            f"{r.get('dtype', 'bf16'):>6}{r.get('first_step_s') or 0:>14.1f}{losses[0]:>12.4f}{losses[-1]:>11.4f}"
        )
    return "\n".join(lines)


def importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def run_compare(
    bench: CompareBench, on_result: Callable[[str, dict[str, dict]], None] | None = None
) -> tuple[dict[str, dict], list[dict[str, Any]]]:
    """Every system of ``bench.systems`` in order; the results by system and the matched rows.
    ``on_result(system, found)`` is called as each run finishes (its peers have run before it)."""
    from hizli.bench.shapes import recipe_model_folder

    work = Path(bench.work)
    work.mkdir(parents=True, exist_ok=True)
    model = recipe_model_folder(bench.shape, bench.tokenizer, work)
    found: dict[str, dict] = {}
    for system in bench.systems:
        if system not in SYSTEMS:
            raise ValueError(f"systems: {system!r} is not one of {', '.join(SYSTEMS)}")
        if system in HIZLI_SYSTEMS:
            extra = []
            if system == "hizli_capped":
                seed = [found[k] for k in ("unsloth", "unsloth_best") if found.get(k)]
                if not seed:
                    print("hizli_capped: no Unsloth seed mode measured before it; skipped", flush=True)
                    continue
                extra = ["--max-memory-gib", str(max(seed, key=lambda r: r["tokens_per_s"])["peak_reserved_gib"])]
            elif system == "hizli_t4":
                extra = ["--dtype", "fp16", "--max-memory-gib", str(bench.t4_cap_gib)]
            result = run_hizli(bench, model, system, extra)
        elif not importable(PEER_MODULES[system]):
            print(f"{system}: {PEER_MODULES[system]} is not importable; skipped", flush=True)
            continue
        elif system == "unsloth_t4":
            result, tries = search_t4_batch(
                lambda b: run_peer(bench, model, "unsloth_t4", b, bench.t4_cap_gib),
                bench.t4_cap_gib,
                bench.t4_max_batch,
                bench.t4_max_tries,
                start=bench.t4_first_batch or t4_first_batch(found, bench.t4_cap_gib),
            )
            if result is not None:
                result["search"] = tries
        else:
            result = run_peer(bench, model, system)
        if result is not None:
            found[system] = result
            if on_result is not None:
                on_result(system, found)
    return found, matched(found)


def make_compare_record(bench: CompareBench, name: str, found: dict[str, dict], command: str, device, call):
    """The results record of system ``name`` (a hizli one carries its matched peer, if that ran)."""
    from hizli.bench import results

    r = found[name]
    pair = next((row for row in matched(found) if row["hizli"] == name), None)
    settings = {
        "shape": bench.shape,
        "steps": bench.steps,
        "batch": r.get("batch"),
        "grad_accum": r.get("grad_accum"),
        "dtype": r.get("dtype"),
        "cap_gib": r.get("cap_gib"),
    }
    skip = {"system", "batch", "grad_accum", "dtype", "cap_gib", "command", "env", "versions", "gpu", "memory_plan"}
    metrics = {k: v for k, v in r.items() if k not in skip}
    if pair:
        metrics["matched"] = {k: pair[k] for k in ("pair", "peer", "peer_tokens_per_s", "peer_peak_gib", "ratio")}
    env = r.get("env") or {"python": None, **(r.get("versions") or {})}
    return results.make_record("compare", name, settings, metrics, command=command, call=call, device=device, env=env)


def bench_compare(bench: CompareBench, results_dir: str | None = None) -> int:
    """Run, print the tables; each system's record is appended as soon as its run ends, so a call cut
    short keeps what it measured (the hizli ones carry their matched peer)."""
    from hizli.bench import results

    device, command = results.device_info(), " ".join(shlex.quote(a) for a in ["hizli", *sys.argv[1:]])
    call: str | None = None

    def keep(name: str, found: dict[str, dict]) -> None:
        nonlocal call
        record = make_compare_record(bench, name, found, command, device, call)
        call = call or record["call"]
        if results_dir:
            print(f"record appended to {results.append(results_dir, [record])}", flush=True)

    found, rows = run_compare(bench, on_result=keep)
    print(render(found, rows))
    return 0 if "hizli" in found or "hizli_capped" in found or "hizli_t4" in found else 1
