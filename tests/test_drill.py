"""The drill as a permanent regression test: every scope, small fleet, short settle."""

from __future__ import annotations

import json
import subprocess
import sys


def test_drill_passes_at_every_scope() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tether._cli", "drill", "--settle", "0.5", "--items", "120",
         "-o", "json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    report = json.loads(result.stdout)
    failed = [
        (d["scope"], c["text"])
        for d in report["drills"]
        for c in d["checks"]
        if c["status"] == "FAIL"
    ]
    assert failed == []
    assert result.returncode == 0, result.stderr
    assert [d["scope"] for d in report["drills"]] == [
        "capability",
        "run",
        "agent",
        "tenant",
        "global",
    ]
    for d in report["drills"]:
        hit = [w for w in d["workers"] if w["targeted"]]
        spared = [w for w in d["workers"] if not w["targeted"]]
        assert hit, d["scope"]
        assert all(w["stopped"] and w["time_to_stop_ms"] is not None for w in hit)
        assert not any(w["stopped"] for w in spared)
        assert all(w["queue_at_flip"] == w["queue_after_settle"] > 0 for w in hit)
        assert all(not w["lost"] and not w["duplicated"] for w in d["workers"])
    assert len(spared) == 0  # the last drill is global: nothing is spared


def test_global_drill_against_a_live_coordinator_needs_consent() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tether._cli", "drill", "--scope", "global", "--addr", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--allow-global" in result.stderr
