"""The reliability suite's figures, and docs/RELIABILITY.md rendered from them.

Every test here belongs to one section of the document (``pytestmark = pytest.mark.reliability("id")``)
and records what it did through the ``figures`` fixture (inputs generated, kills injected, resumes
that matched, ...). At the end of the session the document is rewritten from those figures, never by
hand. A section is refreshed only when, in this session, every one of its tests was selected and
passed and every figure it promises was recorded. A section whose test failed is written as FAILED.
A section that did not run (deselected, skipped, only part of it selected) keeps the figures of its
last complete run, shown with that run's date and commit, and is flagged as outdated when its test
file changed since. The figures of every section live in the document itself (a JSON block in an
HTML comment at its end), so the document and its data cannot drift apart.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "RELIABILITY.md"
DATA_BEGIN, DATA_END = "<!-- reliability-data", "-->"


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    claim: str
    figures: tuple[tuple[str, str], ...]  # (key, label), in display order; every key is required


SECTIONS = (
    Section(
        "data",
        "Bad data, fuzzed",
        "Random and mutated ShareGPT / messages / Alpaca / text / pre-tokenized rows and files (wrong types, "
        "missing keys, huge values, control characters, lone surrogates, invalid UTF-8 bytes, BOMs, empty "
        "files, files cut at every byte, a 1 MB turn) go through loading, standardisation, rendering and "
        "tokenisation. Every input ends in a clear per-row problem or a counted skip, never an uncaught "
        "exception, and rows in = rows used + rows reported.",
        (
            ("inputs", "inputs generated (row lists and files)"),
            ("rows", "rows in those inputs"),
            ("files", "files written and read (mutated bytes)"),
            ("cut_points", "cut points of a file cut mid-record (every byte)"),
            ("problems", "per-row problems reported"),
            ("problem_kinds", "problem kinds seen"),
            ("api_errors", "whole-call ValueErrors naming the row (standardize_sharegpt)"),
            ("uncaught", "uncaught exceptions"),
            ("accounting_errors", "inputs where rows in != used + reported"),
            ("big_turn_chars", "characters in one turn of the 1 MB rows"),
            ("big_turn_s", "seconds to load and tokenize two such rows"),
        ),
    ),
    Section(
        "recipes",
        "Bad recipes",
        "Recipe files with unknown keys, wrong types, out-of-range values, missing files, paths escaping the "
        "working folder and incompatible settings report every problem together, before any model is loaded "
        "(the loader is replaced by one that fails the test if called).",
        (
            ("recipes", "bad recipes tried"),
            ("problems", "problems expected and reported"),
            ("max_per_recipe", "most problems reported by one recipe"),
            ("model_loads", "model loads attempted"),
        ),
    ),
    Section(
        "numerics",
        "Numerical faults",
        "A NaN/inf loss or gradient stops the optimizer step before the weights change (weights and optimizer "
        "state compared bit for bit), the error names the step and the rows; nan_policy='skip' skips and goes "
        "on; a run whose every label is masked refuses to start.",
        (
            ("faults", "faults injected"),
            ("stopped_unchanged", "stops with weights and optimizer state unchanged"),
            ("skipped_continued", "skips that continued to the last step"),
            ("all_masked_refused", "all-masked runs refused"),
        ),
    ),
    Section(
        "oom",
        "Out of GPU memory, explained (CPU, synthetic errors)",
        "torch.OutOfMemoryError becomes GPUOutOfMemoryError: how much was asked, what was free of the card's "
        "total, and which setting to lower, in the order that saves the most (under a cap, how far to raise it).",
        (("messages", "OOM messages parsed"), ("trainer_steps", "trainer steps that raised it with grads freed")),
    ),
    Section(
        "oom-gpu",
        "Out of GPU memory, real (GPU)",
        "An allocation past the card's memory and a training step too large for it raise the explained "
        "error with the requested and free figures of the real card.",
        (
            ("device", "GPU"),
            ("requested_gib", "requested (GiB)"),
            ("free_gib", "free (GiB)"),
            ("total_gib", "total (GiB)"),
            ("trainer_oom", "training steps that ran out and were explained"),
        ),
    ),
    Section(
        "signals",
        "Ctrl-C and SIGTERM",
        "SIGINT or SIGTERM during data preparation, a training step or a checkpoint write stops the run "
        "cleanly: before the first step nothing is written and no checkpoint is touched; from the first step "
        "on, the run finishes the step (and any write in progress), saves a checkpoint and stops. A second "
        "signal stops at once: a write it cuts short is removed (unless already renamed into place), leaving "
        "the previous checkpoint. Every run resumed from these checkpoints logs the uninterrupted run's losses.",
        (
            ("signals", "signals sent"),
            ("during_prep", "during data preparation"),
            ("during_step", "during a step"),
            ("during_write", "during a checkpoint write"),
            ("resumed_matched", "resumed runs whose losses matched (<= 1e-6)"),
        ),
    ),
    Section(
        "kill9",
        "kill -9 at random moments",
        "The training process is killed with SIGKILL at random moments, including inside checkpoint writes, "
        "again and again; each time the next run resumes from the last complete checkpoint and logs the same "
        "losses as an uninterrupted run (CPU, fp32, <= 1e-6); at most the steps since that checkpoint are lost.",
        (
            ("kills", "kills injected"),
            ("kills_in_write", "kills inside a checkpoint write"),
            ("kills_before_first_checkpoint", "kills before any checkpoint existed"),
            ("resumes_matched", "resumed runs that logged steps, all matching"),
            ("max_loss_diff", "largest loss difference"),
            ("max_steps_lost", "most steps lost to one kill"),
            ("save_steps", "checkpoint interval (steps)"),
        ),
    ),
    Section(
        "disk-full",
        "Disk full during a save",
        "A write failing with ENOSPC in the middle of a checkpoint leaves the previous checkpoint intact and "
        "verified, removes the partial one, and says so; training resumes from it.",
        (("write_points", "write points failed with ENOSPC"), ("previous_intact", "previous checkpoint intact")),
    ),
    Section(
        "safe-loading",
        "Safe loading",
        "Pickle weights are refused unless allow_pickle=True; trust_remote_code stays off unless asked; paths "
        "with '..' from recipes or checksum indexes cannot leave their folder; a corrupted checkpoint is found "
        "by its checksum and refused.",
        (("cases", "cases checked"), ("refused", "unsafe inputs refused")),
    ),
    Section(
        "soak",
        "Long run (soak)",
        "A tiny model trains for thousands of steps with checkpoints and rotation: memory stays flat and "
        "exactly save_total_limit checkpoints remain.",
        (
            ("steps", "steps"),
            ("checkpoints_written", "checkpoints written"),
            ("kept", "checkpoints kept"),
            ("save_total_limit", "save_total_limit"),
            ("rss_warm_mib", "RSS after warm-up (MiB)"),
            ("rss_end_mib", "RSS at the end (MiB)"),
            ("rss_growth_pct", "largest RSS growth after warm-up (%)"),
            ("rss_growth_mib", "largest RSS growth after warm-up (MiB)"),
            ("seconds", "wall time (s)"),
        ),
    ),
)
BY_ID = {s.id: s for s in SECTIONS}
_STORE = pytest.StashKey[dict]()


_active_store: dict | None = None  # test reports carry no config; this conftest serves one session


def pytest_configure(config):
    global _active_store
    config.stash[_STORE] = _active_store = {
        "figures": {},
        "items": {},
        "deselected": set(),
        "outcomes": {},
        "errors": {},
        "gaps": {},
        "result": None,
    }


class Figures:
    """What one test records for its section; values are summed (``add``) or set (``set``)."""

    def __init__(self, store: dict, nodeid: str, section: str) -> None:
        assert section in BY_ID, f"unknown reliability section {section!r}"
        self._values = store["figures"].setdefault(section, {})
        self.section = section

    def set(self, **values: Any) -> None:
        for key, value in values.items():
            assert key in dict(BY_ID[self.section].figures), f"{self.section}: undeclared figure {key!r}"
            self._values[key] = value

    def add(self, **values: Any) -> None:
        for key, value in values.items():
            assert key in dict(BY_ID[self.section].figures), f"{self.section}: undeclared figure {key!r}"
            self._values[key] = self._values.get(key, 0) + value

    def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads spend most of a tiny model's step
    waiting for each other (250 ms against 12 ms per step, measured), and results stay reproducible."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def figures(request) -> Figures:
    """The recorder of this test's section (from its ``reliability`` marker)."""
    marker = request.node.get_closest_marker("reliability")
    assert marker is not None, "tests using `figures` need pytest.mark.reliability(SECTION)"
    return Figures(request.config.stash[_STORE], request.node.nodeid, marker.args[0])


