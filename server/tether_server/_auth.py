"""Who may address which tenant: optional bearer tokens for AdminService.

With ``--admin-tokens FILE`` every admin call must carry ``authorization: Bearer TOKEN``.
Each line of the file is ``TOKEN TENANT[,TENANT...]`` or ``TOKEN *``; ``#`` starts a
comment. A token may only kill, resume or read the tenants it names; a call that names no
tenant (a global kill, a run kill across tenants, an unfiltered listing) needs ``*``.
Without the flag the admin API is open, as on a trusted network.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tether_server._config import ConfigError
from tether_server._errors import PermissionDenied, Unauthenticated

ALL = "*"


class AdminTokens:
    """Tokens and the tenants each may address."""

    def __init__(self, grants: Mapping[str, frozenset[str]]) -> None:
        self._grants = dict(grants)

    @classmethod
    def load(cls, path: Path) -> AdminTokens:
        grants: dict[str, frozenset[str]] = {}
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"--admin-tokens {path}: {err.strerror}") from None
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            token, _, tenants = line.partition(" ")
            names = frozenset(t.strip() for t in tenants.split(",") if t.strip())
            if len(token) < 16 or not names:
                raise ConfigError(
                    f"--admin-tokens {path}:{number}: expected 'TOKEN TENANT[,TENANT...]' or "
                    "'TOKEN *', with a token of at least 16 characters"
                )
            grants[token] = names
        if not grants:
            raise ConfigError(f"--admin-tokens {path}: no tokens in the file")
        return cls(grants)

    def tenants(self, metadata: Any) -> frozenset[str]:
        """The tenants the call's bearer token may address."""
        header = dict(metadata or ()).get("authorization", "")
        scheme, _, token = str(header).partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("admin calls need a token: tether --token, or TETHER_TOKEN")
        for known, tenants in self._grants.items():
            if hmac.compare_digest(known.encode(), token.strip().encode()):
                return tenants
        raise Unauthenticated("the admin token is not known to this coordinator")

    def check(self, metadata: Any, tenant: str) -> None:
        """Refuse unless the token may address ``tenant`` ('' means every tenant)."""
        allowed = self.tenants(metadata)
        if ALL in allowed or (tenant and tenant in allowed):
            return
        mine = ", ".join(sorted(allowed))
        if not tenant:
            raise PermissionDenied(
                f"this token may address only {mine}; name one of them, "
                "a call across every tenant needs a '*' token"
            )
        raise PermissionDenied(f"this token may not address tenant {tenant!r}, only {mine}")
