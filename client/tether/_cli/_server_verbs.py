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


def serve_args(serve: argparse.ArgumentParser) -> None:
    """The arguments of ``tether serve``."""
    serve.add_argument("--listen", help="HOST:PORT to serve on (default 127.0.0.1:7700)")
    serve.add_argument(
        "--etcd", help="etcd endpoints, http(s)://HOST:PORT[,...]; default: embedded"
    )
    serve.add_argument("--data-dir", help="embedded etcd data directory (default .tether)")
    serve.add_argument(
        "--workers", metavar="N|auto",
        help="coordinator processes sharing --listen and --health-listen with SO_REUSEPORT "
        "(auto: one per core; default 1). Each attaches to etcd with its own id (ID-w0, ...) "
        "and its own canary socket (telemetry is pushed: no port); one embedded etcd serves "
        "all. SIGTERM drains every worker. A worker that dies is restarted "
        "with backoff; one that fails before it first serves stops them all (exit 1 or 2)",
    )  # fmt: skip
    serve.add_argument("--lease-ttl", type=float, help="instance lease TTL in seconds (default 10)")
    serve.add_argument("--max-checkpoint-bytes", type=int, help="checkpoint size limit (512 KiB)")
    serve.add_argument("--permit-key", help="PEM Ed25519 key for effect permits (default: in etcd)")
    serve.add_argument(
        "--admin-tokens", metavar="FILE", help="file of 'TOKEN OPERATOR' lines (needs --rbac)"
    )
    serve.add_argument("--rbac", metavar="FILE", help="YAML of operators, their roles and tenants")
    serve.add_argument("--trust-domain", help="SPIFFE trust domain of callers (default tether)")
    serve.add_argument(
        "--roster-retention", metavar="DURATION",
        help="forget EXITED and STALE instances this long after they ended (default 24h)",
    )  # fmt: skip
    serve.add_argument(
        "--canary-interval", metavar="DURATION",
        help="kill and resume a synthetic _canary instance this often, e.g. 60s (default off)",
    )  # fmt: skip
    _serve_tls_args(serve)


def _serve_tls_args(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--tls-cert", metavar="FILE", help="PEM certificate to serve TLS with")
    serve.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    serve.add_argument(
        "--tls-client-ca", metavar="FILE",
        help="require a client certificate signed by this CA on every call",
    )  # fmt: skip
    serve.add_argument(
        "--health-listen", metavar="HOST:PORT",
        help="also serve grpc.health.v1 in plaintext here, on loopback, for probes",
    )  # fmt: skip
    serve.add_argument(
        "--insecure", action="store_true", default=None,
        help="allow a non-loopback --listen without TLS and client certificates",
    )  # fmt: skip
    serve.add_argument("--etcd-cacert", metavar="FILE", help="CA that verifies etcd (https://)")
    serve.add_argument("--etcd-cert", metavar="FILE", help="client certificate for etcd")
    serve.add_argument("--etcd-key", metavar="FILE", help="private key of --etcd-cert")


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
