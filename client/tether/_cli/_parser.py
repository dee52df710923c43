"""The ``tether`` argument parser, built from one small piece per verb."""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from tether._channel import DEFAULT_ADDR
from tether._cli._help import ENVIRONMENT, epilog
from tether._cli._output import EXIT_USAGE

# The drill's scopes, narrowest first; the drill itself lives in tether_server.
DRILL_SCOPES = ("capability", "run", "agent", "tenant", "global")
DEFAULT_TIMEOUT = 10.0  # seconds per call, as AdminClient's own default
DRILL_SETTLE = 10.0  # seconds a drill watches after the flip; seed 000 used 60
SHELLS = ("bash", "zsh", "fish")


class _Parser(argparse.ArgumentParser):
    """argparse, but its usage errors are one line and exit 2."""

    narrowed = False  # a top parser with only the verbs its command names (see parse)

    def error(self, message: str) -> NoReturn:
        if self.narrowed:
            raise _Narrowed
        print(f"tether: {message} (see: {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


class _Narrowed(Exception):
    """A usage error of a top parser that holds only the verbs its command names."""


def parse(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """``argv`` parsed, and the parser that did it.

    The parser holds only the verbs ``argv`` names: building every verb's parser would
    cost ``tether kill`` about 1 ms, mostly argparse looking up translations. A usage
    error outside them (a verb misspelt) is reported by the whole parser, which lists
    every verb.
    """
    parser = build_parser(argv)
    try:
        return parser, parser.parse_args(argv)
    except _Narrowed:
        parser = build_parser()
        return parser, parser.parse_args(argv)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, with the terminal's width read once per process: argparse
    reads it (importing shutil, bz2 and lzma on the way) for every argument added."""

    def __init__(
        self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
        width: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(prog, indent_increment, max_help_position, width or _width())


@functools.cache
def _width() -> int:
    """As argparse's own default: ``$COLUMNS``, else the terminal's, else 80; less 2."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 80
    return (columns or 80) - 2


class _Version(argparse.Action):
    """``--version``: the installed distribution's version, read only when asked."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> NoReturn:
        from importlib.metadata import PackageNotFoundError, version

        try:
            mine = version("tether")
        except PackageNotFoundError:
            mine = "unknown (not installed)"
        python = ".".join(map(str, sys.version_info[:3]))
        print(f"tether {mine} (python {python}, grpcio {version('grpcio')})")
        parser.exit()


def _global_flags() -> list[tuple[tuple[str, ...], object, dict[str, Any]]]:
    """(names, default, other keywords) of each global flag."""
    return [
        (("--addr",), None, {"metavar": "HOST:PORT", "help": "coordinator(s), comma-separated "
            f"to fail over (default: $TETHER_ADDR or {DEFAULT_ADDR})"}),
        (("-o", "--output"), "table", {"choices": ("table", "wide", "json"),
            "help": "table, wide (more columns, where a verb has them) or json"}),
        (("--no-headers",), False, {"action": "store_true",
            "help": "tables without their header line"}),
        (("--timeout",), DEFAULT_TIMEOUT, {"type": _seconds, "metavar": "SECONDS",
            "help": f"seconds each call may take on a coordinator (default {DEFAULT_TIMEOUT:g})"}),
        (("--token",), None, {"help": "admin bearer token (default: $TETHER_TOKEN)"}),
        (("--tls-ca",), None, {"metavar": "FILE", "help": "CA of the coordinator's certificate; "
            "given, speak TLS (default: $TETHER_TLS_CA)"}),
        (("--tls-cert",), None, {"metavar": "FILE",
            "help": "client certificate (default: $TETHER_TLS_CERT)"}),
        (("--tls-key",), None, {"metavar": "FILE", "help": "its key (default: $TETHER_TLS_KEY)"}),
    ]  # fmt: skip


def _common(parser: argparse.ArgumentParser, *, suppress: bool) -> argparse.ArgumentParser:
    """The global flags. On the top parser they carry the defaults; on each verb they are
    suppressed unless given, so that a flag before the verb is not reset after it."""
    for names, default, keywords in _global_flags():
        parser.add_argument(*names, default=argparse.SUPPRESS if suppress else default, **keywords)
    return parser


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"expected seconds between 0 and 3600, got {raw!r}")
    return value


def _positive(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {raw!r}")
    return value


def _scope_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--global", dest="all", action="store_true", help="every agent of every tenant"
    )
    group.add_argument("--tenant", help="every agent of one tenant")
    group.add_argument("--agent", metavar="URI", help="every instance of agent://TENANT/AGENT")
    group.add_argument("--run", metavar="RUN_ID", help="every instance serving one run")
    parser.add_argument("--in-tenant", metavar="T", help="with --run: only that tenant's run")
    parser.add_argument("--capability", help="freeze only this capability within the scope")
    parser.add_argument(
        "--writes", action="store_true", help="degraded mode: freeze every write capability"
    )
    parser.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE",
        help="only instances with this label (repeatable), e.g. feature=beta",
    )  # fmt: skip


def _filter_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenant", default="")
    parser.add_argument("--agent", default="", metavar="URI_OR_NAME", help="agent://T/A or a name")
    parser.add_argument("--run", default="", metavar="RUN_ID")


def _kill_args(kill: argparse.ArgumentParser) -> None:
    _scope_args(kill)
    kill.add_argument("--reason", required=True, help="why; it goes into the audit")
    kill.add_argument("--force", action="store_true", help="halt a name that never registered")
    kill.add_argument(
        "--mode",
        choices=("hard", "soft"),
        default="hard",
        help="hard cancels work in flight; soft lets it finish within --grace",
    )
    kill.add_argument("--grace", type=float, help="seconds a soft kill waits (default 30)")
    kill.add_argument(
        "--queue",
        choices=("discard", "drain"),
        default="discard",
        help="what happens to work queued through the SDK",
    )


def _resume_args(resume: argparse.ArgumentParser) -> None:
    _scope_args(resume)
    resume.add_argument("--reason", default="", help="why; it goes into the audit")
    resume.add_argument(
        "--require-label", action="append", default=[], metavar="KEY=VALUE",
        help="resume only instances with this label, e.g. version=1.4.3; the rest stay halted",
    )  # fmt: skip


def _agents_args(agents: argparse.ArgumentParser) -> None:
    from tether._types import State

    _filter_args(agents)
    agents.add_argument("--state", choices=[s.value for s in State], type=str.upper)
    agents.add_argument(
        "--all", action="store_true", help="also ended instances (EXITED, STALE), until pruned"
    )


def _halts_args(halts: argparse.ArgumentParser) -> None:
    halts.add_argument("--tenant", default="")


def _audit_args(audit: argparse.ArgumentParser) -> None:
    from tether._admin import AUDIT_LIMIT

    audit.add_argument("--tenant", default="")
    audit.add_argument("--since", help="ISO time, or an age such as 30m, 2h, 1d")
    audit.add_argument("--limit", type=_positive, default=AUDIT_LIMIT)
    audit.add_argument(
        "--verify", action="store_true", help="check the hash chain; exit 1 if broken"
    )


def _dashboard_args(dashboard: argparse.ArgumentParser) -> None:
    dashboard.add_argument("--listen", help="HOST:PORT of the web page (default 127.0.0.1:7780)")
    dashboard.add_argument("--tenant", default="", help="show and act on this tenant only")


def _token_args(token: argparse.ArgumentParser) -> None:
    token.add_argument("action", choices=("issue",), help="issue: sign a new agent token")
    token.add_argument("--tenant", required=True, help="the tenant the token registers as")
    token.add_argument("--agent", default="", help="only this agent (default: any of the tenant)")
    token.add_argument("--ttl", help="how long it lives, e.g. 1h, 24h, 7d (default 24h, max 30d)")


def _doctor_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-skew", type=float, default=1.0, metavar="SECONDS",
        help="clock difference tolerated between coordinators and this machine (1.0)",
    )  # fmt: skip
    parser.add_argument(
        "--ack-slack", type=float, default=5.0, metavar="SECONDS",
        help="time past a kill's grace before a missing acknowledgement is a problem (5)",
    )  # fmt: skip


def _no_args(_: argparse.ArgumentParser) -> None:
    pass


def _drill_args(drill: argparse.ArgumentParser) -> None:
    drill.add_argument("--scope", choices=[*DRILL_SCOPES, "breaker", "all"], default="all")
    drill.add_argument(
        "--settle", type=float, default=DRILL_SETTLE,
        help=f"seconds to watch after the flip (default {DRILL_SETTLE:g}; seed 000 used 60)",
    )  # fmt: skip
    drill.add_argument("--items", type=int, default=200, help="queue length of each worker")
    drill.add_argument("--tick", type=float, default=0.01, help="seconds of work per item")
    drill.add_argument("--allow-global", action="store_true", help="global scope with --addr")


def _completion_args(completion: argparse.ArgumentParser) -> None:
    completion.add_argument("shell", choices=SHELLS, help="the shell to complete in")


def _watch_args(watch: argparse.ArgumentParser) -> None:
    _filter_args(watch)
    watch.add_argument("--no-snapshot", action="store_true", help="only changes from now on")
    watch.add_argument("--count", type=int, default=0, help="stop after this many events")


_Args = Callable[[argparse.ArgumentParser], None]


def _from(module: str, name: str) -> _Args:
    """The arguments of a verb that lives in ``tether._cli.MODULE``, imported only when that
    verb's parser is built: `tether kill` loads none of the other verbs' modules."""

    def arguments(parser: argparse.ArgumentParser) -> None:
        getattr(importlib.import_module(f"tether._cli.{module}"), name)(parser)

    return arguments


# (verb, help, takes --addr/-o/--token, its own arguments), in the order --help lists them.
_VERBS: tuple[tuple[str, str, bool, _Args], ...] = (
    ("serve", "run a coordinator", False, _from("_server_verbs", "serve_args")),
    ("kill", "halt a scope now", True, _kill_args),
    ("resume", "lift a halt", True, _resume_args),
    ("agents", "list agent instances", True, _agents_args),
    ("halts", "list the halts in force", True, _halts_args),
    ("audit", "every kill and resume", True, _audit_args),
    ("effects", "the side-effect ledger", True, _from("_recovery", "effects_args")),
    ("compensate", "reverse landed effects with a handler, newest first", True,
        _from("_recovery", "compensate_args")),
    ("permit-key", "the public key that verifies permits", True, _no_args),
    ("token", "issue a signed agent token (admins)", True, _token_args),
    ("whoami", "who the coordinator takes you to be, and your role", True, _no_args),
    ("drill", "pull the lever at each scope and prove the stop", True, _drill_args),
    ("watch", "stream state changes", True, _watch_args),
    ("doctor", "check every coordinator of --addr and what they agree on", True, _doctor_args),
    ("certs", "a development CA and certificates (init, agent, operator, etcd)", False,
        _from("_certs_verb", "certs_args")),
    ("dashboard", "the fleet, halts, audit and ledger live in a browser", True, _dashboard_args),
    ("policy", "the protection policy: apply -f FILE, get, history, test", True,
        _from("_protect_verbs", "policy_args")),
    ("breakers", "every breaker's state and figures", True,
        _from("_protect_verbs", "breakers_args")),
    ("completion", "a shell completion script: bash, zsh or fish", False, _completion_args),
)  # fmt: skip


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``tether`` parser: one subcommand per verb; ``args.verb`` names the one given.

    The global flags (``--addr``, ``-o``, ``--timeout``, ...) go before or after the verb.
    Given ``argv``, only the verbs it names are in it, unless ``argv`` asks for the list of
    verbs (``tether --help``) or completes (``completion``); ``parse`` uses it so.
    """
    raw = _Formatter
    parser = _Parser(
        prog="tether", description="Kill switch for fleets of AI agents.", epilog=ENVIRONMENT,
        formatter_class=raw,
    )  # fmt: skip
    parser.add_argument("--version", nargs=0, action=_Version, help="print the version and exit")
    _common(parser, suppress=False)
    common = _common(argparse.ArgumentParser(add_help=False, formatter_class=raw), suppress=True)
    # prog given: argparse would otherwise format one, importing shutil (and bz2, lzma)
    verbs: Any = parser.add_subparsers(
        dest="verb", required=True, parser_class=_Parser, prog="tether"
    )
    named = _named_verbs(argv)
    parser.narrowed = named is not None
    for name, help_text, takes_common, arguments in _VERBS:
        if named is not None and name not in named:
            continue
        arguments(
            verbs.add_parser(
                name, parents=[common] if takes_common else [], help=help_text,
                description=help_text, epilog=epilog(name), formatter_class=raw,
            )
        )  # fmt: skip
    return parser


def _named_verbs(argv: Sequence[str] | None) -> set[str] | None:
    """The verbs that ``argv`` names anywhere (a flag's value may be one: it costs nothing),
    or None for every verb: none given, or ``completion``, which needs the whole parser."""
    if argv is None:
        return None
    named = {word for word in argv if word in _VERB_NAMES}
    return None if not named or "completion" in named or _asks_for_verbs(argv) else named


def _asks_for_verbs(argv: Sequence[str]) -> bool:
    """``-h`` or ``--help`` (or an abbreviation of it) before the verb: the top help."""
    for word in argv:
        if word in _VERB_NAMES:
            return False
        if word == "-h" or (len(word) > 2 and "--help".startswith(word)):
            return True
    return False


_VERB_NAMES = frozenset(name for name, *_ in _VERBS)
