"""``tether policy apply|get|history|test`` and ``tether breakers``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tether._admin import AdminClient
from tether._cli._output import EXIT_OK, ago, print_json, print_listing
from tether._errors import InvalidArgument
from tether._protection import BreakerStatus, PolicyTest, PolicyVersion, WouldTrip

POLICY_ACTIONS = ("apply", "get", "history", "test")


def policy_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", choices=POLICY_ACTIONS, help="apply -f FILE, get, history, test -f FILE"
    )
    parser.add_argument(
        "-f", "--file", metavar="FILE", help="apply, test: the policy YAML ('-': stdin)"
    )
    parser.add_argument("--version", type=int, default=0, help="get: this version (default: now)")
    parser.add_argument("--tenant", default="", help="test: only this tenant's runs")


def breakers_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenant", default="")


def _read(path: str | None, action: str) -> str:
    if not path:
        raise InvalidArgument(f"policy {action} needs -f FILE (or -f - for stdin)")
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text()
    except OSError as err:
        raise InvalidArgument(f"cannot read {path}: {err.strerror}") from None


def _version_row(v: PolicyVersion) -> list[str]:
    return [str(v.version), v.actor, ago(v.applied_at), f"{len(v.yaml.splitlines())} lines"]


def policy(client: AdminClient, args: argparse.Namespace) -> int:
    if args.action == "apply":
        applied = client.apply_policy(_read(args.file, "apply"))
        if args.output == "json":
            print_json(applied)
        else:
            print(f"policy version {applied.version} applied by {applied.actor}")
    elif args.action == "get":
        found = client.policy(args.version)
        if args.output == "json":
            print_json(found)
        elif found.version:
            print(f"# version {found.version}, applied by {found.actor}\n{found.yaml}", end="")
        else:
            print("# no policy applied: nothing trips automatically")
    elif args.action == "test":
        _test(client.test_policy(_read(args.file, "test"), tenant=args.tenant), args)
    else:
        history = client.policy_history()
        headers = ["VERSION", "BY", "APPLIED", "SIZE"]
        print_listing(args.output, history, headers, _version_row, no_headers=args.no_headers)
    return EXIT_OK


def _trip_row(t: WouldTrip) -> list[str]:
    action = f"{t.action} (dry run)" if t.dry_run else t.action
    return [t.kind, t.name, t.selector, action, t.reason]


def _test(found: PolicyTest, args: argparse.Namespace) -> None:
    """What would trip, then over what: a dry run prints, it changes nothing."""
    if args.output == "json":
        print_json(found)
        return
    headers = ["KIND", "NAME", "WOULD HALT", "ACTION", "REASON"]
    print_listing("table", found.trips, headers, _trip_row, no_headers=args.no_headers)
    if not args.no_headers:
        print(
            f"# {len(found.trips)} would trip, judged on {found.runs} runs from "
            f"{found.coordinators} coordinators' published counts: {found.traffic}"
        )


def _breaker_row(b: BreakerStatus) -> list[str]:
    return [b.name, b.subject, b.state.upper(), ago(b.since), b.reason]


def breakers(client: AdminClient, args: argparse.Namespace) -> int:
    found, configured = client.breakers(args.tenant)
    if args.output == "json":
        print_json({"configured": configured, "breakers": found})
        return EXIT_OK
    headers = ["BREAKER", "SUBJECT", "STATE", "SINCE", "REASON"]
    print_listing("table", found, headers, _breaker_row, no_headers=args.no_headers)
    tripped = {b.name for b in found}
    for name in configured:
        if name not in tripped and not args.no_headers:  # --no-headers: the rows only
            print(f"{name}: CLOSED everywhere")
    return EXIT_OK
