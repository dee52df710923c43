"""``tether certs``: a development PKI in a directory, and the flags that use it.

Development only: production brings its own PKI (SPIRE, cert-manager) and the same SANs work.
``init`` makes the CA and the coordinator's certificate; ``agent`` and ``operator`` issue
identities (a SPIFFE URI SAN each); ``etcd`` makes etcd's own CA, its server certificate and
the coordinators' client certificate. Keys are written 0600; a CA is never overwritten.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tether._cli._output import EXIT_OK, EXIT_USAGE, fail
from tether._errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from tether._certs import Pem

DEFAULT_DIR = "certs"
LOCAL_HOSTS = ("localhost", "127.0.0.1")
# The flags each file feeds, so the printed commands name the right one. The transport's
# flags and variables (issue 9): serve --tls-*, SDK TETHER_TLS_*, CLI --tls-*.
CA, COORDINATOR = "ca", "coordinator"
ETCD_CA, ETCD_SERVER, ETCD_CLIENT = "etcd-ca", "etcd-server", "etcd-client"


def certs_args(certs: argparse.ArgumentParser) -> None:
    """The arguments of ``tether certs``, one sub-verb each."""
    verbs: Any = certs.add_subparsers(
        dest="certs_verb", metavar="VERB", required=True, parser_class=type(certs)
    )
    init = verbs.add_parser("init", help="a new CA and the coordinator's certificate")
    _dir(init)
    _hosts(init)
    init.add_argument("--trust-domain", default="tether", help="SPIFFE trust domain (tether)")
    coordinator = verbs.add_parser("coordinator", help="re-issue the coordinator's certificate")
    _dir(coordinator)
    _hosts(coordinator)
    agent = verbs.add_parser("agent", help="an agent's (or a tenant's agent host's) certificate")
    _dir(agent)
    agent.add_argument("--tenant", required=True, help="the tenant it may register as")
    agent.add_argument("--agent", default="", help="the one agent it may register as (default any)")
    operator = verbs.add_parser("operator", help="an operator's certificate (role in --rbac)")
    _dir(operator)
    operator.add_argument("name", help="the operator, as named in the --rbac file")
    etcd = verbs.add_parser("etcd", help="etcd's own CA, server and coordinator client certs")
    _dir(etcd)
    _hosts(etcd)


def _dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=DEFAULT_DIR, help=f"where the files go ({DEFAULT_DIR})")
    parser.add_argument("--days", type=float, default=30.0, help="validity of a leaf (30 days)")


def _hosts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", action="append", default=[], metavar="NAME",
        help="a DNS name or IP address it serves, besides localhost and 127.0.0.1 (repeatable)",
    )  # fmt: skip


def certs(args: argparse.Namespace) -> int:
    """Run ``tether certs VERB``; bad input and a missing CA exit 2 with one line."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        return fail(EXIT_USAGE, "tether certs needs cryptography: pip install 'tether[permits]'")
    if not 0 < args.days <= 3650:
        return fail(EXIT_USAGE, f"--days must be between 0 and 3650, got {args.days:g}")
    try:
        _VERBS[args.certs_verb](Path(args.dir), args)
    except (InvalidArgument, FailedPrecondition) as err:
        return fail(EXIT_USAGE, err)
    except OSError as err:
        return fail(EXIT_USAGE, f"cannot write in {args.dir}: {err.strerror or err}")
    return EXIT_OK


def _init(directory: Path, args: argparse.Namespace) -> None:
    from tether._certs import check_trust_domain, new_ca

    trust_domain = check_trust_domain(args.trust_domain)
    dns, ips = _sans(args.host)  # check every input before writing anything
    _refuse_existing(directory, CA)
    ca = new_ca(trust_domain=trust_domain)
    _wrote(*ca.write(directory, CA), f"trust domain {trust_domain}; keep ca.key off the hosts")
    _coordinator_with(directory, ca, dns, ips, args.days)
    print("\nnext: an agent, an operator, and the operators' roles in an --rbac file:")
    print(f"  tether certs agent --tenant acme --agent email-campaign --dir {directory}")
    print(f"  tether certs operator alice --dir {directory}")


def _coordinator(directory: Path, args: argparse.Namespace) -> None:
    dns, ips = _sans(args.host)
    _coordinator_with(directory, _ca(directory, CA), dns, ips, args.days)


def _coordinator_with(
    directory: Path, ca: Pem, dns: list[str], ips: list[str], days: float
) -> None:
    from tether._certs import issue

    pem = issue(ca, dns=dns, ips=ips, common_name="tether coordinator", days=days)
    cert, key = pem.write(directory, COORDINATOR)
    _wrote(cert, key, ", ".join([*dns, *ips]))
    print("\nserve with:")
    print(
        f"  tether serve --listen 0.0.0.0:7700 --tls-cert {cert} --tls-key {key} "
        f"--tls-client-ca {directory / 'ca.crt'} --rbac rbac.yaml"
    )


