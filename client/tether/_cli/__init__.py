"""``tether``: the command line. Exit codes: 0 success, 2 bad usage, 1 anything else.

``_parser`` builds the arguments, ``_verbs`` runs the admin verbs against a coordinator,
``_server_verbs`` runs ``serve`` and ``drill`` (server code, imported lazily), and
``_output`` prints. A closed pipe (``tether agents | head -1``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from tether._cli._output import EXIT_ERROR, EXIT_OK, EXIT_USAGE, fail
from tether._cli._parser import build_parser
from tether._errors import FailedPrecondition, InvalidArgument, TetherError

__all__ = ["build_parser", "main", "run"]

EXIT_PIPE = 128 + 13  # as a process killed by SIGPIPE, which is what a shell expects


# Verbs that run until stopped: the garbage collector stays on for them (see ``run``).
_LONG_RUNNING = ("serve", "watch", "dashboard", "drill", "compensate")


def run() -> NoReturn:
    """The ``tether`` console script and ``python -m tether``: ``main``, then exit.

    A one-shot command such as ``tether kill`` spent a tenth of its time in the cyclic
    garbage collector: while grpc and the stubs import (many objects, almost no cycles), and
    at exit, when the interpreter collects every object once more. So the collector is off
    until the verb is known to be short, and what exists at the end is frozen out of the
    final collection. ``bench/run.py`` times ``tether kill`` (phase ``cli``).
    """
    gc.disable()
    code = main()
    gc.freeze()
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``tether`` command; return its exit code."""
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(words)
    args = parser.parse_args(words)
    if args.verb in _LONG_RUNNING:
        gc.enable()
    try:
        return _run(parser, args)
    except BrokenPipeError:
        return _closed_pipe()


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        if args.verb not in _NO_ADDR and (args.verb != "drill" or args.addr):
            check_addr_of(args)  # a drill without --addr has a fleet of its own
        if args.verb in _ELSEWHERE:
            return _verb_elsewhere(parser, args)
        return _admin_verb(args)
    except (InvalidArgument, FailedPrecondition) as err:
        return fail(EXIT_USAGE, err)
    except TetherError as err:
        return fail(EXIT_ERROR, err)
    except KeyboardInterrupt:
        if args.verb == "watch":
            return EXIT_OK  # ^C is how a watch ends
        return fail(EXIT_ERROR, "interrupted: the request may or may not have taken effect")


# Verbs that do not call AdminService through one AdminClient: each module is imported
# only when its verb runs, so that `tether kill` loads none of them (tests/test_cli_imports.py).
_ELSEWHERE = ("completion", "serve", "certs", "drill", "dashboard", "doctor")
_NO_ADDR = ("completion", "serve", "certs")  # verbs that never dial --addr


def check_addr_of(args: argparse.Namespace) -> None:
    """Refuse a malformed ``--addr`` (or ``TETHER_ADDR``) before anything dials it."""
    from tether._cli._verbs import check_addr

    check_addr(args.addr, os.environ)


def _verb_elsewhere(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.verb == "completion":
        from tether._cli._completion import completion

        return completion(parser, args)
    if args.verb in ("serve", "drill"):
        from tether._cli import _server_verbs

        return _server_verbs.serve(args) if args.verb == "serve" else _server_verbs.drill(args)
    if args.verb == "certs":
        from tether._cli._certs_verb import certs

        return certs(args)
    if args.verb == "dashboard":
        from tether._cli._dashboard import dashboard

        return dashboard(args)
    from tether._cli._doctor import doctor

    return doctor(args)


def _admin_verb(args: argparse.Namespace) -> int:
    from tether._admin import AdminClient
    from tether._cli._verbs import ADMIN_VERBS

    run = ADMIN_VERBS[args.verb]
    tls = {"tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}
    limits = {"timeout": args.timeout, "connect_timeout": min(2.0, args.timeout)}
    with AdminClient(args.addr, token=args.token, **limits, **tls) as client:
        try:
            return run(client, args)
        except TetherError as err:
            raise not_a_coordinator(err, client.target) from err


def not_a_coordinator(err: TetherError, target: str) -> TetherError:
    """An answer of UNIMPLEMENTED means whoever listens at ``target`` is not a coordinator
    (etcd's port, another gRPC service, a web server speaking HTTP/2): say so."""
    import grpc  # loaded already: the failed call came through it

    cause = err.__cause__
    if not isinstance(cause, grpc.Call) or cause.code() != grpc.StatusCode.UNIMPLEMENTED:
        return err
    if "method not found" in (cause.details() or "").lower():
        return err  # a coordinator, older than this CLI: its own words say which method
    return TetherError(
        f"{target} is not a tether coordinator ({cause.details()}): is it the address "
        "`tether serve --listen` serves (127.0.0.1:7700 by default), not etcd's or another's?"
    )


def _closed_pipe() -> int:
    """The reader went away: say nothing, and keep Python from complaining at exit when it
    flushes stdout into the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_PIPE
