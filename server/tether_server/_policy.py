"""The policy document: breakers, rules and notifications, parsed and checked, pure.

One YAML document (``tether policy apply -f``). Everything wrong with it is found here,
before it is stored, and said with its place in the document: the policy in force stays.
Rules are CEL (``common-expression-language``): compiled once, here, then only evaluated.

The context a rule sees is documented in ``docs/policy.md`` ("The rule context"): per
run, fleet-wide, ``run``, ``agent`` and ``tenant`` with spend, effects and rates over the
rule's ``window``, and the run's ``labels`` and last stored ``checkpoint``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cel
import yaml

from tether_server._breakers import BreakerSpec, Labels, Scope
from tether_server._compare import Compiled, compile_simple
from tether_server._errors import InvalidArgument, check_name
from tether_server._flatten import (
    CONTEXT_ROOTS,
    Flat,
    compile_rule,
    fields_of,
    flat_inputs,
    flatten,
    roots_of,
)

MAX_POLICY_BYTES = 256 * 1024
EVENTS = frozenset({"kill", "resume", "freeze", "degrade", "trip", "policy"})
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class Action(enum.StrEnum):
    KILL = "kill"
    FREEZE = "freeze"  # needs `capability`
    DEGRADE = "degrade"  # every write frozen
    NOTIFY = "notify"  # only the webhooks hear of it


def inputs_of(
    roots: frozenset[str],
    fields: Mapping[str, frozenset[str] | None],
    context: Mapping[str, Any],
) -> dict[str, Any]:
    """Of ``context``, the roots named, and of each only the fields named (None: whole)."""
    out = {}
    for root in roots:
        names, value = fields.get(root), context[root]
        out[root] = value if names is None else {k: value[k] for k in names if k in value}
    return out


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    when: str
    program: Any = field(compare=False, repr=False)  # the compiled CEL
    action: Action = Action.KILL
    tenant: str = ""
    agent: str = ""
    run_id: str = ""
    labels: Labels = ()
    scope: Scope = Scope.RUN
    capability: str = ""
    hard: bool = True
    grace: float = 0.0
    window: float = 60.0
    dry_run: bool = False
    roots: frozenset[str] = CONTEXT_ROOTS  # what the expression reads: only these are passed
    # Of each root, the fields it names (``run.spend`` -> spend); None: pass the root whole.
    fields: Mapping[str, frozenset[str] | None] = field(default_factory=dict, compare=False)

    def inputs(self, context: Mapping[str, Any]) -> dict[str, Any]:
        """The part of ``context`` the expression reads: converting less into CEL is faster."""
        return inputs_of(self.roots, self.fields, context)

    def reads(self, name: str) -> bool:
        """Whether the expression reads ``run.<name>`` (``labels``, ``checkpoint``)."""
        return "run" in self.roots and name in (self.fields.get("run") or {name})

    def holds(self, inputs: Mapping[str, Any]) -> bool:
        """True when the rule holds on ``inputs`` (see ``inputs``); an expression that
        fails holds not."""
        try:
            return self.program.execute(inputs) is True
        except (RuntimeError, ValueError, TypeError, KeyError):
            return False

    def decide(self, context: Mapping[str, Any]) -> bool:
        """True when the rule holds on ``context``."""
        return self.holds(self.inputs(context))


class RuleGroup:
    """The rules of one window as one CEL program, ``[when0, when1, ...]``: the context is
    converted into CEL once for all of them, and converting is most of what a call costs.
    """

    def __init__(self, window: float, rules: tuple[Rule, ...]) -> None:
        self.window, self.rules = window, rules
        self.roots = frozenset().union(*(r.roots for r in rules))
        self.depth = 1 if "tenant" in self.roots else 2 if "agent" in self.roots else 3
        self.fields: dict[str, frozenset[str] | None] = {}
        for root in self.roots:
            named = [r.fields.get(root) for r in rules if root in r.roots]
            whole = any(n is None for n in named)
            self.fields[root] = None if whole else frozenset().union(*named)  # type: ignore[arg-type]
        self.labels = any(r.labels or r.reads("labels") for r in rules)
        self.selects = any(r.tenant or r.agent or r.run_id or r.labels for r in rules)
        self.checkpoint = any(r.reads("checkpoint") for r in rules)
        # Each on lines of its own: a `// comment` in one must not swallow what follows.
        source = "[" + ", ".join(f"(\n{r.when}\n)" for r in rules) + "]"
        self._flat = Flat.compile(source)  # None: nested maps, as written
        self._program = cel.compile(source) if self._flat is None else self._flat.program
        self._each = [Flat.compile(r.when) for r in rules] if self._flat else []
        self.flat_paths = None if self._flat is None else self._flat.paths
        self._simple = _simple(rules) if self._flat is not None else None

    def inputs(self, context: Mapping[str, Any]) -> dict[str, Any]:
        """What the program is given: flat values, or the roots it reads."""
        if self._flat is not None:
            return flat_inputs(self._flat.paths, context)
        return inputs_of(self.roots, self.fields, context)

    def results(self, inputs: dict[str, Any], context: Mapping[str, Any]) -> list[bool]:
        """Whether each rule holds on ``inputs`` (from ``context``); one whose expression
        fails holds not."""
        if self._simple is not None and (found := self._simple(inputs)) is not None:
            return found  # thresholds only, decided as CEL would, without the call
        try:
            return [held is True for held in self._program.execute(inputs)]
        except (RuntimeError, ValueError, TypeError, KeyError):  # one failed: each alone
            if self._each:
                return [f.holds(inputs) if f else r.decide(context) for f, r in self._pairs()]
            return [r.decide(context) for r in self.rules]

    def _pairs(self) -> list[tuple[Flat | None, Rule]]:
        return list(zip(self._each, self.rules, strict=True))


def _simple(rules: tuple[Rule, ...]) -> Compiled | None:
    """The rules as one Python function, when each only compares figures with numbers."""
    sources = [flatten(r.when) for r in rules]
    if any(found is None for found in sources):
        return None
    return compile_simple([found for found in sources if found is not None])


def groups_of(rules: tuple[Rule, ...]) -> list[RuleGroup]:
    """The rules by window, each window's as one program."""
    windows = sorted({r.window for r in rules})
    return [RuleGroup(w, tuple(r for r in rules if r.window == w)) for w in windows]


