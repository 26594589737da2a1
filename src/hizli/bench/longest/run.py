"""``hizli bench longest``: the longest trainable sequence at batch 1, for hizli and for Unsloth, under
the same memory cap.

"Trainable at length L": one row of exactly L real tokens (ShareGPT conversations rendered with the
model folder's chat template, tokenized, concatenated and cut to L; labels = input ids), batch 1, the
recipe's model (4-bit NF4, LoRA r=16 on all 7 projections, use_gradient_checkpointing="unsloth",
bf16, adamw_8bit): two full optimizer steps finish without running out of GPU memory, and
``torch.cuda.max_memory_reserved()`` stays within the cap. Any other exception fails the trial too.

Each (system, cap) pair runs in its own process (``worker.py``), which loads the model once and
searches in place (``search.py``). As a failed trial can leave memory fragmented, when the search saw
a failure the answer is tried once more at the end, and whether it held is reported. State a system
keeps on purpose stays from trial to trial (e.g. Unsloth's offload buffers keep the size of the
longest row seen); to confirm a boundary in a fresh process, try one length alone (start = max_len
= resolution = L). Both load with ``max_seq_length`` = max_len, as a user training long rows would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hizli
from hizli.bench.longest.search import cap_label
from hizli.bench.longest.worker import SYSTEMS, WorkerSettings

DEFINITION = (
    "batch 1, one row of exactly L real tokens (labels = inputs), NF4 + LoRA r=16 on 7 projections, "
    "gradient checkpointing 'unsloth', bf16, adamw_8bit: two optimizer steps without running out of "
    "memory and peak reserved <= cap"
)


@dataclass
class LongestBench:
    """What ``hizli bench longest`` searches."""

    systems: tuple[str, ...] = SYSTEMS
    caps: tuple[str, ...] = ("8", "whole")
    model: str = "/tmp/hizli-compare/llama-3.2-3b"  # made from shape + tokenizer when it holds no tokenizer
    shape: str = "llama-3.2-3b"
    tokenizer: str | None = ".gpu-bundle/tok/tokenizer.json"
    data: str = ".gpu-bundle/data/sharegpt.jsonl"
    start: int = 4096
    max_len: int | None = None  # None: the model's max_position_embeddings
    resolution: int = 1024
    trial_timeout: float = 90.0
    search_budget: float | None = None
    recheck: str = "auto"
    free_memory: str = "cap"
    worker_timeout: float = 900.0
    work: str = "/tmp/hizli-compare"


def model_max_len(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    return int(config.get("max_position_embeddings") or config.get("text_config", {})["max_position_embeddings"])


def run_worker(bench: LongestBench, system: str, cap: str, tokens_path: Path, max_len: int) -> dict[str, Any]:
    """One worker process; its result file, with the error of a worker that did not finish."""
    work = Path(bench.work)
    slug = cap.replace(".", "_")
    out, log = work / f"longest-{system}-{slug}.json", work / f"longest-{system}-{slug}.log"
    settings_path = work / f"longest-{system}-{slug}.settings.json"
    out.unlink(missing_ok=True)
    settings = WorkerSettings(
        system=system,
        cap=cap,
        model=bench.model,
        tokens=str(tokens_path),
        out=str(out),
        start=bench.start,
        max_len=max_len,
        resolution=bench.resolution,
        trial_timeout=bench.trial_timeout,
        recheck=bench.recheck,
        free_memory=bench.free_memory,
        search_budget=bench.search_budget,
    )
    settings_path.write_text(json.dumps(asdict(settings), indent=1))
    cmd = [sys.executable, str(Path(__file__).with_name("worker.py")), str(settings_path)]
    src = str(Path(hizli.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])}
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.time()
    timed_out = False
    with open(log, "w") as f, open(log) as follow:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        pending = ""
        while True:  # everything goes to the log; the trial lines are shown as they come
            done = proc.poll() is not None
            pending += follow.read()
            *lines, pending = pending.split("\n")
            for line in lines:
                if line.startswith("["):
                    print("  " + line, flush=True)
            if done:
                break
            if bench.worker_timeout and time.time() - t0 > bench.worker_timeout:
                timed_out = True
                proc.kill()
                proc.wait()
                break
            time.sleep(0.5)
    rc = proc.returncode
    print(f"  exit {rc} after {time.time() - t0:.0f} s (log {log})", flush=True)
    doc = json.loads(out.read_text()) if out.is_file() else {"system": system, "cap": cap, "done": False}
    doc["wall_s"] = round(time.time() - t0, 1)
    if timed_out:
        doc["error"] = f"worker killed after worker_timeout {bench.worker_timeout} s"
    elif rc != 0 or not doc.get("done"):
        tail = log.read_text().splitlines()[-20:]
        print("  " + "\n  ".join(tail))
        doc["error"] = f"worker exit {rc}: " + (tail[-1] if tail else "")
    if not doc.get("done") and doc.get("trials"):  # cut short: what its trials showed
        oks = [t["len"] for t in doc["trials"] if t["ok"]]
        fails = [t["len"] for t in doc["trials"] if not t["ok"] and (not oks or t["len"] > max(oks))]
        doc.update(
            longest_ok=max(oks) if oks else None,
            first_fail=min(fails) if fails else None,
            stopped=doc.get("stopped") or "worker did not finish; figures from its completed trials",
        )
    return doc


def render(results: dict[str, dict[str, dict]], caps: list[str], systems: list[str]) -> str:
    """The table of longest lengths per cap and system, and who went further at each cap."""
    lines = [
        f"{'cap':<12}{'system':<9}{'longest ok':>12}{'first fail':>12}{'recheck':>9}{'peak GiB':>10}"
        f"{'trials':>8}{'search s':>10}{'load s':>8}"
    ]
    verdicts = []
    for cap in caps:
        for system in systems:
            r = results.get(system, {}).get(cap)
            if r is None:
                continue
            peak = peak_at_longest(r)
            recheck = {True: "held", False: "FAILED", None: "-"}[r.get("rechecked")]
            lines.append(
                f"{cap_label(cap):<12}{system:<9}{_n(r.get('longest_ok')):>12}{_n(r.get('first_fail')):>12}"
                f"{recheck:>9}{'-' if peak is None else f'{peak:.2f}':>10}{len(r.get('trials', [])):>8}"
                f"{_n(r.get('search_s')):>10}{_n(r.get('load_s')):>8}"
            )
            for note in (r.get("stopped"), r.get("error"), r.get("skipped")):
                if note:
                    lines.append(f"{'':<21}note: {note}")
        h, u = results.get("hizli", {}).get(cap), results.get("unsloth", {}).get(cap)
        if h and u and h.get("done") and u.get("done"):
            hl, ul = h.get("longest_ok") or 0, u.get("longest_ok") or 0
            bound = " (both reached max_len)" if h.get("reached_limit") and u.get("reached_limit") else ""
            verdicts.append(
                f"{cap_label(cap)}: hizli {_n(hl)} vs Unsloth {_n(ul)} tokens: "
                f"{'hizli >= Unsloth' if hl >= ul else 'hizli < Unsloth'}{bound}"
            )
    return "\n".join(lines + verdicts)


def peak_at_longest(r: dict[str, Any]) -> float | None:
    ok = [t for t in r.get("trials", []) if t["ok"] and t["len"] == r.get("longest_ok")]
    return ok[-1]["peak_reserved_gib"] if ok else None


def _n(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:,}" if isinstance(v, int) else f"{v:g}"


def to_record(
    bench: LongestBench,
    r: dict[str, Any],
    max_len: int,
    source: dict[str, Any],
    *,
    command: str,
    call: str,
    device: dict[str, Any],
) -> dict[str, Any]:
    """One (system, cap) result in the results schema."""
    from hizli.bench import results

    settings = {
        "shape": bench.shape,
        "cap": r["cap"],
        "cap_gib": r.get("cap_gib"),
        "start": bench.start,
        "max_len": max_len,
        "resolution": bench.resolution,
        "trial_timeout": bench.trial_timeout,
        "search_budget": bench.search_budget,
        "free_memory": bench.free_memory,
        "tokens": source,
        "definition": DEFINITION,
    }
    metrics = {
        k: r.get(k)
        for k in (
            "longest_ok",
            "first_fail",
            "reached_limit",
            "rechecked",
            "stopped",
            "error",
            "skipped",
            "load_s",
            "search_s",
            "wall_s",
        )
    }
    metrics["peak_reserved_gib_at_longest"] = peak_at_longest(r)
    metrics["trials"] = [
        {k: t.get(k) for k in ("len", "ok", "seconds", "peak_reserved_gib", "kind", "error", "recheck")}
        for t in r.get("trials", [])
    ]
    extra = ("unsloth",) if r["system"] == "unsloth" else ()
    return results.make_record(
        "longest",
        r["system"],
        settings,
        metrics,
        command=command,
        call=call,
        device=device,
        env=results.env_info(extra),
    )


def bench_longest(bench: LongestBench, results_dir: str | None = None) -> int:
    """Search every (system, cap) pair, print the table, append the records; 1 if a worker failed."""
    import numpy as np

    from hizli.bench import results
    from hizli.bench.longest.trials import token_stream
    from hizli.bench.shapes import recipe_model_folder

    if bench.start < 1 or bench.resolution < 1:
        raise ValueError(f"start={bench.start}, resolution={bench.resolution}: both must be >= 1")
    work = Path(bench.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(bench.model)
    if not (model / "tokenizer_config.json").is_file():
        model = recipe_model_folder(bench.shape, bench.tokenizer, model.parent)
    bench.model = str(model)
    max_len = bench.max_len or model_max_len(model)
    t0 = time.time()
    ids, source = token_stream(model, bench.data, max_len)
    tokens_path = work / "longest-tokens.npy"
    np.save(tokens_path, np.asarray(ids, dtype=np.int32))
    print(
        f"{max_len:,} tokens from {source['rows']} rows of {bench.data} ({time.time() - t0:.1f} s)"
        f"{' (repeated)' if source['repeated'] else ''}",
        flush=True,
    )
    command = " ".join(shlex.quote(a) for a in ["hizli", *sys.argv[1:]])
    device, call = results.device_info(), None
    found: dict[str, dict[str, dict]] = {}
    for cap in bench.caps:
        for system in bench.systems:
            if system == "unsloth" and importlib.util.find_spec("unsloth") is None:
                print(f"unsloth @ {cap_label(cap)}: unsloth is not importable here; skipped", flush=True)
                found.setdefault(system, {})[cap] = {
                    "system": system,
                    "cap": cap,
                    "skipped": "unsloth not importable",
                    "trials": [],
                }
                continue
            found.setdefault(system, {})[cap] = run_worker(bench, system, cap, tokens_path, max_len)
    records = []
    for system, by_cap in found.items():
        for r in by_cap.values():
            record = to_record(bench, r, max_len, source, command=command, call=call or "", device=device)
            call = call or record["call"]
            record["call"] = call
            records.append(record)
    print(render(found, list(bench.caps), [s for s in SYSTEMS if s in found]))
    if results_dir and records:
        print(f"records appended to {results.append(results_dir, records)}")
    return 0 if all(r.get("done") or r.get("skipped") for by_cap in found.values() for r in by_cap.values()) else 1
