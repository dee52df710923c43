"""The admin verbs: one function each, given a connected ``AdminClient`` and the parsed args."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from tether._admin import AdminClient, selector
from tether._cli._output import (
    AGENT_HEADERS,
    AUDIT_HEADERS,
    EFFECT_HEADERS,
    EXIT_ERROR,
    EXIT_OK,
    HALT_HEADERS,
    agent_row,
    audit_row,
    effect_row,
    fail,
    halt_row,
    print_event,
    print_json,
    print_listing,
)
from tether._cli._protect_verbs import breakers, policy
from tether._errors import InvalidArgument
from tether._types import EffectStatus, State
from tether._uri import parse_agent_uri


def _selector(args: argparse.Namespace) -> Any:
    if args.in_tenant and not args.run:
        raise InvalidArgument("--in-tenant goes with --run")
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"--label {item!r}: expected KEY=VALUE, e.g. feature=beta")
        labels[key] = value
    tenant = args.in_tenant if args.run else args.tenant
    return selector(
        all=args.all, tenant=tenant, agent=args.agent, run_id=args.run,
        capability=args.capability, labels=labels, writes=getattr(args, "writes", False),
    )  # fmt: skip


def _agent_filter(args: argparse.Namespace) -> dict[str, str]:
    tenant, agent = args.tenant, args.agent
    if agent.startswith("agent://"):
        tenant, agent = parse_agent_uri(agent)
    return {"tenant": tenant, "agent": agent, "run_id": args.run}


_AGE = re.compile(r"^(\d+)([smhd])$")


def _since(raw: str | None) -> datetime | None:
    if not raw:
        return None
    if match := _AGE.match(raw):
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match[2]]
        return datetime.now(UTC) - timedelta(**{unit: int(match[1])})
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidArgument(
            f"--since {raw!r}: use an ISO time or an age such as 30m, 2h, 1d"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def kill(client: AdminClient, args: argparse.Namespace) -> int:
    if args.grace is not None and args.mode != "soft":
        raise InvalidArgument("--grace goes with --mode soft")
    if args.grace is not None and not 0 <= args.grace <= 3600:  # also refuses nan and inf
        raise InvalidArgument(f"--grace {args.grace}: give seconds between 0 and 3600")
    halt, already = client.kill(
        _selector(args), args.reason, force=args.force, soft=args.mode == "soft",
        grace=args.grace, drain=args.queue == "drain",
    )  # fmt: skip
    if args.output == "json":
        print_json({"halt": halt, "already_halted": already})
    else:
        verb = "already halted" if already else "halted"
        print(f"{verb} {halt.selector.describe()} (halt {halt.id}, revision {halt.revision})")
    return EXIT_OK


def resume(client: AdminClient, args: argparse.Namespace) -> int:
    sel = _selector(args)
    halt = client.resume(sel, args.reason)
    if args.output == "json":
        print_json({"resumed": halt, "was_halted": halt is not None})
    else:
        print(f"resumed {sel.describe()}" if halt else f"{sel.describe()} was not halted")
    return EXIT_OK


def agents(client: AdminClient, args: argparse.Namespace) -> int:
    found = client.agents(**_agent_filter(args), state=State(args.state) if args.state else None)
    print_listing(args.output, found, AGENT_HEADERS, agent_row)
    return EXIT_OK


def halts(client: AdminClient, args: argparse.Namespace) -> int:
    found = client.halts(tenant=args.tenant)
    print_listing(args.output, found, HALT_HEADERS, halt_row)
    return EXIT_OK


def audit(client: AdminClient, args: argparse.Namespace) -> int:
    if args.verify:
        return _verify_audit(client, args)
    entries = client.audit(tenant=args.tenant, since=_since(args.since), limit=args.limit)
    print_listing(args.output, entries, AUDIT_HEADERS, audit_row)
    return EXIT_OK


def _verify_audit(client: AdminClient, args: argparse.Namespace) -> int:
    intact, count, bad, problem = client.verify_audit()
    if args.output == "json":
        print_json({"intact": intact, "entries": count, "first_bad_id": bad, "problem": problem})
    elif intact:
        print(f"audit intact: {count} entries, hash chain verified")
    if not intact:
        where = f" at entry {bad}" if bad else ""
        return fail(EXIT_ERROR, f"audit chain broken{where}: {problem}")
    return EXIT_OK


def watch(client: AdminClient, args: argparse.Namespace) -> int:
    events = client.watch(**_agent_filter(args), snapshot=not args.no_snapshot, progress=False)
    for seen, event in enumerate(events, start=1):
        print_event(event, args.output)
        if args.count and seen >= args.count:
            break
    return EXIT_OK


def effects(client: AdminClient, args: argparse.Namespace) -> int:
    where = _agent_filter(args)
    if not where["tenant"]:
        raise InvalidArgument("tether effects needs --tenant or --agent agent://TENANT/AGENT")
    rows = client.effects(
        where["tenant"], agent=where["agent"], run_id=where["run_id"], since=_since(args.since),
        status=EffectStatus(args.status) if args.status else None,
    )  # fmt: skip
    print_listing(args.output, rows, EFFECT_HEADERS, effect_row)
    return EXIT_OK


def _seconds(flag: str, raw: str) -> float:
    """``30m``, ``24h``, ``7d``, ``90s`` or plain seconds."""
    if match := _AGE.match(raw):
        return int(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
    try:
        return float(raw)
    except ValueError:
        raise InvalidArgument(f"{flag} {raw!r}: use a duration such as 30m, 24h or 7d") from None


def token(client: AdminClient, args: argparse.Namespace) -> int:
    ttl = _seconds("--ttl", args.ttl) if args.ttl else None
    issued = client.issue_agent_token(args.tenant, agent=args.agent, ttl=ttl)
    if args.output == "json":
        print_json(issued)
    else:
        print(issued.token)
    return EXIT_OK


def whoami(client: AdminClient, args: argparse.Namespace) -> int:
    me = client.whoami()
    if args.output == "json":
        print_json(me)
        return EXIT_OK
    print(f"{me.id} ({me.kind})")
    if me.role:
        print(f"role {me.role} of {', '.join(me.tenants)}")
    else:
        print("no role: this identity may not read or operate the fleet")
    return EXIT_OK


def permit_key(client: AdminClient, args: argparse.Namespace) -> int:
    pem, key_id = client.permit_key()
    if args.output == "json":
        print_json({"public_key_pem": pem, "key_id": key_id})
    else:
        print(pem, end="")
    return EXIT_OK


ADMIN_VERBS: dict[str, Callable[[AdminClient, argparse.Namespace], int]] = {
    "kill": kill,
    "resume": resume,
    "agents": agents,
    "halts": halts,
    "audit": audit,
    "watch": watch,
    "effects": effects,
    "permit-key": permit_key,
    "token": token,
    "whoami": whoami,
    "policy": policy,
    "breakers": breakers,
}
