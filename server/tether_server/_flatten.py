"""Rule expressions: compiled with their limits, and run over flat variables.

Handing CEL nested maps is most of a call: converting ``{"run": {"spend": {"usd": 1.0}}}``
into CEL costs about 1.4 us per map, several times the evaluation itself. So an
expression's references to the context's fixed fields are rewritten to flat names
(``run.spend.usd`` becomes ``run__spend__usd``; ``run.labels.team`` becomes
``run__labels.team``, one map), outside string literals and comments, and the context is
passed as those few values. An expression this cannot rewrite whole (``run`` used as a
map, ``has(run.spend)``, a field the context lacks, a macro binding a root's name) is left
as written and given nested maps.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import cel

from tether_server._errors import InvalidArgument

LEAVES = {
    "spend": frozenset({"usd", "tokens", "calls"}),
    "effects": frozenset({"total", "writes", "failed", "anomalies"}),
    "rates": frozenset({"error", "anomaly"}),
}
_SCALARS = frozenset({"tenant", "agent", "run_id"})
_RUN_MAPS = frozenset({"labels", "checkpoint"})
_REF = re.compile(r"(?<![\w.])(run|agent|tenant)\s*\.\s*(\w+)(?:\s*\.\s*(\w+))?")
# A comprehension macro and the variable it binds: ``xs.exists(x, x > 1)``.
MACRO = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*(\w+)\s*,")
Path = tuple[str, ...]  # root, field[, leaf]


class _Unflat(Exception):
    """The expression reads the context in a way a flat name cannot stand for."""


def _segments(text: str) -> Iterator[tuple[str, bool]]:
    """``text`` cut into (piece, is_code): string literals and comments are not code."""
    i, start = 0, 0
    while i < len(text):
        quote = text[i]
        if text.startswith("//", i):  # a comment, to the end of its line
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            yield text[start:i], True
            yield text[i:end], False
            i = start = end
            continue
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
            # ``xs.exists(run, run.spend.usd > 1.0)``: that ``run`` is the macro's own
            if code and not CONTEXT_ROOTS.isdisjoint(MACRO.findall(piece)):
                return None
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
        bound = set(MACRO.findall(source))  # a macro's own variables
        if {v.split(".")[0] for v in program.variables()} - set(paths) - bound:  # a root left whole
            return None
        return cls(program, paths)

    def holds(self, inputs: Mapping[str, Any]) -> bool:
        """True when the (single) expression holds on ``inputs``; one that fails holds not."""
        try:
            return self.program.execute(dict(inputs)) is True
        except (RuntimeError, ValueError, TypeError, KeyError):
            return False


CONTEXT_ROOTS = frozenset({"run", "agent", "tenant"})
MAX_WHEN = 1000  # characters of one rule's expression


def compile_rule(where: str, when: str) -> Any:
    """Compile ``when``; refuse one that does not compile, names an unknown variable, or
    could cost more than linear time (the evaluator runs on a coordinator's event loop:
    one rule must never hold its heartbeats up)."""
    if len(when) > MAX_WHEN:
        raise InvalidArgument(f"{where}.when is {len(when)} characters; at most {MAX_WHEN}")
    bound = MACRO.findall(when)
    if len(bound) > 1:
        raise InvalidArgument(
            f"{where}.when uses {len(bound)} comprehensions (all, exists, exists_one, map, "
            "filter); at most one, so that a rule's cost stays linear in its input"
        )
    try:
        program = cel.compile(when)
    except (ValueError, RuntimeError) as err:
        raise InvalidArgument(f"{where}.when does not compile: {err}") from None
    names = {v.split(".")[0] for v in program.variables()} - set(bound)
    unknown = sorted(names - CONTEXT_ROOTS)
    if unknown:
        raise InvalidArgument(
            f"{where}.when names {unknown[0]!r}: the context has only run, agent and tenant"
        )
    return program


def roots_of(program: Any) -> frozenset[str]:
    """The context roots an expression reads (``run``, ``agent``, ``tenant``)."""
    return frozenset(v.split(".")[0] for v in program.variables()) & CONTEXT_ROOTS


_PATH = re.compile(r"\b(run|agent|tenant)\b(\s*\.\s*(\w+))?")


def fields_of(when: str) -> dict[str, frozenset[str] | None]:
    """The fields of each root that ``when`` names; a root used whole (or in a way this
    cannot see, such as ``run["spend"]``) gets None, and is passed whole."""
    found: dict[str, set[str] | None] = {}
    for match in _PATH.finditer(when):
        root, name = match[1], match[3]
        names = found.setdefault(root, set())
        if name is None or names is None:
            found[root] = None
        else:
            names.add(name)
    return {root: None if names is None else frozenset(names) for root, names in found.items()}
