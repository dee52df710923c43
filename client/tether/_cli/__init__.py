"""``tether``: the command line. Exit codes: 0 success, 2 bad usage, 1 anything else.

``_parser`` builds the arguments, ``_verbs`` runs the admin verbs against a coordinator,
``_server_verbs`` runs ``serve`` and ``drill`` (server code, imported lazily), and
``_output`` prints.
"""

from __future__ import annotations

from collections.abc import Sequence

from tether._admin import AdminClient
from tether._cli._certs_verb import certs
from tether._cli._dashboard import dashboard
from tether._cli._doctor import doctor
from tether._cli._output import EXIT_ERROR, EXIT_OK, EXIT_USAGE, fail
from tether._cli._parser import build_parser
from tether._cli._server_verbs import drill, serve
from tether._cli._verbs import ADMIN_VERBS
from tether._errors import FailedPrecondition, InvalidArgument, TetherError

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``tether`` command; return its exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.verb == "serve":
            return serve(args)
        if args.verb == "drill":
            return drill(args)
        if args.verb == "dashboard":
            return dashboard(args)
        if args.verb == "certs":
            return certs(args)
        if args.verb == "doctor":
            return doctor(args)
        tls = {"tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}
        with AdminClient(args.addr, token=args.token, **tls) as client:
            return ADMIN_VERBS[args.verb](client, args)
    except (InvalidArgument, FailedPrecondition) as err:
        return fail(EXIT_USAGE, err)
    except TetherError as err:
        return fail(EXIT_ERROR, err)
    except KeyboardInterrupt:
        if args.verb == "watch":
            return EXIT_OK  # ^C is how a watch ends
        return fail(EXIT_ERROR, "interrupted: the request may or may not have taken effect")
