"""The dashboard's web app: the page, its assets, the fleet's event stream and the JSON API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tether._admin import AdminClient
from tether._dashboard import _calls
from tether._dashboard._config import AUDIT_LIMIT, DashboardConfig
from tether._dashboard._fleet import Fleet, Message, Watcher
from tether._dashboard._requests import (
    BadRequest,
    Forbidden,
    audit_limit,
    effects_query,
    kill_order,
    resume_order,
)
from tether._dashboard._security import COOKIE, Guard, Sessions, allowed_hosts
from tether._errors import TetherError

STATIC = Path(__file__).parent / "static"
SSE_PING = 15.0  # seconds between keep-alive comments on the event stream
Handler = Callable[[Request], Awaitable[Response]]


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": code}, status_code=status)


def _answers(handler: Handler) -> Handler:
    """Turn the page's bad input into a 4xx and a coordinator's refusal into its status."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except BadRequest as err:
            return _error(err.status, str(err), err.code)
        except TetherError as err:
            code = _calls.status_of(err)
            return _error(_calls.http_status(err), f"coordinator: {code}: {err}", code)

    return wrapped


async def _json_body(request: Request) -> Any:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise BadRequest("send the request as application/json")
    try:
        return json.loads(await request.body())
    except ValueError:
        raise BadRequest("the request body is not valid JSON") from None


async def _next(queue: asyncio.Queue[Message], shutdown: anyio.Event) -> Message | None:
    """The next message for one browser, or None once the server is stopping."""
    getter = asyncio.ensure_future(queue.get())
    stopper = asyncio.ensure_future(shutdown.wait())
    try:
        await asyncio.wait((getter, stopper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        getter.cancel()
        stopper.cancel()
    return None if shutdown.is_set() or getter.cancelled() else getter.result()


class Dashboard:
    """The routes, over one fleet watch and one client of the coordinators."""

    def __init__(self, config: DashboardConfig, connect: Callable[[str], AdminClient]) -> None:
        self.config = config
        self.sessions = Sessions()
        self.fleet = Fleet()
        self.watcher = Watcher(self.fleet, connect, config.targets, config.tenant)
        self.client = connect(",".join(config.targets))  # it fails over between them
        self._page = (STATIC / "index.html").read_text()

    async def _call(self, use: Callable[[AdminClient], Any]) -> Any:
        return await run_in_threadpool(use, self.client)

    async def index(self, request: Request) -> Response:
        session = request.cookies.get(COOKIE) or self.sessions.new_session()
        page = self._page.replace("{{csrf}}", self.sessions.token(session))
        page = page.replace("{{tenant}}", self.config.tenant)
        response = HTMLResponse(page)
        if request.cookies.get(COOKIE) != session:
            response.headers.append("set-cookie", self.sessions.cookie(session))
        return response

    async def events(self, request: Request) -> Response:
        queue, shutdown = self.fleet.subscribe(), anyio.Event()

        async def stream() -> AsyncIterator[dict[str, str]]:
            try:
                while (message := await _next(queue, shutdown)) is not None:
                    yield {"event": message[0], "data": json.dumps(message[1])}
            finally:
                self.fleet.unsubscribe(queue)

        return EventSourceResponse(
            stream(), ping=SSE_PING, shutdown_event=shutdown, shutdown_grace_period=0.5
        )

    async def whoami(self, request: Request) -> Response:
        return JSONResponse(await self._call(_calls.whoami))

    async def halts(self, request: Request) -> Response:
        found = await self._call(lambda c: c.halts(tenant=self.config.tenant))
        return JSONResponse([_calls.halt_json(h) for h in found])

    async def audit(self, request: Request) -> Response:
        limit = audit_limit(request.query_params, AUDIT_LIMIT)
        return JSONResponse(await self._call(lambda c: _calls.audit(c, self.config.tenant, limit)))

    async def effects(self, request: Request) -> Response:
        query = effects_query(request.query_params, datetime.now(UTC))
        return JSONResponse(await self._call(lambda c: _calls.effects(c, query)))

    async def kill(self, request: Request) -> Response:
        order = kill_order(await _json_body(request))
        await self._may_act()
        return JSONResponse(await self._call(lambda c: _calls.kill(c, order)))

    async def resume(self, request: Request) -> Response:
        halt_id, reason = resume_order(await _json_body(request))
        await self._may_act()
        tenant = self.config.tenant
        return JSONResponse(await self._call(lambda c: _calls.resume(c, tenant, halt_id, reason)))

    async def _may_act(self) -> None:
        me = await self._call(_calls.whoami)
        if not me["can_act"]:
            raise Forbidden(
                f"the dashboard's credentials ({me['id']}, role {me['role'] or 'none'})"
                " may only read; kill and resume need an operator or admin"
            )

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.watcher.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await run_in_threadpool(self.watcher.stop)
            self.client.close()


async def _healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


def build_app(config: DashboardConfig, connect: Callable[[str], AdminClient]) -> Guard:
    """The ASGI app for ``config``, behind its Host and CSRF guard."""
    board = Dashboard(config, connect)
    routes = [
        Route("/", board.index),
        Route("/healthz", _healthz),
        Route("/api/events", board.events),
        *(Route(f"/api/{name}", _answers(getattr(board, name)))
          for name in ("whoami", "halts", "audit", "effects")),
        *(Route(f"/api/{name}", _answers(getattr(board, name)), methods=["POST"])
          for name in ("kill", "resume")),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]  # fmt: skip
    app = Starlette(routes=routes, lifespan=board.lifespan)
    return Guard(app, board.sessions, allowed_hosts(config.host, config.loopback))
