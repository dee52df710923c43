"""Rule expressions over flat variables, because handing CEL nested maps is most of a call.

Converting ``{"run": {"spend": {"usd": 1.0}}}`` into CEL costs about 1.4 us per map, several
times the evaluation itself. So an expression's references to the context's fixed fields are
rewritten to flat names (``run.spend.usd`` becomes ``run__spend__usd``; ``run.labels.team``
becomes ``run__labels.team``, one map), outside string literals, and the context is passed
as those few values. An expression this cannot rewrite whole (``run`` used as a map,
``has(run.spend)``, a field the context lacks) is left as written and given nested maps.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import cel

LEAVES = {
    "spend": frozenset({"usd", "tokens", "calls"}),
    "effects": frozenset({"total", "writes", "failed", "anomalies"}),
    "rates": frozenset({"error", "anomaly"}),
}
_SCALARS = frozenset({"tenant", "agent", "run_id"})
_RUN_MAPS = frozenset({"labels", "checkpoint"})
_REF = re.compile(r"(?<![\w.])(run|agent|tenant)\s*\.\s*(\w+)(?:\s*\.\s*(\w+))?")
Path = tuple[str, ...]  # root, field[, leaf]


class _Unflat(Exception):
    """The expression reads the context in a way a flat name cannot stand for."""


def _segments(text: str) -> Iterator[tuple[str, bool]]:
    """``text`` cut into (piece, is_code): string literals are not code."""
    i, start = 0, 0
    while i < len(text):
        quote = text[i]
        if quote not in "'\"":
            i += 1
            continue
        raw = i > 0 and text[i - 1] in "rR"
        delim = quote * 3 if text.startswith(quote * 3, i) else quote
        yield text[start:i], True
        end = i + len(delim)
        while end < len(text) and not text.startswith(delim, end):
            end += 2 if text[end] == "\\" and not raw else 1
        end = min(end + len(delim), len(text))
        yield text[i:end], False
        i = start = end
    yield text[start:], True


def _rename(match: re.Match[str], paths: dict[str, Path]) -> str:
    root, part, leaf = match[1], match[2], match[3]
    if part in LEAVES and leaf in LEAVES[part]:
        name = f"{root}__{part}__{leaf}"
        paths[name] = (root, part, leaf)
        return name
    if part in _SCALARS or (root == "run" and part in _RUN_MAPS):
        name = f"{root}__{part}"
        paths[name] = (root, part)
        return name + (f".{leaf}" if leaf else "")
    raise _Unflat


def flatten(when: str) -> tuple[str, dict[str, Path]] | None:
    """``when`` over flat names, and the path of each; None when it cannot be."""
    paths: dict[str, Path] = {}
    out = []
    try:
        for piece, code in _segments(when):
            out.append(_REF.sub(lambda m: _rename(m, paths), piece) if code else piece)
    except _Unflat:
        return None
    return "".join(out), paths


def flat_inputs(paths: Mapping[str, Path], context: Mapping[str, Any]) -> dict[str, Any]:
    """The flat values of ``paths`` from a nested context."""
    out = {}
    for name, path in paths.items():
        level = context[path[0]]
        if path[1] in level:  # tenant.agent is no field: CEL says so, as nested
            out[name] = level[path[1]][path[2]] if len(path) == 3 else level[path[1]]
    return out


class Flat:
    """One CEL program over flat names, or None when the source cannot be rewritten."""

    def __init__(self, program: Any, paths: dict[str, Path]) -> None:
        self.program, self.paths = program, paths

    @classmethod
    def compile(cls, when: str) -> Flat | None:
        found = flatten(when)
        if found is None:
            return None
        source, paths = found
        try:
            program = cel.compile(source)
        except (ValueError, RuntimeError):
            return None
        if {v.split(".")[0] for v in program.variables()} - set(paths):  # a root left whole
            return None
        return cls(program, paths)

    def holds(self, inputs: Mapping[str, Any]) -> bool:
        """True when the (single) expression holds on ``inputs``; one that fails holds not."""
        try:
            return self.program.execute(dict(inputs)) is True
        except (RuntimeError, ValueError, TypeError, KeyError):
            return False