@dataclass(frozen=True, slots=True)
class Webhook:
    url: str
    events: frozenset[str] = EVENTS
    format: str = "json"  # json | slack


@dataclass(frozen=True, slots=True)
class Policy:
    breakers: tuple[BreakerSpec, ...] = ()
    rules: tuple[Rule, ...] = ()
    notify: tuple[Webhook, ...] = ()


EMPTY = Policy()


class _Reader:
    """Reads one mapping of the document, saying where a bad value is."""

    def __init__(self, where: str, raw: Any, known: frozenset[str]) -> None:
        if not isinstance(raw, dict):
            raise InvalidArgument(f"{where}: expected a mapping")
        unknown = sorted(set(raw) - known)
        if unknown:
            raise InvalidArgument(f"{where}: unknown field {unknown[0]!r}")
        self.where, self.raw = where, raw

    def get(self, name: str, kind: type, default: Any = None) -> Any:
        value = self.raw.get(name, default)
        if value is None:
            return None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise InvalidArgument(f"{self.where}.{name}: expected {kind.__name__}, got {value!r}")
        return value

    def rate(self, name: str) -> float | None:
        value = self.get(name, float)
        if value is not None and not 0 < value <= 1:
            raise InvalidArgument(f"{self.where}.{name}: a rate in (0, 1], got {value}")
        return value  # type: ignore[no-any-return]

    def seconds(self, name: str, default: float) -> float:
        value = self.raw.get(name, default)
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            return float(value)
        match = _DURATION.match(str(value))
        if match is None:
            raise InvalidArgument(f"{self.where}.{name}: a duration such as 60s, got {value!r}")
        return float(match[1]) * _UNITS[match[2]]

    def selector(self) -> dict[str, Any]:
        """tenant, agent, run_id and labels, as a kill takes them."""
        where, sel = f"{self.where}.selector", self.raw.get("selector") or {}
        if not isinstance(sel, dict) or set(sel) - {"tenant", "agent", "run_id", "labels"}:
            raise InvalidArgument(f"{where}: a mapping of tenant, agent, run_id, labels")
        out: dict[str, Any] = {
            k: check_name(f"{where}.{k}", str(v)) for k, v in sel.items() if k != "labels"
        }
        labels = sel.get("labels") or {}
        if not isinstance(labels, dict):
            raise InvalidArgument(f"{where}.labels: a mapping such as {{feature: beta}}")
        out["labels"] = tuple(
            sorted(
                (
                    check_name(f"{where}.labels key", str(k)),
                    check_name(f"{where}.labels.{k}", str(v)),
                )
                for k, v in labels.items()
            )
        )
        if out["labels"] and self.raw.get("scope", "run") != "run":
            raise InvalidArgument(
                f"{where}.labels: labels select runs, so they need scope: run "
                "(an agent's or tenant's figures count every run of it)"
            )
        return out

    def scope(self) -> Scope:
        value = self.raw.get("scope", "run")
        try:
            return Scope(value)
        except ValueError:
            raise InvalidArgument(
                f"{self.where}.scope: run, agent or tenant, got {value!r}"
            ) from None


