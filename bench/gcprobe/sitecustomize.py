"""A garbage-collector probe for ``tether serve``, loaded by Python at start-up.

    PYTHONPATH=bench/gcprobe python bench/run.py --only kill1 --kill-ttl 30 \
        --sizes 10000 --rounds 4 --keep
    grep GCPROBE /tmp/tether-bench-*/01-kill-1c/coordinator-*.log

Every process started with this folder on PYTHONPATH imports it; only ``tether serve``
acts on it. It times each collection through ``gc.callbacks``, prints any that took over
50 ms, and prints the totals per generation every 10 s to stderr (the coordinator's log).
``GCPROBE_THRESH=a,b,c`` sets ``gc.set_threshold(a, b, c)`` at start-up; the coordinator's
own ``_tune_gc`` replaces it once attached, so that knob only means something on a commit
before it (189ad0f and earlier). Not part of the suite: bench/CHANGES.md, change 5.
"""

import gc
import os
import sys
import threading
import time

if "serve" in sys.argv:
    _started: dict[int, float] = {}
    _totals = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}

    def _timed(phase: str, info: dict[str, int]) -> None:
        generation = info["generation"]
        if phase == "start":
            _started[generation] = time.perf_counter()
            return
        took = time.perf_counter() - _started.pop(generation, time.perf_counter())
        _totals[generation][0] += 1
        _totals[generation][1] += took
        if took > 0.05:
            print(f"GCPROBE gen{generation} {took * 1000:.0f} ms", file=sys.stderr, flush=True)

    def _report() -> None:
        while True:
            time.sleep(10)
            line = " ".join(f"gen{g}:{n}x/{s:.2f}s" for g, (n, s) in _totals.items())
            print(f"GCPROBE totals {line}", file=sys.stderr, flush=True)

    gc.callbacks.append(_timed)
    threading.Thread(target=_report, name="gcprobe", daemon=True).start()
    if thresholds := os.environ.get("GCPROBE_THRESH"):
        gc.set_threshold(*map(int, thresholds.split(",")))
