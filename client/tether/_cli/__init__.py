"""``tether``: the command line. Exit codes: 0 success, 2 bad usage, 1 anything else.

``_parser`` builds the arguments, ``_verbs`` runs the admin verbs against a coordinator,
``_server_verbs`` runs ``serve`` and ``drill`` (server code, imported lazily), and
``_output`` prints. A closed pipe (``tether agents | head -1``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn

from tether._channel import host_port, resolve_targets
from tether._cli._output import EXIT_ERROR, EXIT_OK, EXIT_USAGE, fail
from tether._cli._parser import build_parser, parse
from tether._errors import FailedPrecondition, InvalidArgument, TetherError

__all__ = ["build_parser", "main", "run"]

EXIT_PIPE = 128 + 13  # as a process killed by SIGPIPE, which is what a shell expects


# Verbs that call AdminService and print: nothing of theirs is left to finish at exit.
_ONE_SHOT = (
    "kill", "resume", "agents", "halts", "audit", "effects", "permit-key", "token", "whoami",
    "policy", "breakers",
)  # fmt: skip


def run() -> NoReturn:
    """The ``tether`` console script and ``python -m tether``: ``main``, then exit.

    A one-shot verb such as ``tether kill`` spent about 20 ms of CPU in the cyclic garbage
    collector and the interpreter's teardown: while grpc and the stubs import (many objects,
    almost no cycles), and at exit, when every object is collected and freed once more. So
    the collector stays off for those verbs, and once their output is flushed the process
    ends at once (``os._exit``): they hold no file, thread or exit hook of their own. The
    other verbs (``serve``, ``watch``, ``compensate`` with its handlers, ...) run as usual.
    ``bench/run.py`` times ``tether kill`` (phase ``cli``). The collector is off before grpc
    loads because this package imports neither grpc nor protobuf at module level: the
    admin verbs import them when they run.
    """
    gc.disable()
    parser, args = parse(sys.argv[1:])
    if args.verb not in _ONE_SHOT:
        gc.enable()
    code = _execute(parser, args)
    if args.verb in _ONE_SHOT:
        os._exit(_flushed(code))
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``tether`` command; return its exit code."""
    return _execute(*parse(sys.argv[1:] if argv is None else argv))


def _execute(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        return _run(parser, args)
    except BrokenPipeError:
        return _closed_pipe()


def _flushed(code: int) -> int:
    """``code``, once what the command printed has left the process (``EXIT_PIPE`` if the
    reader had gone)."""
    try:
        if sys.stdout is not None:  # None: the process was started with stdout closed
            sys.stdout.flush()
    except BrokenPipeError:
        return _closed_pipe()
    except (OSError, ValueError) as err:  # a full disk: the output is not whole
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sys.stderr.write(f"error: could not write the output: {err}\n")
        code = code or 1
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.stderr.flush()
    return code


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
    check_addr(args.addr, os.environ)


def check_addr(raw: str | None, environ: Mapping[str, str]) -> None:
    """Refuse a coordinator address without a port, rather than let gRPC dial 443."""
    source = "--addr" if raw else "TETHER_ADDR"
    for target in resolve_targets(raw, environ):
        host = found[0] if (found := host_port(target)) else ""
        bare_v6 = ":" in host and not (host.startswith("[") and host.endswith("]"))
        if not host or bare_v6:
            example = f"[{target}]:7700" if ":" in target else f"{target.rstrip(':')}:7700"
            raise InvalidArgument(
                f"{source} {target!r} needs HOST:PORT with a port, e.g. {example} "
                "(7700 is tether serve's default)"
            )


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
