"""``tether serve`` and ``tether drill``: they run server code, imported only when called, so
the CLI works without the server extra and says clearly when a verb needs it."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from types import ModuleType

from tether._cli._output import EXIT_ERROR, EXIT_OK, EXIT_USAGE, fail, print_json
from tether._errors import InvalidArgument


def _server_extra(verb: str, *names: str) -> ModuleType | int:
    """The ``tether_server`` package with ``names`` imported (the package imports them on first
    use), or the usage exit code after saying how to install it."""
    try:
        import tether_server

        for name in names:
            getattr(tether_server, name)
    except ImportError as err:
        return fail(
            EXIT_USAGE,
            f"tether {verb} needs the server extra: pip install 'tether[server]' ({err})",
        )
    return tether_server


def serve(args: argparse.Namespace) -> int:
    import asyncio

    tether_server = _server_extra("serve", "load_config", "serve", "supervise")
    if isinstance(tether_server, int):
        return tether_server
    logging.basicConfig(
        level=os.environ.get("TETHER_LOG_LEVEL", "WARNING").upper(), format="tether: %(message)s"
    )
    try:
        config = tether_server.load_config(args, os.environ)
    except tether_server.ConfigError as err:
        return fail(EXIT_USAGE, err)
    try:
        if config.workers > 1:  # a supervisor: each worker reports its own errors
            return int(asyncio.run(tether_server.supervise(config)))
        asyncio.run(tether_server.serve(config))
    except (tether_server.ConfigError, ValueError) as err:  # a bad file or OTEL_* value
        return fail(EXIT_USAGE, err)
    except Exception as err:
        return fail(EXIT_ERROR, f"{type(err).__name__}: {err}" if not str(err) else err)
    return EXIT_OK


def _progress() -> Callable[[str], None]:
    """A drill's steps on stderr; on a terminal, the settle countdown overwrites itself."""
    tty = sys.stderr.isatty()
    counting = False

    def say(text: str) -> None:
        nonlocal counting
        countdown = tty and "settling," in text
        end = "" if countdown else "\n"
        start = "\r\033[K" if counting else ""
        print(f"{start}drill: {text}", end=end, file=sys.stderr, flush=True)
        counting = countdown

    return say


def drill(args: argparse.Namespace) -> int:
    if args.addr and args.scope in ("global", "all") and not args.allow_global:
        raise InvalidArgument(
            "a global drill against --addr stops every agent there; add --allow-global, "
            "or leave out --addr to drill a fleet of the drill's own"
        )
    # The drill's own code needs only the SDK; its own fleet says if the server extra is missing.
    tether_server = _server_extra("drill", "run_drills", "render_drill")
    if isinstance(tether_server, int):
        return tether_server
    reports = tether_server.run_drills(
        args.scope, args.addr, settle=args.settle, items=args.items, tick=args.tick,
        progress=_progress(),
    )  # fmt: skip
    verdict = "FAIL" if any(r["verdict"] == "FAIL" for r in reports) else "PASS"
    if args.output == "json":
        print_json({"verdict": verdict, "drills": reports})
    else:
        print("\n\n".join(tether_server.render_drill(r) for r in reports))
    return EXIT_OK if verdict == "PASS" else EXIT_ERROR
