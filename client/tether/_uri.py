"""Agent URIs and the identity rules shared by the SDK, the CLI and the coordinator."""

from __future__ import annotations

import re
from typing import NamedTuple

from tether._errors import InvalidArgument

# Names travel inside etcd keys, so they exclude "/" and anything unprintable.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_URI = re.compile(r"^agent://(?P<tenant>[^/]+)/(?P<agent>[^/]+)/?$")


class AgentRef(NamedTuple):
    """A tenant and an agent name, as in ``agent://acme/email-campaign``."""

    tenant: str
    agent: str

    @property
    def uri(self) -> str:
        return f"agent://{self.tenant}/{self.agent}"


def shown(value: str, limit: int = 64) -> str:
    """``value`` as an error message quotes it: repr, cut short when long.

    A status message travels in a header that gRPC caps at 8 KB; a 10 KB name must not
    turn INVALID_ARGUMENT into a transport error.
    """
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def check_name(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid tenant, agent, run or instance name."""
    if not _NAME.fullmatch(value):  # fullmatch: "$" alone lets a trailing newline in
        raise InvalidArgument(
            f"{kind} {shown(value)} is not a valid name: use 1-128 characters from "
            "letters, digits and . _ : @ -, starting with a letter or digit"
        )
    return value


def parse_agent_uri(uri: str) -> AgentRef:
    """Parse ``agent://TENANT/AGENT`` into its parts.

    Raises:
        InvalidArgument: the URI is malformed, with the expected form in the message.
    """
    match = _URI.fullmatch(uri)
    if not match:
        raise InvalidArgument(
            f"malformed agent URI {shown(uri)}: expected agent://TENANT/AGENT, "
            "for example agent://acme/email-campaign"
        )
    return AgentRef(check_name("tenant", match["tenant"]), check_name("agent", match["agent"]))
