"""Recovery verbs: ``tether effects`` narrowed to an incident, and ``tether compensate``."""

from __future__ import annotations

import argparse
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from tether._admin import AdminClient
from tether._cli._output import (
    EFFECT_HEADERS,
    EXIT_ERROR,
    EXIT_OK,
    effect_row,
    print_json,
    print_listing,
)
from tether._errors import InvalidArgument
from tether._types import EffectStatus
from tether._uri import parse_agent_uri

AGE = re.compile(r"^(\d+)([smhd])$")  # 30s, 15m, 2h, 7d: ages and durations
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_TIME_HELP = "ISO time, or an age such as 30m, 2h, 1d"


def age(raw: str) -> timedelta | None:
    """``30s``, ``15m``, ``2h`` or ``7d`` as a duration; None for anything else."""
    match = AGE.match(raw)
    return timedelta(**{_UNITS[match[2]]: int(match[1])}) if match else None


def time_or_age(raw: str, now: datetime) -> datetime:
    """An ISO time (UTC unless it says), or an age back from ``now``.

    Raises:
        ValueError: ``raw`` is neither; each caller says so in its own words.
    """
    if (back := age(raw)) is not None:
        return now - back
    parsed = datetime.fromisoformat(raw)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def when(flag: str, raw: str | None) -> datetime | None:
    """``--since``/``--until``: an ISO time (UTC unless it says), or an age before now."""
    if not raw:
        return None
    try:
        return time_or_age(raw, datetime.now(UTC))
    except ValueError:
        raise InvalidArgument(f"{flag} {raw!r}: use an {_TIME_HELP}") from None


def window_args(parser: argparse.ArgumentParser) -> None:
    """The flags that narrow the ledger to an incident."""
    parser.add_argument("--tenant", default="")
    parser.add_argument("--agent", default="", metavar="URI_OR_NAME", help="agent://T/A or a name")
    parser.add_argument("--run", default="", metavar="RUN_ID")
    parser.add_argument("--since", help=f"intended at or after: {_TIME_HELP}")
    parser.add_argument("--until", help=f"intended before: {_TIME_HELP}")
    parser.add_argument("--trace", default="", metavar="TRACE_ID", help="one OpenTelemetry trace")
    parser.add_argument("--capability", default="")


def effects_args(parser: argparse.ArgumentParser) -> None:
    window_args(parser)
    parser.add_argument("--status", choices=[s.value for s in EffectStatus], type=str.lower)


def compensate_args(parser: argparse.ArgumentParser) -> None:
    window_args(parser)
    parser.add_argument(
        "--handler", required=True, metavar="MODULE:FUNCTION",
        help="called once per landed effect with undo data, newest first",
    )  # fmt: skip
    parser.add_argument(
        "--apply", action="store_true", help="run the handler; without it, only list"
    )


def _scope(client: AdminClient, args: argparse.Namespace) -> dict[str, str]:
    """tenant, agent and run_id; a run alone is looked up among the fleet's instances."""
    tenant, agent = args.tenant, args.agent
    if agent.startswith("agent://"):
        tenant, agent = parse_agent_uri(agent)
    if not tenant and args.run:
        found = client.agents(run_id=args.run)
        if not found:
            raise InvalidArgument(f"run {args.run!r} is not in the fleet; add --tenant")
        tenant, agent = found[0].tenant, found[0].agent
    if not tenant:
        raise InvalidArgument(f"tether {args.verb} needs --tenant, --agent URI or --run")
    return {"tenant": tenant, "agent": agent, "run_id": args.run}


def _filters(client: AdminClient, args: argparse.Namespace) -> dict[str, Any]:
    since, until = when("--since", args.since), when("--until", args.until)
    if since and until and until <= since:
        raise InvalidArgument("--until must be later than --since")
    window = {"since": since, "until": until, "trace_id": args.trace}
    return {**_scope(client, args), **window, "capability": args.capability}


def effects(client: AdminClient, args: argparse.Namespace) -> int:
    where = _filters(client, args)
    status = EffectStatus(args.status) if args.status else None
    rows = client.effects(where.pop("tenant"), **where, status=status)
    print_listing(args.output, rows, EFFECT_HEADERS, effect_row, no_headers=args.no_headers)
    return EXIT_OK


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def compensate(client: AdminClient, args: argparse.Namespace) -> int:
    if os.getcwd() not in sys.path:  # as uvicorn does: the handler may live beside you
        sys.path.insert(0, os.getcwd())
    from tether._compensate import compensate as run_compensation  # only this verb needs it

    where = _filters(client, args)
    report = run_compensation(
        client, where.pop("tenant"), **where, handler=args.handler, apply=args.apply,
        progress=_progress,
    )  # fmt: skip
    if args.output == "json":
        print_json(report)
    elif not args.apply:
        print_listing("table", report.todo, EFFECT_HEADERS, effect_row)
    print(report.counts(), file=sys.stderr)
    return EXIT_ERROR if report.failed else EXIT_OK
