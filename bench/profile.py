"""Optional: sample the coordinator with py-spy while kill rounds run (``--profile``).

py-spy is not a dependency of the harness; with ``--profile`` and py-spy on PATH (or next to
the interpreter), the rounds of each profiled size are sampled at a low rate in non-blocking
mode and summarised into ``profile-<label>.txt`` beside the results: where the coordinator's
samples fall, by function, self and inclusive.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from bench.harness import Bench, say


class _Process(Protocol):
    @property
    def pid(self) -> int: ...


def _py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def profiling(bench: Bench, coord: _Process, label: str, *, on: bool) -> Iterator[None]:
    """Sample ``coord`` (a coordinator, or a floor's server) while the block runs, if ``on``
    and py-spy is at hand."""
    tool = _py_spy()
    if not on or tool is None or bench.out is None:
        yield
        return
    raw = bench.scratch / f"profile-{label}.raw"
    proc = subprocess.Popen(
        [tool, "record", "-p", str(coord.pid), "-r", "100", "--nonblocking", "-f", "raw",
         "-o", str(raw)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if raw.exists():
            dest = bench.out / f"profile-{label}.txt"
            dest.write_text(summarise(raw, f"server during kill rounds, {label}"))
            say(f"profile: {dest}")


def _name(frame: str) -> str:
    """``func (a/b/file.py:123)`` -> ``func (b/file.py)``: lines of one function together."""
    match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not match:
        return frame
    func, where = match.groups()
    path = Path(where)
    return f"{func} ({path.parent.name}/{path.name})"


def summarise(raw: Path, title: str, top: int = 30) -> str:
    total = 0
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        raw_frames = [f for f in stack.split(";") if f]
        frames = [_name(f) for f in raw_frames]
        if frames:
            own[frames[-1]] += n
        for frame in reversed(raw_frames):  # the innermost Tether line on the stack
            if "tether_server" in frame or "/tether/" in frame:
                lines[frame.rsplit("/", 1)[-1]] += n
                break
        for frame in set(frames):
            incl[frame] += n
    if not total:
        return f"# {title}\n\nno samples\n"
    out = [f"# {title}", f"# {total} samples at 100 Hz (py-spy, non-blocking)", "", "## self"]
    out += [f"{100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    out += ["", "## inclusive (tether and grpc.aio frames)"]
    keep = [(f, n) for f, n in incl.most_common() if "tether" in f or "(aio/" in f]
    out += [f"{100 * n / total:5.1f}%  {f}" for f, n in keep[:top]]
    out += ["", "## innermost Tether source line (native gRPC work lands on the line calling it)"]
    out += [f"{100 * n / total:5.1f}%  {f}" for f, n in lines.most_common(top)]
    return "\n".join(out) + "\n"