def _section_of(item) -> str | None:
    marker = item.get_closest_marker("reliability")
    return marker.args[0] if marker else None


def pytest_deselected(items):
    for item in items:
        section = _section_of(item)
        if section:
            item.config.stash[_STORE]["deselected"].add(section)


def pytest_collection_finish(session):
    store = session.config.stash[_STORE]
    for item in session.items:
        section = _section_of(item)
        if section:
            store["items"].setdefault(section, []).append((item.nodeid, str(item.path)))


def pytest_runtest_logreport(report):
    # every test of the session passes through here; only this suite's ("items") are read at the end
    store = _active_store
    if store is None:
        return
    outcome = store["outcomes"].get(report.nodeid, "passed")
    if report.failed:
        outcome = "failed"
        store["errors"].setdefault(report.nodeid, report.longreprtext.strip().splitlines()[-1:] or ["failed"])
    elif report.skipped and hasattr(report, "wasxfail") and outcome != "failed":
        outcome = "xfailed"  # a strict xfail: a known gap, written into the document as such
        store["gaps"][report.nodeid] = report.wasxfail
    elif report.skipped and outcome != "failed":
        outcome = "skipped"
    store["outcomes"][report.nodeid] = outcome


def pytest_sessionfinish(session, exitstatus):
    store = session.config.stash[_STORE]
    if not store["items"] or session.config.option.collectonly:
        return
    if not session.config.getoption("reliability_doc"):
        store["result"] = "docs/RELIABILITY.md left as it is (scripts/reliability-report rewrites it)"
        return
    try:
        store["result"] = _update_document(store)
    except Exception as e:  # the document must never hide a test result; say why it was not written
        store["result"] = f"docs/RELIABILITY.md not updated: {type(e).__name__}: {e}"


