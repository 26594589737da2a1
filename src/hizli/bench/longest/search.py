"""The search behind ``hizli bench longest``: the longest length for which a trial succeeds.

Lengths grow x2 from a start until a failure or the limit, then bisect between the last success and
the first failure down to a resolution. The same search finds the largest batch that fits a memory
cap (``hizli bench compare``'s T4 class).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable


@dataclass
class Trial:
    """One attempt at one length."""

    len: int
    ok: bool
    seconds: float = 0.0
    peak_reserved_gib: float | None = None
    peak_allocated_gib: float | None = None
    error: str | None = None
    kind: str | None = None  # why it failed: "oom", "over-cap" or "error"
    fatal: bool = False  # the process cannot run another trial (e.g. the CUDA context is lost)
    recheck: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchResult:
    longest_ok: int | None  # longest length that trained (None: not even the shortest tried)
    first_fail: int | None  # shortest length that failed above it (None: none failed)
    reached_limit: bool
    rechecked: bool | None  # the answer trained again at the end (None: not rechecked)
    stopped: str | None  # why the search ended before reaching the resolution, if it did
    trials: list[Trial]

    def to_dict(self) -> dict[str, Any]:
        return {
            "longest_ok": self.longest_ok,
            "first_fail": self.first_fail,
            "reached_limit": self.reached_limit,
            "rechecked": self.rechecked,
            "stopped": self.stopped,
            "trials": [asdict(t) for t in self.trials],
        }


def find_longest(
    try_len: Callable[[int], Trial | bool],
    start: int,
    limit: int,
    resolution: int,
    *,
    trial_timeout: float | None = None,
    recheck: str = "auto",
    budget_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    on_trial: Callable[[Trial], None] | None = None,
) -> SearchResult:
    """The longest length in [1, limit] for which ``try_len`` succeeds, assuming success is monotone.

    Grows from ``start`` by x2 (the last step clipped to ``limit``) until a failure or ``limit``, then
    bisects between the last success and the first failure until they are at most ``resolution``
    apart (a failure at ``start`` bisects below it). ``try_len`` returns a Trial or a bool.

    Stops early, saying why in ``stopped``: a successful trial slower than ``trial_timeout`` seconds
    (longer ones would be slower still; not the first trial, which pays for compilation and warm-up),
    a trial marked ``fatal``, or ``budget_s`` seconds spent.
    ``recheck``: "auto" tries the answer once more if any trial failed (a failure can leave memory
    fragmented), "always" does in any case, "never" does not; none after a fatal trial or with the
    budget spent.
    """
    if resolution < 1 or start < 1 or limit < 1:
        raise ValueError("start, limit and resolution must be >= 1")
    if recheck not in ("auto", "always", "never"):
        raise ValueError(f"recheck={recheck!r}: use auto, always or never")
    trials: list[Trial] = []
    t0 = clock()
    stopped: str | None = None

    def attempt(length: int, is_recheck: bool = False) -> Trial:
        out = try_len(length)
        trial = out if isinstance(out, Trial) else Trial(len=length, ok=bool(out))
        trial.len, trial.recheck = length, is_recheck
        trials.append(trial)
        if on_trial is not None:
            on_trial(trial)
        return trial

    def halt(trial: Trial) -> str | None:
        if trial.fatal:
            return f"trial at {trial.len} left the process unable to continue: {trial.error}"
        # the first trial carries one-time work (kernel compilation, caches): it does not predict the next
        if trial.ok and trial_timeout is not None and trial.seconds > trial_timeout and len(trials) > 1:
            return (
                f"trial at {trial.len} took {trial.seconds:.0f} s > --trial-timeout {trial_timeout:.0f} s; "
                "longer ones were not tried"
            )
        if budget_s is not None and clock() - t0 > budget_s:
            return f"search budget of {budget_s:.0f} s spent"
        return None

    lo, hi = 0, None  # lo: longest success (0 = none yet), hi: shortest failure

    def probe(length: int) -> tuple[Trial, str | None]:
        nonlocal lo, hi
        trial = attempt(length)
        if trial.ok:
            lo = length
        else:
            hi = length
        return trial, halt(trial)

    length = min(start, limit)
    while True:  # grow
        trial, stopped = probe(length)
        if not trial.ok or stopped or length >= limit:
            break
        length = min(2 * length, limit)
    while stopped is None and hi is not None and hi - lo > resolution:  # bisect
        _, stopped = probe(lo + max(resolution, (hi - lo) // 2 // resolution * resolution))
    rechecked = None
    failed = any(not t.ok for t in trials)
    unable = any(t.fatal for t in trials) or (budget_s is not None and clock() - t0 > budget_s)
    if lo and not unable and (recheck == "always" or (recheck == "auto" and failed)):
        rechecked = attempt(lo, is_recheck=True).ok
    return SearchResult(
        longest_ok=lo or None,
        first_fail=hi,
        reached_limit=bool(lo) and lo >= limit,
        rechecked=rechecked,
        stopped=stopped,
        trials=trials,
    )


# ------------------------------------------------------------------------------------------- caps
def parse_caps(text: str) -> list[str]:
    """ "8,whole" -> ["8", "whole"]: GiB numbers (> 0) or "whole" (the card)."""
    caps = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        if item != "whole":
            try:
                ok = float(item) > 0
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"--caps: {item!r} is neither a number of GiB > 0 nor 'whole'")
        caps.append(item)
    if not caps:
        raise ValueError("--caps is empty")
    return caps


def cap_label(cap: str) -> str:
    return "whole card" if cap == "whole" else f"{float(cap):g} GiB"
