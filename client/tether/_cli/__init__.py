"""``tether``: the command line. Exit codes: 0 success, 2 bad usage, 1 anything else.

``_parser`` builds the arguments, ``_verbs`` runs the admin verbs against a coordinator,
``_server_verbs`` runs ``serve`` and ``drill`` (server code, imported lazily), and
``_output`` prints. A closed pipe (``tether agents | head -1``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc

from tether._admin import AdminClient
from tether._cli._certs_verb import certs
from tether._cli._dashboard import dashboard
from tether._cli._doctor import doctor
from tether._cli._output import EXIT_ERROR, EXIT_OK, EXIT_USAGE, fail
from tether._cli._parser import build_parser
from tether._cli._server_verbs import drill, serve
from tether._cli._verbs import ADMIN_VERBS, check_addr
from tether._errors import FailedPrecondition, InvalidArgument, TetherError

__all__ = ["build_parser", "main"]

EXIT_PIPE = 128 + 13  # as a process killed by SIGPIPE, which is what a shell expects


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``tether`` command; return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(parser, args)
    except BrokenPipeError:
        return _closed_pipe()


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        if args.verb == "completion":
            from tether._cli._completion import completion

            return completion(parser, args)
        if args.verb == "serve":
            return serve(args)
        if args.verb == "certs":
            return certs(args)
        if args.verb != "drill" or args.addr:  # a drill without --addr has a fleet of its own
            check_addr(args.addr, os.environ)
        if args.verb == "drill":
            return drill(args)
        if args.verb == "dashboard":
            return dashboard(args)
        if args.verb == "doctor":
            return doctor(args)
        tls = {"tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}
        limits = {"timeout": args.timeout, "connect_timeout": min(2.0, args.timeout)}
        with AdminClient(args.addr, token=args.token, **limits, **tls) as client:
            try:
                return ADMIN_VERBS[args.verb](client, args)
            except TetherError as err:
                raise not_a_coordinator(err, client.target) from err
    except (InvalidArgument, FailedPrecondition) as err:
        return fail(EXIT_USAGE, err)
    except TetherError as err:
        return fail(EXIT_ERROR, err)
    except KeyboardInterrupt:
        if args.verb == "watch":
            return EXIT_OK  # ^C is how a watch ends
        return fail(EXIT_ERROR, "interrupted: the request may or may not have taken effect")


def not_a_coordinator(err: TetherError, target: str) -> TetherError:
    """An answer of UNIMPLEMENTED means whoever listens at ``target`` is not a coordinator
    (etcd's port, another gRPC service, a web server speaking HTTP/2): say so."""
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
