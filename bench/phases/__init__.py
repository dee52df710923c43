"""The registry of phases, in the order they run and appear in RESULTS.md.

Each module declares its phase (settings, typed result, table, budget rows) in one file;
adding a phase is a new module here and one line in ``PHASES``.
"""

from __future__ import annotations

from typing import Any

from bench.phase import Phase
from bench.phases import (
    capacity,
    cli,
    failover,
    failure,
    floor,
    kill,
    killmux,
    memory,
    poll,
    stackfloor,
    steady,
)

PHASES: tuple[Phase[Any, Any], ...] = (
    floor.PHASE,
    kill.KILL1,
    kill.KILL2,
    kill.KILL1LONG,
    stackfloor.PHASE,
    killmux.PHASE,
    poll.PHASE,
    capacity.PHASE,
    steady.PHASE,
    memory.PHASE,
    failure.PHASE,
    failover.PHASE,
    cli.PHASE,
)
BY_NAME = {p.name: p for p in PHASES}
