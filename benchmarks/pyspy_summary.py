#!/usr/bin/env python3
"""Summarise a py-spy ``--format raw`` profile: the share of samples in each function (inclusive and
as the innermost Python frame), over the samples whose stack contains INSIDE.

    python3 benchmarks/pyspy_summary.py PROFILE.raw [--inside _optimizer_step] [--top 60] [--rate 200]

Innermost-frame time of a Python function is time in the C functions it calls directly (torch ops,
kernel launches) or waiting in them; without ``--threads`` only the main thread was sampled, so
``_engine_run_backward`` as the innermost frame is the main thread waiting for the autograd engine's
device thread (backward, and recompute inside it).
"""

from __future__ import annotations

import argparse
import collections
import re


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("profile")
    p.add_argument("--inside", default="_optimizer_step")
    p.add_argument("--top", type=int, default=60)
    p.add_argument("--rate", type=float, default=200.0, help="py-spy's sampling rate (-r)")
    a = p.parse_args()
    rows = []
    for line in open(a.profile, encoding="utf-8"):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if stack:
            rows.append(([re.sub(r":\d+\)", ")", f) for f in stack.split(";")], int(n)))
    picked = [(s, n) for s, n in rows if any(a.inside in f for f in s)]
    total = sum(n for _, n in picked)
    if not total:
        raise SystemExit(f"no samples inside {a.inside!r}")
    inclusive, innermost = collections.Counter(), collections.Counter()
    for stack, n in picked:
        for frame in set(stack):
            inclusive[frame] += n
        innermost[stack[-1]] += n
    print(f"{total} samples inside {a.inside} ({total / a.rate:.1f} s at {a.rate:g} Hz)")
    print("inclusive:")
    for frame, n in inclusive.most_common(a.top):
        print(f"{100 * n / total:6.1f}%  {frame[:140]}")
    print("innermost Python frame:")
    for frame, n in innermost.most_common(a.top // 2):
        print(f"{100 * n / total:6.1f}%  {frame[:140]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
