"""``tether``: the command line. Exit codes: 0 success, 2 bad usage, 1 anything else."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, NoReturn

from tether._admin import AdminClient, selector
from tether._drill import SCOPES, Fleet, drill, own_fleet, render
from tether._errors import FailedPrecondition, InvalidArgument, TetherError
from tether._types import AgentEvent, AgentInstance, AuditEntry, EffectStatus, Halt, State

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse, but its usage errors are one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"tether: {message} (see: {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--addr", help="coordinator HOST:PORT (default: $TETHER_ADDR or 127.0.0.1:7700)"
    )
    common.add_argument("-o", "--output", choices=("table", "json"), default="table")
    common.add_argument("--token", help="admin bearer token (default: $TETHER_TOKEN)")
    return common


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
        "--label", action="append", default=[], metavar="KEY=VALUE",
        help="only instances with this label (repeatable), e.g. feature=beta",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(prog="tether", description="Kill switch for fleets of AI agents.")
    verbs: Any = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    serve = verbs.add_parser("serve", help="run a coordinator")
    serve.add_argument("--listen", help="HOST:PORT to serve on (default 127.0.0.1:7700)")
    serve.add_argument("--etcd", help="etcd endpoints, http://HOST:PORT[,...]; default: embedded")
    serve.add_argument("--data-dir", help="embedded etcd data directory (default .tether)")
    serve.add_argument("--lease-ttl", type=float, help="instance lease TTL in seconds (default 10)")
    serve.add_argument("--max-checkpoint-bytes", type=int, help="checkpoint size limit (512 KiB)")
    serve.add_argument("--permit-key", help="PEM Ed25519 key for effect permits (default: in etcd)")
    serve.add_argument("--admin-tokens", help="file of 'TOKEN TENANT[,...]' lines; default: open")

    kill = verbs.add_parser("kill", parents=[common], help="halt a scope now")
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

    resume = verbs.add_parser("resume", parents=[common], help="lift a halt")
    _scope_args(resume)
    resume.add_argument("--reason", default="", help="why; it goes into the audit")

    agents = verbs.add_parser("agents", parents=[common], help="list agent instances")
    _filter_args(agents)
    agents.add_argument("--state", choices=[s.value for s in State], type=str.upper)

    halts = verbs.add_parser("halts", parents=[common], help="list the halts in force")
    halts.add_argument("--tenant", default="")

    audit = verbs.add_parser("audit", parents=[common], help="every kill and resume")
    audit.add_argument("--tenant", default="")
    audit.add_argument("--since", help="ISO time, or an age such as 30m, 2h, 1d")
    audit.add_argument("--limit", type=_positive, default=100)
    audit.add_argument(
        "--verify", action="store_true", help="check the hash chain; exit 1 if broken"
    )

    effects = verbs.add_parser("effects", parents=[common], help="the side-effect ledger")
    _filter_args(effects)
    effects.add_argument("--since", help="ISO time, or an age such as 30m, 2h, 1d")
    effects.add_argument("--status", choices=[s.value for s in EffectStatus], type=str.lower)

    verbs.add_parser("permit-key", parents=[common], help="the public key that verifies permits")

    drill = verbs.add_parser(
        "drill", parents=[common], help="pull the lever at each scope and prove the stop"
    )
    drill.add_argument("--scope", choices=[*SCOPES, "all"], default="all")
    drill.add_argument("--settle", type=float, default=60.0, help="seconds to watch after the flip")
    drill.add_argument("--items", type=int, default=200, help="queue length of each worker")
    drill.add_argument("--tick", type=float, default=0.01, help="seconds of work per item")
    drill.add_argument("--allow-global", action="store_true", help="global scope with --addr")

    watch = verbs.add_parser("watch", parents=[common], help="stream state changes")
    _filter_args(watch)
    watch.add_argument("--no-snapshot", action="store_true", help="only changes from now on")
    watch.add_argument("--count", type=int, default=0, help="stop after this many events")
    return parser


def _positive(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {raw!r}")
    return value


def _filter_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenant", default="")
    parser.add_argument("--agent", default="", metavar="URI_OR_NAME", help="agent://T/A or a name")
    parser.add_argument("--run", default="", metavar="RUN_ID")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.verb == "serve":
            return _serve(args)
        if args.verb == "drill":
            return _drill(args)
        with AdminClient(args.addr, token=args.token) as client:
            return VERBS[args.verb](client, args)
    except (InvalidArgument, FailedPrecondition) as err:
        return _fail(EXIT_USAGE, err)
    except TetherError as err:
        return _fail(EXIT_ERROR, err)
    except KeyboardInterrupt:
        if args.verb == "watch":
            return EXIT_OK  # ^C is how a watch ends
        return _fail(EXIT_ERROR, "interrupted: the request may or may not have taken effect")


def _fail(code: int, err: object) -> int:
    text = " ".join(str(err).split())
    print(f"tether: {text}", file=sys.stderr)
    return code


def _serve(args: argparse.Namespace) -> int:
    try:
        import asyncio

        import tether_server
    except ImportError as err:
        return _fail(
            EXIT_USAGE, f"tether serve needs the server extra: pip install 'tether[server]' ({err})"
        )
    logging.basicConfig(
        level=os.environ.get("TETHER_LOG_LEVEL", "WARNING").upper(), format="tether: %(message)s"
    )
    try:
        config = tether_server.load_config(args, os.environ)
    except tether_server.ConfigError as err:
        return _fail(EXIT_USAGE, err)
    try:
        asyncio.run(tether_server.serve(config))
    except (tether_server.ConfigError, ValueError) as err:  # a bad file or OTEL_* value
        return _fail(EXIT_USAGE, err)
    except Exception as err:
        return _fail(EXIT_ERROR, f"{type(err).__name__}: {err}" if not str(err) else err)
    return EXIT_OK


# -- admin verbs ---------------------------------------------------------------------------


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
        capability=args.capability, labels=labels,
    )  # fmt: skip


def _kill(client: AdminClient, args: argparse.Namespace) -> int:
    if args.grace is not None and args.mode != "soft":
        raise InvalidArgument("--grace goes with --mode soft")
    if args.grace is not None and not 0 <= args.grace <= 3600:  # also refuses nan and inf
        raise InvalidArgument(f"--grace {args.grace}: give seconds between 0 and 3600")
    halt, already = client.kill(
        _selector(args), args.reason, force=args.force, soft=args.mode == "soft",
        grace=args.grace, drain=args.queue == "drain",
    )  # fmt: skip
    if args.output == "json":
        _json({"halt": halt, "already_halted": already})
    else:
        verb = "already halted" if already else "halted"
        print(f"{verb} {halt.selector.describe()} (halt {halt.id}, revision {halt.revision})")
    return EXIT_OK


def _resume(client: AdminClient, args: argparse.Namespace) -> int:
    sel = _selector(args)
    halt = client.resume(sel, args.reason)
    if args.output == "json":
        _json({"resumed": halt, "was_halted": halt is not None})
    else:
        print(f"resumed {sel.describe()}" if halt else f"{sel.describe()} was not halted")
    return EXIT_OK


def _agent_filter(args: argparse.Namespace) -> dict[str, str]:
    tenant, agent = args.tenant, args.agent
    if agent.startswith("agent://"):
        from tether._uri import parse_agent_uri

        tenant, agent = parse_agent_uri(agent)
    return {"tenant": tenant, "agent": agent, "run_id": args.run}


def _agents(client: AdminClient, args: argparse.Namespace) -> int:
    found = client.agents(**_agent_filter(args), state=State(args.state) if args.state else None)
    if args.output == "json":
        _json(found)
    else:
        _table(
            ["TENANT", "AGENT", "RUN", "INSTANCE", "STATE", "LAST HEARTBEAT", "CHECKPOINT"],
            [_agent_row(a) for a in found],
        )
    return EXIT_OK


def _agent_row(a: AgentInstance) -> list[str]:
    checkpoint = json.dumps(a.checkpoint, separators=(",", ":")) if a.checkpoint else "-"
    if len(checkpoint) > 40:
        checkpoint = checkpoint[:37] + "..."
    return [
        a.tenant,
        a.agent,
        a.run_id,
        a.instance_id,
        a.state.value,
        _ago(a.last_heartbeat),
        checkpoint,
    ]


def _halts(client: AdminClient, args: argparse.Namespace) -> int:
    found = client.halts(tenant=args.tenant)
    if args.output == "json":
        _json(found)
    else:
        _table(["HALT", "SCOPE", "ACTOR", "SINCE", "REASON"], [_halt_row(h) for h in found])
    return EXIT_OK


def _halt_row(h: Halt) -> list[str]:
    return [h.id, h.selector.describe(), h.actor, _ago(h.created_at), h.reason]


def _audit(client: AdminClient, args: argparse.Namespace) -> int:
    if args.verify:
        return _verify_audit(client, args)
    entries = client.audit(tenant=args.tenant, since=_since(args.since), limit=args.limit)
    if args.output == "json":
        _json(entries)
    else:
        _table(
            ["AT", "ACTION", "SCOPE", "ACTOR", "CHANGED", "REASON"],
            [_audit_row(e) for e in entries],
        )
    return EXIT_OK


def _verify_audit(client: AdminClient, args: argparse.Namespace) -> int:
    intact, count, bad, problem = client.verify_audit()
    if args.output == "json":
        _json({"intact": intact, "entries": count, "first_bad_id": bad, "problem": problem})
    elif intact:
        print(f"audit intact: {count} entries, hash chain verified")
    if not intact:
        where = f" at entry {bad}" if bad else ""
        return _fail(EXIT_ERROR, f"audit chain broken{where}: {problem}")
    return EXIT_OK


def _audit_row(e: AuditEntry) -> list[str]:
    at = e.at.isoformat(timespec="seconds") if e.at else "-"
    return [at, e.action, e.selector.describe(), e.actor, "yes" if e.changed else "no", e.reason]


def _watch(client: AdminClient, args: argparse.Namespace) -> int:
    events = client.watch(**_agent_filter(args), snapshot=not args.no_snapshot)
    for seen, event in enumerate(events, start=1):
        _print_event(event, args.output)
        if args.count and seen >= args.count:
            break
    return EXIT_OK


def _print_event(event: AgentEvent, output: str) -> None:
    if output == "json":
        print(json.dumps(_plain(event), separators=(",", ":")), flush=True)
        return
    a = event.instance
    before = event.previous.value if event.previous else "-"
    when = datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3]
    who = f"agent://{a.tenant}/{a.agent} run={a.run_id} instance={a.instance_id}"
    print(f"{when} {who} {before} -> {a.state.value}", flush=True)


def _drill(args: argparse.Namespace) -> int:
    scopes = list(SCOPES) if args.scope == "all" else [args.scope]
    if args.addr and "global" in scopes and not args.allow_global:
        raise InvalidArgument(
            "a global drill against --addr stops every agent there; add --allow-global, "
            "or leave out --addr to drill a fleet of the drill's own"
        )
    fleet = Fleet([a for a in args.addr.split(",") if a]) if args.addr else own_fleet(2.0)
    try:
        reports = [
            drill(s, fleet, settle=args.settle, items=args.items, tick=args.tick) for s in scopes
        ]
    finally:
        fleet.close()
    verdict = "FAIL" if any(r["verdict"] == "FAIL" for r in reports) else "PASS"
    if args.output == "json":
        _json({"verdict": verdict, "drills": reports})
    else:
        print("\n\n".join(render(r) for r in reports))
    return EXIT_OK if verdict == "PASS" else EXIT_ERROR


def _effects(client: AdminClient, args: argparse.Namespace) -> int:
    where = _agent_filter(args)
    if not where["tenant"]:
        raise InvalidArgument("tether effects needs --tenant or --agent agent://TENANT/AGENT")
    rows = client.effects(
        where["tenant"], agent=where["agent"], run_id=where["run_id"], since=_since(args.since),
        status=EffectStatus(args.status) if args.status else None,
    )  # fmt: skip
    if args.output == "json":
        _json(rows)
    else:
        _table(["INTENDED", "RUN", "CAPABILITY", "KEY", "STATUS", "REFUSED BY"], [
            [e.intended_at.isoformat(timespec="milliseconds") if e.intended_at else "-",
             e.run_id, e.capability, e.key or "-", e.status.value, e.refused_by or "-"]
            for e in rows
        ])  # fmt: skip
    return EXIT_OK


def _permit_key(client: AdminClient, args: argparse.Namespace) -> int:
    pem, key_id = client.permit_key()
    if args.output == "json":
        _json({"public_key_pem": pem, "key_id": key_id})
    else:
        print(pem, end="")
    return EXIT_OK


VERBS = {
    "kill": _kill,
    "resume": _resume,
    "agents": _agents,
    "halts": _halts,
    "audit": _audit,
    "watch": _watch,
    "effects": _effects,
    "permit-key": _permit_key,
}

# -- output --------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Dataclasses, enums and datetimes as JSON-ready values."""
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _json(value: Any) -> None:
    print(json.dumps(_plain(value), indent=2, sort_keys=True))


def _table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if not rows:
        print("(none)")


def _ago(when: datetime | None) -> str:
    if when is None:
        return "-"
    seconds = (datetime.now(UTC) - when).total_seconds()
    return f"{seconds:.1f}s ago" if seconds < 120 else when.isoformat(timespec="seconds")


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


if __name__ == "__main__":
    raise SystemExit(main())
