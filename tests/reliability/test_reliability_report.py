"""docs/RELIABILITY.md is written from figures of complete, passing runs only, and never hides a failure."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest


@pytest.fixture
def report(tmp_path, monkeypatch):
    """A private copy of the suite's conftest (its generator), writing into a temporary document."""
    spec = importlib.util.spec_from_file_location("reliability_report", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "DOC", tmp_path / "docs" / "RELIABILITY.md")
    return module


def _store(report, test_file: Path, **sections):
    """A session's record: section id -> (outcomes of its tests, figures recorded, deselected?)."""
    store = {"figures": {}, "items": {}, "deselected": set(), "outcomes": {}, "errors": {}, "gaps": {}}
    for sid, (outcomes, values, deselected) in sections.items():
        nodes = [f"{test_file.name}::test_{sid}_{i}" for i in range(len(outcomes))]
        store["items"][sid] = [(n, str(test_file)) for n in nodes]
        store["outcomes"].update(zip(nodes, outcomes))
        store["figures"][sid] = values
        for n, o in zip(nodes, outcomes):
            if o == "failed":
                store["errors"][n] = ["AssertionError: boom"]
        if deselected:
            store["deselected"].add(sid)
    return store


def _all(report, sid, value=1):
    return {k: value for k, _ in report.BY_ID[sid].figures}


def test_only_complete_passing_sections_are_refreshed(report, tmp_path):
    test_file = tmp_path / "test_x.py"
    test_file.write_text("# v1")
    first = _store(
        report,
        test_file,
        data=(["passed"], _all(report, "data", 7), False),
        soak=(["passed"], _all(report, "soak", 3), False),
    )
    assert report._update_document(first).startswith("docs/RELIABILITY.md written: refreshed data, soak")
    text = report.DOC.read_text()
    assert "| inputs generated (row lists and files) | 7 |" in text and "not run yet" in text

    # a later session: data fails, soak runs only in part (a figure missing), kill9 deselected
    second = _store(
        report,
        test_file,
        data=(["passed", "failed"], _all(report, "data", 9), False),
        soak=(["passed"], {"steps": 5}, False),
        kill9=(["passed"], _all(report, "kill9", 1), True),
    )
    message = report._update_document(second)
    assert "FAILED data" in message and "kept from earlier runs: soak" in message
    text = report.DOC.read_text()
    data = text[text.index("## Bad data") : text.index("## Bad recipes")]
    assert "**FAILED**" in data and "AssertionError: boom" in data  # the failure is shown, not the old numbers
    soak = text[text.index("## Long run") : text.index("<!--")]
    assert "| steps | 3 |" in soak  # the complete earlier run's figures, with that run's date
    assert "kill -9 at random moments | not run yet" in text

    # the test file changes: the kept figures are flagged, not silently presented as current
    test_file.write_text("# v2")
    third = _store(report, test_file, recipes=(["passed"], _all(report, "recipes", 2), False))
    report._update_document(third)
    text = report.DOC.read_text()
    soak_row = next(line for line in text.splitlines() if line.startswith("| [Long run"))
    assert "outdated" in soak_row
    data = json.loads(re.search(r"<!-- reliability-data\n(.*?)\n-->", text, re.S).group(1))["sections"]
    assert set(data) == {"data", "soak", "recipes"} and data["data"]["status"] == "failed"


def test_nothing_is_written_when_no_section_completed(report, tmp_path):
    test_file = tmp_path / "test_x.py"
    test_file.write_text("")
    store = _store(report, test_file, data=(["skipped"], {}, False), kill9=(["passed"], {"kills": 1}, False))
    assert report._update_document(store).startswith("docs/RELIABILITY.md not updated")
    assert not report.DOC.exists()
