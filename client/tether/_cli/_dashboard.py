"""``tether dashboard``: imported lazily, so the CLI works without the dashboard extra."""

from __future__ import annotations

import argparse
import os
import sys

from tether._cli._output import EXIT_ERROR, EXIT_OK, EXIT_USAGE, fail


def dashboard(args: argparse.Namespace) -> int:
    try:
        from tether import _dashboard
    except ImportError as err:
        return fail(
            EXIT_USAGE,
            f"tether dashboard needs the dashboard extra: pip install 'tether[dashboard]' ({err})",
        )
    config = _dashboard.load_config(
        listen=args.listen, addr=args.addr, token=args.token, tenant=args.tenant,
        tls={"tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key},
        environ=os.environ,
    )  # fmt: skip
    if not config.loopback:
        print(
            f"tether: warning: --listen {config.host} is reachable from other machines, and "
            "whoever reaches the page acts with the dashboard's credentials",
            file=sys.stderr,
        )
    try:
        sock = _dashboard.bind(config)
    except OSError as err:
        return fail(EXIT_ERROR, f"cannot listen on {config.url}: {err.strerror or err}")
    _dashboard.run_dashboard(config, sock)
    return EXIT_OK
