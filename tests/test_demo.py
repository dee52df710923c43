"""The README's worked example stays true: the demo runs and its ledger balances."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).parent.parent / "examples" / "demo.py"


def test_email_campaign_demo_sends_every_batch_exactly_once() -> None:
    result = subprocess.run(
        [sys.executable, str(DEMO)], capture_output=True, text=True, timeout=240
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "300 batches sent, 0 sent twice, 0 missing" in result.stdout, output
    assert "instances exited with [3, 3, 3]" in result.stdout, output
    stale = result.stdout.split("dies hard")[1]
    assert "campaign-43.shard-0" in stale, output
    assert "STALE" in stale, output
    assert "Traceback" not in result.stderr, output