def pytest_terminal_summary(terminalreporter):
    store = terminalreporter.config.stash[_STORE]
    if store.get("result"):
        terminalreporter.write_line(store["result"])


# ---------------------------------------------------------------- the document
def _file_hash(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in sorted(set(paths)):
        try:
            h.update(Path(p).read_bytes())
        except OSError:
            h.update(b"missing")
    return h.hexdigest()[:16]


def _run_info() -> dict[str, str]:
    import torch

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=DOC.parent, capture_output=True, text=True, timeout=10)
            return out.stdout.strip()
        except Exception:
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " + local changes"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _read_data() -> dict[str, Any]:
    if not DOC.is_file():
        return {}
    text = DOC.read_text(encoding="utf-8")
    m = re.search(re.escape(DATA_BEGIN) + r"\n(.*?)\n" + re.escape(DATA_END), text, re.S)
    if not m:
        return {}
    try:
        return json.loads(m.group(1)).get("sections", {})
    except json.JSONDecodeError:
        return {}


def _update_document(store: dict) -> str:
    old = _read_data()
    info = _run_info()
    new = dict(old)
    refreshed, failed, kept = [], [], []
    for section in SECTIONS:
        items = store["items"].get(section.id)
        if not items:
            continue
        outcomes = [store["outcomes"].get(nodeid, "not run") for nodeid, _ in items]
        values = store["figures"].get(section.id, {})
        entry = {
            "figures": values,
            "run": info,
            "tests": [n for n, _ in items],
            "files": sorted({os.path.relpath(p, DOC.parent.parent) for _, p in items}),
            "hash": _file_hash([p for _, p in items]),
        }
        if "failed" in outcomes:
            entry["status"] = "failed"
            entry["errors"] = {
                n: store["errors"].get(n, ["failed"]) for n, _ in items if store["outcomes"].get(n) == "failed"
            }
            new[section.id] = entry
            failed.append(section.id)
            continue
        missing = [k for k, _ in section.figures if k not in values]
        complete = (
            section.id not in store["deselected"] and all(o in ("passed", "xfailed") for o in outcomes) and not missing
        )
        if complete:
            entry["status"] = "passed"
            entry["gaps"] = {n: store["gaps"][n] for n, _ in items if n in store["gaps"]}
            new[section.id] = entry
            refreshed.append(section.id)
        else:
            kept.append(section.id)
    if not refreshed and not failed:
        return (
            "docs/RELIABILITY.md not updated: no section ran completely in this session "
            f"({', '.join(kept)} ran only in part or were skipped)"
        )
    text = _render(new)
    tmp = DOC.with_suffix(".md.tmp")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, DOC)
    parts = [f"refreshed {', '.join(refreshed) or 'none'}"]
    if failed:
        parts.append(f"FAILED {', '.join(failed)}")
    others = [s.id for s in SECTIONS if s.id not in refreshed and s.id not in failed and s.id in old]
    if others:
        parts.append(f"kept from earlier runs: {', '.join(others)}")
    return "docs/RELIABILITY.md written: " + "; ".join(parts)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-3 and value else f"{value:,.2f}".rstrip("0").rstrip(".")
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def _render(data: dict[str, Any]) -> str:
    root = DOC.parent.parent
    out = [
        "# Reliability: what was tried, what happened",
        "",
        "Generated from the reliability tier (`tests/reliability/`, see its `conftest.py`); do not edit by "
        "hand. `scripts/reliability-report` refreshes every CPU section; `scripts/reliability-report -m 'reliability and "
        "gpu'` on a GPU machine refreshes the GPU section. A section is rewritten only when all of its tests ran and passed in that "
        "session (or, if one failed, it is shown as FAILED); otherwise it keeps the figures of its last "
        "complete run, with that run's date and commit.",
        "",
        "| section | status | run | key figure |",
        "|---|---|---|---|",
    ]
    body: list[str] = []
    for section in SECTIONS:
        entry = data.get(section.id)
        if entry is None:
            out.append(f"| {section.title} | not run yet | | |")
            body += [f"## {section.title}", "", section.claim, "", "_Not run yet._", ""]
            continue
        status = entry["status"]
        current = _file_hash([str(root / f) for f in entry.get("files", [])])
        outdated = current != entry.get("hash")
        gaps = len(entry.get("gaps", {}))
        shown = (
            {"passed": "passed", "failed": "**FAILED**"}[status]
            + (f", {gaps} known gap{'s' if gaps > 1 else ''}" if gaps else "")
            + (" (**outdated**: its tests changed since this run; run them again)" if outdated else "")
        )
        run = entry["run"]
        key, label = section.figures[0]
        out.append(
            f"| [{section.title}](#{_anchor(section.title)}) | {shown} | {run['date']} | "
            f"{label}: {_fmt(entry['figures'].get(key, '-'))} |"
        )
        body += [
            f"## {section.title}",
            "",
            section.claim,
            "",
            f"Status: {shown}. Run {run['date']}, commit {run['commit']}, {run['device']}, torch {run['torch']}, "
            f"Python {run['python']}.",
            "",
            "| figure | value |",
            "|---|---|",
        ]
        for k, label in section.figures:
            body.append(f"| {label} | {_fmt(entry['figures'].get(k, '(not recorded)'))} |")
        body += ["", "Tests: " + ", ".join(f"`{t}`" for t in entry["tests"]), ""]
        for nodeid, lines in entry.get("errors", {}).items():
            body += [f"Failure in `{nodeid}`: {' '.join(lines)[:300]}", ""]
        for nodeid, reason in entry.get("gaps", {}).items():
            body += [
                f"Known gap (a strict xfail: it fails today, and fails the suite once fixed until the mark "
                f"goes): `{nodeid}`: {reason}",
                "",
            ]
    payload = json.dumps({"sections": data}, indent=1, sort_keys=True).replace(">", "\\u003e")
    return "\n".join(out + [""] + body + [DATA_BEGIN, payload, DATA_END, ""])


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")