def _agent(directory: Path, args: argparse.Namespace) -> None:
    from tether._certs import issue, spiffe_id, trust_domain_of
    from tether._uri import check_name

    tenant = check_name("tenant", args.tenant)
    agent = check_name("agent", args.agent) if args.agent else ""
    ca = _ca(directory, CA)
    uri = spiffe_id(tenant=tenant, agent=agent, trust_domain=trust_domain_of(ca))
    name = f"agent-{tenant}-{agent}" if agent else f"agent-{tenant}"
    # The common name is informational and deliberately not the SPIFFE ID: only the SAN counts.
    shown = f"tether agent {tenant}/{agent or '*'}"
    cert, key = issue(ca, uri=uri, common_name=shown, days=args.days).write(directory, name)
    _wrote(cert, key, uri)
    print("\nrun the agent with:")
    print(
        f"  export TETHER_TLS_CA={directory / 'ca.crt'} TETHER_TLS_CERT={cert} TETHER_TLS_KEY={key}"
    )
    print("  (or tether.Agent(..., tls_ca=..., tls_cert=..., tls_key=...))")


def _operator(directory: Path, args: argparse.Namespace) -> None:
    from tether._certs import issue, spiffe_id, trust_domain_of
    from tether._uri import check_name

    name = check_name("operator", args.name)
    ca = _ca(directory, CA)
    uri = spiffe_id(operator=name, trust_domain=trust_domain_of(ca))
    pem = issue(ca, uri=uri, common_name=f"tether operator {name}", days=args.days)
    cert, key = pem.write(directory, f"operator-{name}")
    _wrote(cert, key, uri)
    tls = f"--tls-ca {directory / 'ca.crt'} --tls-cert {cert} --tls-key {key}"
    print("\nuse it with:")
    print(f"  tether agents {tls}")
    print(f"  grpcurl -cacert {directory / 'ca.crt'} -cert {cert} -key {key} 127.0.0.1:7700 list")
    print("and give it a role in the coordinator's --rbac file:")
    print(f"  operators:\n    {name}: {{role: viewer, tenants: [acme]}}")


def _etcd(directory: Path, args: argparse.Namespace) -> None:
    from tether._certs import issue, new_ca

    dns, ips = _sans(args.host)
    if (directory / f"{ETCD_CA}.crt").exists():
        ca = _ca(directory, ETCD_CA)
    else:
        ca = new_ca("tether development etcd CA")
        _wrote(*ca.write(directory, ETCD_CA), "etcd's own CA: Tether's CA must not reach etcd")
    server = issue(ca, dns=dns, ips=ips, common_name="etcd", days=args.days).write(
        directory, ETCD_SERVER
    )
    _wrote(*server, ", ".join([*dns, *ips]))
    client = issue(ca, common_name="tether-coordinator", days=args.days)
    cert, key = client.write(directory, ETCD_CLIENT)
    _wrote(cert, key, "the coordinators' etcd client certificate")
    ca_file = directory / f"{ETCD_CA}.crt"
    print("\netcd with:")
    print(
        f"  etcd --cert-file {server[0]} --key-file {server[1]} --trusted-ca-file {ca_file} "
        "--client-cert-auth --listen-client-urls https://127.0.0.1:2379 ..."
    )
    print("serve with:")
    print(
        f"  tether serve --etcd https://127.0.0.1:2379 --etcd-cacert {ca_file} "
        f"--etcd-cert {cert} --etcd-key {key} ..."
    )


def _sans(hosts: list[str]) -> tuple[list[str], list[str]]:
    from tether._certs import split_hosts

    return split_hosts([*LOCAL_HOSTS, *(h for h in hosts if h not in LOCAL_HOSTS)])


def _ca(directory: Path, name: str) -> Pem:
    from tether._certs import Pem

    if not (directory / f"{name}.crt").is_file() or not (directory / f"{name}.key").is_file():
        raise FailedPrecondition(
            f"no CA in {directory}/ ({name}.crt and {name}.key): "
            f"run `tether certs init --dir {directory}` first, or pass the --dir that has it"
        )
    return Pem.read(directory, name)


def _refuse_existing(directory: Path, name: str) -> None:
    for path in (directory / f"{name}.crt", directory / f"{name}.key"):
        if path.exists():
            raise FailedPrecondition(
                f"{path} exists: tether certs never overwrites a CA; use another --dir, "
                "or `tether certs coordinator` to re-issue the coordinator's certificate"
            )


def _wrote(cert: Path, key: Path, note: str) -> None:
    print(f"wrote {cert}  ({note})")
    print(f"wrote {key}  (mode 0600)")


_VERBS: dict[str, Callable[[Path, argparse.Namespace], None]] = {
    "init": _init,
    "coordinator": _coordinator,
    "agent": _agent,
    "operator": _operator,
    "etcd": _etcd,
}