_BREAKER_FIELDS = frozenset(
    [
        "name",
        "selector",
        "scope",
        "window",
        "min_calls",
        "error_rate",
        "anomaly_rate",
        "volume_factor",
        "cooldown",
        "probes",
    ]
)
_RULE_FIELDS = frozenset(
    [
        "name",
        "selector",
        "scope",
        "when",
        "action",
        "capability",
        "mode",
        "grace",
        "window",
        "dry_run",
    ]
)


def _name(r: _Reader, seen: set[str]) -> str:
    name = check_name(f"{r.where}.name", str(r.raw.get("name", "")))
    if name in seen:
        raise InvalidArgument(f"{r.where}.name: {name} is used twice")
    seen.add(name)
    return name


def _breaker(where: str, raw: Any, seen: set[str]) -> BreakerSpec:
    r = _Reader(where, raw, _BREAKER_FIELDS)
    spec = BreakerSpec(
        name=_name(r, seen),
        **r.selector(),
        scope=r.scope(),
        window=r.seconds("window", 60.0),
        min_calls=r.get("min_calls", int, 20),
        error_rate=r.rate("error_rate"),
        anomaly_rate=r.rate("anomaly_rate"),
        volume_factor=r.get("volume_factor", float),
        cooldown=r.seconds("cooldown", 120.0),
        probes=r.get("probes", int, 3),
    )
    if spec.error_rate is None and spec.anomaly_rate is None and spec.volume_factor is None:
        raise InvalidArgument(f"{where}: name error_rate, anomaly_rate or volume_factor")
    if spec.window <= 0 or spec.probes < 1 or spec.min_calls < 1:
        raise InvalidArgument(f"{where}: window, probes and min_calls must be positive")
    return spec


def _rule(where: str, raw: Any, seen: set[str]) -> Rule:
    r = _Reader(where, raw, _RULE_FIELDS)
    name = _name(r, seen)
    when = r.get("when", str)
    if not when:
        raise InvalidArgument(f"{where}.when: a CEL expression is required")
    try:
        action = Action(r.raw.get("action", "kill"))
    except ValueError:
        raise InvalidArgument(f"{where}.action: kill, freeze, degrade or notify") from None
    capability = r.get("capability", str, "")
    if (action is Action.FREEZE) != bool(capability):
        raise InvalidArgument(f"{where}: action freeze, and only it, takes a capability")
    mode = r.get("mode", str, "hard")
    if mode not in ("hard", "soft"):
        raise InvalidArgument(f"{where}.mode: hard or soft, got {mode!r}")
    program = compile_rule(where, when)
    return Rule(
        name, when, program, action, **r.selector(), scope=r.scope(),
        capability=capability, hard=mode == "hard", grace=r.seconds("grace", 0.0),
        window=r.seconds("window", 60.0), dry_run=r.get("dry_run", bool, False),
        roots=roots_of(program), fields=fields_of(when),
    )  # fmt: skip


def _webhook(where: str, raw: Any) -> Webhook:
    r = _Reader(where, raw, frozenset({"url", "events", "format"}))
    url = r.get("url", str, "")
    if not url.startswith(("http://", "https://")):
        raise InvalidArgument(f"{where}.url: an http:// or https:// URL, got {url!r}")
    events = r.get("events", list, sorted(EVENTS))
    unknown = sorted(set(map(str, events)) - EVENTS)
    if unknown:
        raise InvalidArgument(f"{where}.events: {unknown[0]!r} is not one of {sorted(EVENTS)}")
    fmt = r.get("format", str, "json")
    if fmt not in ("json", "slack"):
        raise InvalidArgument(f"{where}.format: json or slack, got {fmt!r}")
    return Webhook(url, frozenset(map(str, events)), fmt)


def parse(text: str) -> Policy:
    """The policy a YAML document states.

    Raises:
        InvalidArgument: what is wrong, and where; nothing of it is applied.
    """
    if len(text.encode()) > MAX_POLICY_BYTES:
        raise InvalidArgument(f"a policy is at most {MAX_POLICY_BYTES} bytes")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise InvalidArgument(f"the policy is not valid YAML: {err}") from None
    top = _Reader("policy", raw, frozenset({"breakers", "rules", "notify"}))
    seen: set[str] = set()
    lists = {k: top.get(k, list, []) for k in ("breakers", "rules", "notify")}
    policy = Policy(
        breakers=tuple(
            _breaker(f"breakers[{i}]", b, seen) for i, b in enumerate(lists["breakers"])
        ),
        rules=tuple(_rule(f"rules[{i}]", r, seen) for i, r in enumerate(lists["rules"])),
        notify=tuple(_webhook(f"notify[{i}]", n) for i, n in enumerate(lists["notify"])),
    )
    try:  # what the evaluator will build: refused here, never found there
        groups_of(policy.rules)
    except (ValueError, RuntimeError) as err:
        raise InvalidArgument(
            f"rules: the rules of one window do not compile together: {err}"
        ) from None
    return policy
