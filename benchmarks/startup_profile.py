#!/usr/bin/env python3
"""Where does the time to the first step go? ``hizli bench`` under a sampling profiler.

    python3 benchmarks/startup_profile.py --json OUT.json -- <hizli bench arguments>

A thread samples the main thread's stack every 10 ms (cheap enough not to move the figures, unlike
cProfile) and counts, for each function, the samples it was on the stack (inclusive) and on top of
it (self). Every Triton compilation is timed too (name, seconds, cache hit or not), so a cold and a
warm Triton cache can be compared. The output holds the bench result's ``startup_s`` phases, the
compilations and the top functions until the first step finished.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


class Sampler:
    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.stop_at = interval, None
        self.inclusive: collections.Counter[str] = collections.Counter()
        self.leaf: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self.main = threading.main_thread().ident
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _name(frame) -> str:
        code = frame.f_code
        parts = Path(code.co_filename).parts
        short = "/".join(parts[-2:]) if len(parts) > 1 else code.co_filename
        return f"{short}:{code.co_name}"

    def _run(self) -> None:
        while self.stop_at is None:
            frame = sys._current_frames().get(self.main)
            if frame is not None:
                self.samples += 1
                self.leaf[self._name(frame)] += 1
                seen = set()
                while frame is not None:
                    seen.add(self._name(frame))
                    frame = frame.f_back
                self.inclusive.update(seen)
            time.sleep(self.interval)

    def report(self, top: int) -> dict:
        scale = self.interval
        return {"samples": self.samples, "interval_s": self.interval,
                "inclusive_s": {k: round(v * scale, 2) for k, v in self.inclusive.most_common(top)},
                "self_s": {k: round(v * scale, 2) for k, v in self.leaf.most_common(top // 2)}}


def watch_triton(events: list[dict]) -> None:
    """Time every Triton compile (``triton.compiler.compile``, which the JIT calls on a cache miss
    of its in-memory cache; a hit of the on-disk cache is fast and shows as such)."""
    try:
        import triton.compiler as tc
        import triton.compiler.compiler as tcc
    except ImportError:
        return
    original = tcc.compile

    def timed(src, *args, **kwargs):
        t0 = time.time()
        out = original(src, *args, **kwargs)
        events.append({"kernel": getattr(getattr(src, "fn", None), "__name__", str(src)),
                       "seconds": round(time.time() - t0, 3), "thread": threading.current_thread().name})
        return out

    tcc.compile = timed
    tc.compile = timed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--top", type=int, default=80)
    p.add_argument("bench", nargs=argparse.REMAINDER, help="-- then hizli bench's arguments")
    a = p.parse_args()
    sampler = Sampler()
    sampler.thread.start()
    compiles: list[dict] = []
    watch_triton(compiles)
    from hizli.bench.run import process_start_time, run
    from hizli.cli import build_parser

    t_process = process_start_time()
    bench_args = build_parser().parse_args(["bench", *[x for x in a.bench if x != "--"]])
    first: list[float] = []
    import hizli.train.trainer as trainer_mod

    step = trainer_mod.SFTTrainer._step_or_replan

    def timed_step(self, *args, **kwargs):  # stop sampling at the first finished step
        out = step(self, *args, **kwargs)
        if not first:
            first.append(time.time())
            sampler.stop_at = first[0]
        return out

    trainer_mod.SFTTrainer._step_or_replan = timed_step
    result = run(bench_args)
    out = {"first_step_s": result["first_step_s"], "startup_s": result.get("startup_s"),
           "process_to_first_step_s": round(first[0] - t_process, 2) if first else None,
           "tokens_per_s": result["tokens_per_s"], "triton_compiles": compiles,
           "triton_compile_total_s": round(sum(c["seconds"] for c in compiles), 2),
           "profile": sampler.report(a.top)}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("first_step_s", "startup_s", "triton_compile_total_s")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
