"""The page's guards: a session bound to a CSRF token, Origin and Host checks, strict headers.

Whoever reaches the page acts with the dashboard's credentials, so a request that changes
anything must prove it came from the page itself: it carries the session cookie (SameSite
Strict, so another site's form or script never sends it), a header with the token the page
was given (an HMAC of the session under a per-process key), and, when the browser says, an
Origin equal to the page's own. The Host check stops DNS rebinding from reading the fleet.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE = "tether_dashboard"
HEADER = "x-tether-csrf"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
_HEADERS = (
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; "
                                 b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
)  # fmt: skip


class Sessions:
    """Issues session ids and the CSRF token that belongs to each."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)  # per process: a restart asks the page to reload

    def new_session(self) -> str:
        return secrets.token_urlsafe(24)

    def token(self, session: str) -> str:
        return hmac.new(self._key, session.encode(), hashlib.sha256).hexdigest()

    def cookie(self, session: str) -> str:
        return f"{COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict"

    def problem(self, headers: Headers, cookies: dict[str, str]) -> str:
        """Why a state-changing request is refused, or '' when it came from the page."""
        session, sent = cookies.get(COOKIE, ""), headers.get(HEADER, "")
        if not session:
            return "no dashboard session: reload the page"
        if not sent or not hmac.compare_digest(sent, self.token(session)):
            return "missing or stale CSRF token: reload the page"
        host, origin = headers.get("host", ""), headers.get("origin")
        if origin is not None and origin != f"http://{host}":
            return f"cross-origin request refused: Origin {origin} is not this page"
        if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return "cross-site request refused"
        return ""


def allowed_hosts(listen_host: str, loopback: bool) -> frozenset[str] | None:
    """Host header names the page answers to; None (any) when bound to every interface."""
    if listen_host in ("0.0.0.0", "::"):
        return None
    name = f"[{listen_host}]" if ":" in listen_host else listen_host
    return _LOOPBACK_NAMES | {name} if loopback else frozenset({name})


def _host_name(host: str) -> str:
    return host if host.endswith("]") else host.rsplit(":", 1)[0] if ":" in host else host


class Guard:
    """ASGI middleware: Host check on every request, CSRF check on every unsafe one."""

    def __init__(self, app: ASGIApp, sessions: Sessions, hosts: Iterable[str] | None) -> None:
        self.app, self.sessions = app, sessions
        self.hosts = frozenset(hosts) if hosts is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem, status = self._problem(scope)
        if problem:
            await _refuse(send, status, problem)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _problem(self, scope: Scope) -> tuple[str, int]:
        headers = Headers(scope=scope)
        host = _host_name(headers.get("host", "")).lower()
        if self.hosts is not None and host not in self.hosts:
            return f"unknown Host {host!r}: open the dashboard by its listen address", 400
        if scope["method"] in SAFE_METHODS:
            return "", 0
        cookies = _cookies(headers)
        return self.sessions.problem(headers, cookies), 403


def _cookies(headers: Headers) -> dict[str, str]:
    pairs = (part.strip().partition("=") for part in headers.get("cookie", "").split(";"))
    return {name: value for name, _, value in pairs if name}


async def _refuse(send: Send, status: int, problem: str) -> None:
    body = json.dumps({"error": problem, "status": "REFUSED"}).encode()
    headers = [(b"content-type", b"application/json"), *_HEADERS]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
