"""Rules that only compare figures with numbers, decided in Python as CEL decides them.

Most rules are thresholds: ``run.spend.usd > 100.0 || run.rates.error > 0.5``. Handing
even two flat values to CEL and back costs a few microseconds per call, most of a rule
group's cost. A group whose every rule is made only of a flat figure (``_flatten``)
compared with a number literal, joined by ``&&``, ``||``, ``!( )`` and parentheses, is
compiled here into one Python function, which CEL would agree with on every input it
accepts: a float figure against a double literal, an int figure against an int literal.
Given anything else (an int where a float was expected, NaN, an int beyond 64 bits, a
missing figure), the function answers None, and CEL decides as before.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tether_server._flatten import Path

Compiled = Callable[[Mapping[str, Any]], list[bool] | None]
# The type of each leaf, as the evaluator computes it (``_rules._Levels.flat``).
FLOATS = frozenset({("spend", "usd"), ("rates", "error"), ("rates", "anomaly")})
INTS = frozenset(
    {("spend", "tokens"), ("spend", "calls")}
    | {("effects", leaf) for leaf in ("total", "writes", "failed", "anomalies")}
)
_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\d+(?![\w.]))"
    r"|(?P<name>[A-Za-z_]\w*)|(?P<op>\|\||&&|<=|>=|==|!=|<|>|!|\(|\)|-))",
    re.ASCII,  # CEL's digits and names are ASCII
)
_COMPARE = {"<": "<", "<=": "<=", ">": ">", ">=": ">=", "==": "==", "!=": "!="}
_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
_INT64 = (-(2**63), 2**63 - 1)
_MOST_DEPTH = 32  # nested parentheses: each becomes two levels of Python


class _NotSimple(Exception):
    """The expression is more than comparisons of figures with numbers."""


def _tokens(source: str) -> list[tuple[str, str]]:
    """(kind, text) of each token; anything but a known token is not simple."""
    out, at = [], 0
    while at < len(source):
        if source[at:].isspace():
            break
        match = _TOKEN.match(source, at)
        if match is None or match.end() == at:
            raise _NotSimple
        kind = match.lastgroup or ""
        out.append((kind, match[kind]))
        at = match.end()
    return out


class _Parser:
    """Recursive descent over the tokens, emitting a Python expression."""

    def __init__(self, tokens: list[tuple[str, str]], kinds: Mapping[str, type]) -> None:
        self._tokens, self._at, self._kinds = tokens, 0, kinds
        self.names: dict[str, str] = {}  # flat name -> the local that holds it
        self._depth = 0  # parentheses open: Python's parser nests at most 200 deep

    def _peek(self) -> str:
        return self._tokens[self._at][1] if self._at < len(self._tokens) else ""

    def _take(self) -> tuple[str, str]:
        if self._at >= len(self._tokens):
            raise _NotSimple
        self._at += 1
        return self._tokens[self._at - 1]

    def whole(self) -> str:
        found = self._or()
        if self._at != len(self._tokens):
            raise _NotSimple
        return found

    def _or(self) -> str:
        parts = [self._and()]
        while self._peek() == "||":
            self._take()
            parts.append(self._and())
        return "(" + " or ".join(parts) + ")"

    def _and(self) -> str:
        parts = [self._unary()]
        while self._peek() == "&&":
            self._take()
            parts.append(self._unary())
        return "(" + " and ".join(parts) + ")"

    def _unary(self) -> str:
        if self._peek() == "!":  # only !( ... ): `!x > 1.0` negates x, not the comparison
            self._take()
            if self._peek() != "(":
                raise _NotSimple
            return f"(not {self._unary()})"
        if self._peek() == "(":
            self._take()
            self._depth += 1
            if self._depth > _MOST_DEPTH:
                raise _NotSimple  # CEL's to decide: the Python would not compile
            inner = self._or()
            self._depth -= 1
            if self._take()[1] != ")":
                raise _NotSimple
            return inner
        return self._comparison()

    def _comparison(self) -> str:
        left = self._operand()
        op = self._take()[1]
        if op not in _COMPARE:
            raise _NotSimple
        right = self._operand()
        if self._peek() not in ("", "&&", "||", ")"):
            raise _NotSimple  # `a > 1.0 == true` and the like: CEL's to decide
        if isinstance(left, str) == isinstance(right, str):
            raise _NotSimple  # a figure against a number, nothing else
        name, number = (left, right) if isinstance(left, str) else (right, left)
        op = op if isinstance(left, str) else _FLIP[op]
        if not isinstance(name, str) or type(number) is not self._kinds[name]:
            raise _NotSimple  # CEL does not compare int with double the same way
        local = self.names.setdefault(name, f"a{len(self.names)}")
        return f"({local} {op} {number!r})"

    def _operand(self) -> str | int | float:
        kind, text = self._take()
        sign = 1
        if text == "-":
            sign, (kind, text) = -1, self._take()
        if kind == "num":
            value: int | float = int(text) if text.isdigit() else float(text)
            if isinstance(value, float) and not math.isfinite(value):
                raise _NotSimple
            if isinstance(value, int) and not _INT64[0] <= sign * value <= _INT64[1]:
                raise _NotSimple
            return sign * value
        if kind != "name" or sign < 0 or text not in self._kinds:
            raise _NotSimple
        return text


def _kinds(paths: Mapping[str, Path]) -> dict[str, type]:
    """Each flat name whose value is a number, and its type."""
    out: dict[str, type] = {}
    for name, path in paths.items():
        if len(path) == 3 and path[1:] in FLOATS:
            out[name] = float
        elif len(path) == 3 and path[1:] in INTS:
            out[name] = int
    return out


def _guard(local: str, kind: type) -> str:
    if kind is float:
        return f"type({local}) is not float or {local} != {local}"  # NaN: CEL errs
    return f"type({local}) is not int or not {_INT64[0]} <= {local} <= {_INT64[1]}"


def compile_simple(sources: Sequence[tuple[str, Mapping[str, Path]]]) -> Compiled | None:
    """One function deciding every flat expression of ``sources`` (source, paths), or
    None when one of them is not simple. The function answers None on inputs it cannot
    decide as CEL would."""
    names: dict[str, str] = {}
    kinds: dict[str, type] = {}
    bodies = []
    try:
        for source, paths in sources:
            found = _kinds(paths)
            parser = _Parser(_tokens(source), found)
            parser.names = names  # one local per flat name, across the rules
            bodies.append(parser.whole())
            kinds |= found
    except _NotSimple:
        return None
    lines = ["def decide(v):"]
    lines += [f"    {local} = v.get({name!r})" for name, local in names.items()]
    lines += [f"    if {_guard(local, kinds[name])}: return None" for name, local in names.items()]
    lines.append(f"    return [{', '.join(bodies)}]")
    space: dict[str, Any] = {}
    # Every piece of this code is ours: names are quoted, numbers re-rendered by repr.
    try:
        exec(compile("\n".join(lines), "<rule thresholds>", "exec"), space)
    except (SyntaxError, RecursionError, MemoryError, ValueError):
        return None  # too deep for Python's parser after all: CEL decides, as it would
    decide: Compiled = space["decide"]
    return decide
