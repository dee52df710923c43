"""Diagnosis, not a benchmark: where a coordinator's event loop goes when it lags.

    PYTHONPATH=bench/lagwatch python bench/run.py --only killmux --killmux-big --keep ...

Python imports ``sitecustomize`` at start-up from the path, so every process the bench
starts imports this; it does something only in a ``tether serve`` process. A thread samples
the main thread's stack every 5 ms. Each stretch of more than 300 ms in which the main
thread was never seen waiting in the loop's ``select`` (the loop running flat out, or one
call holding it) is written to ``$LAGWATCH_DIR/lag-PID.log`` (default: the system's temp
dir), with the six places its samples fell most often (the innermost three frames of
Tether's own code, or the innermost frame when no Tether frame was on the stack).
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile
import threading
import time
from types import FrameType
from typing import TextIO

_STRETCH = 0.3  # seconds outside select worth a line
_EVERY = 0.005  # seconds between samples


def _command() -> list[bytes]:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _where(frame: FrameType | None) -> str:
    inner, ours = "", list[str]()
    while frame is not None:
        code = frame.f_code
        name = f"{code.co_name} ({os.path.basename(code.co_filename)}:{frame.f_lineno})"
        inner = inner or name
        if "tether" in code.co_filename and len(ours) < 3:
            ours.append(name)
        frame = frame.f_back
    return " < ".join(ours) or inner


def _watch(main: int, out: TextIO) -> None:
    started: float | None = None
    places: collections.Counter[str] = collections.Counter()
    while True:
        time.sleep(_EVERY)
        frame = sys._current_frames().get(main)
        if frame is None:
            continue
        now = time.monotonic()
        if frame.f_code.co_name == "select":
            if started is not None and now - started > _STRETCH:
                top = "; ".join(f"{n}x {w}" for w, n in places.most_common(6))
                out.write(f"{time.strftime('%H:%M:%S')} busy {now - started:.2f}s: {top}\n")
            started, places = None, collections.Counter()
            continue
        started = now if started is None else started
        places[_where(frame)] += 1


def _start() -> None:
    command = _command()
    if b"serve" not in command or b"tether" not in command:
        return
    folder = os.environ.get("LAGWATCH_DIR", tempfile.gettempdir())
    out = open(os.path.join(folder, f"lag-{os.getpid()}.log"), "a", buffering=1)  # noqa: SIM115
    main = threading.main_thread().ident
    assert main is not None
    threading.Thread(target=_watch, args=(main, out), daemon=True, name="lagwatch").start()


_start()
