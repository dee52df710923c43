"""What ``tether --help`` and ``tether VERB --help`` say beyond the flags: an example per verb,
and the environment variables."""

from __future__ import annotations

ENVIRONMENT = """\
environment:
  TETHER_ADDR        coordinator HOST:PORT[,HOST:PORT...] when --addr is not given
  TETHER_TOKEN       admin bearer token when --token is not given
  TETHER_TLS_CA      CA that verifies the coordinator; set, the CLI speaks TLS (--tls-ca)
  TETHER_TLS_CERT    client certificate naming the operator (--tls-cert)
  TETHER_TLS_KEY     its private key (--tls-key)
  TETHER_LOG_LEVEL   log level of `tether serve` (default WARNING)
  tether serve also reads TETHER_LISTEN, TETHER_ETCD, TETHER_DATA_DIR, TETHER_LEASE_TTL,
  TETHER_ROSTER_RETENTION, TETHER_RBAC, TETHER_ADMIN_TOKENS, TETHER_TRUST_DOMAIN,
  TETHER_CANARY_INTERVAL, TETHER_PERMIT_KEY, TETHER_MAX_CHECKPOINT_BYTES, TETHER_INSECURE,
  TETHER_HEALTH_LISTEN, TETHER_WORKERS, TETHER_SERVE_TLS_CERT/_KEY/_CLIENT_CA,
  TETHER_ETCD_CACERT/_CERT/_KEY:
  the same as its flags; a flag wins over its variable.

global flags (before or after the verb):
  --addr HOST:PORT  -o table|wide|json  --no-headers  --timeout SECONDS  --token TOKEN
  --tls-ca FILE  --tls-cert FILE  --tls-key FILE

exit codes: 0 success, 1 failure, 2 bad usage; always one line on stderr when not 0.

examples:
  tether serve
  tether kill --agent agent://acme/email-campaign --reason "sending to the wrong list"
  tether agents --tenant acme
  tether resume --agent agent://acme/email-campaign --reason "list fixed"
"""

EXAMPLES: dict[str, str] = {
    "serve": """\
  tether serve                                        # embedded etcd under ./.tether
  tether serve --listen 127.0.0.1:7701 --etcd http://10.0.0.5:2379 --roster-retention 6h
  tether serve --workers auto                         # one coordinator process per core""",
    "kill": """\
  tether kill --agent agent://acme/email-campaign --reason "sending to the wrong list"
  tether kill --tenant acme --capability send_email --reason "freeze email, keep the rest"
  tether kill --run campaign-42 --mode soft --grace 10 --reason "finish the batch, then stop"
  tether kill --agent agent://acme/email-campaign --writes --reason "degraded: reads only\"""",
    "resume": """\
  tether resume --agent agent://acme/email-campaign --reason "list fixed"
  tether resume --tenant acme --capability send_email""",
    "agents": """\
  tether agents                       # live and killed instances
  tether agents --all -o wide         # also EXITED and STALE, with coordinator and labels
  tether agents --tenant acme -o json | jq '.[].state'""",
    "halts": """\
  tether halts
  tether halts --tenant acme --no-headers""",
    "audit": """\
  tether audit --since 2h
  tether audit --verify""",
    "effects": """\
  tether effects --tenant acme --since 30m
  tether effects --agent agent://acme/email-campaign --status refused
  tether effects --tenant acme --since 15m --trace 4bf92f3577b34da6a3ce929d0e0e4736 -o json""",
    "compensate": """\
  tether compensate --agent agent://acme/email-campaign --since 15m \\
      --handler examples.compensate_email:retract          # list only
  tether compensate --agent agent://acme/email-campaign --since 15m \\
      --handler examples.compensate_email:retract --apply""",
    "permit-key": """\
  tether permit-key > permit.pub""",
    "token": """\
  tether token issue --tenant acme --agent email-campaign --ttl 7d""",
    "whoami": """\
  tether whoami --tls-cert alice.pem --tls-key alice.key --tls-ca ca.pem""",
    "drill": """\
  tether drill                        # every scope, on a fleet of the drill's own
  tether drill --scope run --settle 60
  tether drill --scope breaker        # a breaker trips by itself (own fleet only)""",
    "watch": """\
  tether watch --tenant acme
  tether watch -o json --no-snapshot --count 10""",
    "doctor": """\
  tether doctor --addr 10.0.0.1:7700,10.0.0.2:7700""",
    "certs": """\
  tether certs init --dir pki
  tether certs operator alice --dir pki""",
    "dashboard": """\
  tether dashboard --listen 127.0.0.1:7780 --addr 127.0.0.1:7700""",
    "policy": """\
  tether policy apply -f policy.yaml
  tether policy get --version 3
  tether policy history -o json""",
    "breakers": """\
  tether breakers
  tether breakers --tenant acme -o json""",
    "completion": """\
  source <(tether completion bash)
  tether completion zsh > "${fpath[1]}/_tether"
  tether completion fish > ~/.config/fish/completions/tether.fish""",
}


def epilog(verb: str) -> str | None:
    """The examples shown under ``tether VERB --help``."""
    found = EXAMPLES.get(verb)
    return f"examples:\n{found}" if found else None
