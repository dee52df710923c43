"""``tether dashboard`` in its own process, a real coordinator, a real agent, a real Chromium.

The browser is Debian's ``chromium`` driven by playwright (never ``playwright install``); the
HTTP checks use the standard library, as a hostile page or a curl would.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Generator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import tether
from tether._dashboard._requests import BadRequest, effects_query, kill_order
from tether_server import free_port

from tests.conftest import BOB, CAROL, Coordinator, eventually

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is missing: apt-get install -y chromium"
)


class Dashboard:
    """A ``tether dashboard`` process and the requests a browser or an attacker would send."""

    def __init__(self, coord: Coordinator, log: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tether._cli", "dashboard", "--listen",
             f"127.0.0.1:{self.port}", "--addr", coord.addr, *flags],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        eventually(lambda: self.get("/healthz")[0] == 200)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self._log.close()

    def request(
        self, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read().decode(), dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(), dict(err.headers)

    def get(self, path: str) -> tuple[int, Any]:
        status, text, _ = self.request(path)
        return status, text

    def session(self) -> dict[str, str]:
        """The headers of a request from the page itself: its cookie, token and Origin."""
        _, page, headers = self.request("/")
        cookie = headers["set-cookie"].split(";")[0]
        match = re.search(r'name="csrf-token" content="([0-9a-f]+)"', page)
        assert match, page
        return {"cookie": cookie, "x-tether-csrf": match[1], "origin": self.url,
                "content-type": "application/json"}  # fmt: skip


@pytest.fixture
def dashboard(coord: Coordinator, tmp_path: Path) -> Iterator[Dashboard]:
    board = Dashboard(coord, tmp_path / "dashboard.log")
    yield board
    board.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is missing: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@needs_chromium
def test_the_form_kills_an_agent_and_the_page_sees_it_killed_live(
    dashboard: Dashboard, coord: Coordinator, tenant: str, browser: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    uri = f"agent://{tenant}/email"
    with tether.Agent(uri, run_id="d-1", target=coord.addr) as agent:
        agent.report({"batch": 3})
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        navigations: list[str] = []
        page.on("framenavigated", lambda frame: navigations.append(frame.url))
        page.goto(dashboard.url)
        row = page.locator(f'#fleet tbody tr[data-key^="{tenant}/email/d-1/"]')
        expect(row).to_have_attribute("data-state", "ACTIVE")
        expect(row.locator(".checkpoint")).to_contain_text('"batch":3')
        expect(page.locator("#link")).to_contain_text(f"live: {coord.addr}")
        agent.report({"batch": 4})  # progress arrives by the stream too
        expect(row.locator(".checkpoint")).to_contain_text('"batch":4', timeout=10_000)

        page.select_option("#kill-scope", "agent")
        page.fill("#kill-tenant", tenant)
        page.fill("#kill-agent", "email")
        page.click("#kill-submit")  # no reason yet: refused in the page, nothing sent
        expect(page.locator("#kill-result")).to_contain_text("a reason is required")
        expect(page.locator("#kill-confirm")).to_be_hidden()
        page.fill("#kill-reason", "broken unsubscribe link")
        page.click("#kill-submit")
        expect(page.locator("#kill-summary")).to_contain_text(uri)
        assert not tether.AdminClient(coord.addr).halts(tenant=tenant)  # not before confirming
        page.click("#kill-confirm-button")

        expect(row).to_have_attribute("data-state", "KILLED", timeout=10_000)
        expect(row.locator(".state")).to_have_text("KILLED")
        expect(page.locator("#halts")).to_contain_text(uri)
        expect(page.locator("#audit")).to_contain_text("broken unsubscribe link")
        expect(page.locator("#verify")).to_contain_text("chain verified")
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        assert navigations == [dashboard.url + "/"]  # KILLED arrived by SSE, not a reload
        page.close()

        def stopped() -> bool:
            try:
                agent.check()
            except tether.Killed:
                return True
            return False

        eventually(stopped)
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


@needs_chromium
def test_resume_button_lifts_the_halt(
    dashboard: Dashboard, coord: Coordinator, tenant: str, browser: Any
) -> None:
    from playwright.sync_api import expect

    with tether.AdminClient(coord.addr) as admin:
        admin.kill(tether.Selector(tether.Scope.TENANT, tenant), "drill", force=True)
        page = browser.new_page()
        page.goto(dashboard.url)
        halt = page.locator("#halts tbody tr", has_text=f"tenant {tenant}")
        halt.get_by_role("button", name="Resume…").click()
        page.fill("#resume-reason", "drill over")
        page.click("#resume-confirm-button")
        expect(page.locator("#resume-result")).to_contain_text(f"resumed tenant {tenant}")
        expect(halt).to_have_count(0)
        assert not admin.halts(tenant=tenant)
        page.close()


@needs_chromium
def test_a_viewer_sees_no_kill_or_resume_controls(
    guarded: Coordinator, browser: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    with tether.AdminClient(guarded.addr, token=BOB) as bob:
        bob.kill(tether.selector(tenant="acme"), "a halt to see", force=True)
    board = Dashboard(guarded, tmp_path / "viewer.log", "--token", CAROL, "--tenant", "acme")
    try:
        page = browser.new_page()
        page.goto(board.url)
        expect(page.locator("#me")).to_contain_text("operator:carol (viewer)")
        expect(page.locator("#readonly")).to_be_visible()
        expect(page.locator("#halts")).to_contain_text("tenant acme")
        expect(page.locator("#link")).to_contain_text("live:")
        for control in ("#kill-section", "#kill-submit", "text=Resume…", "text=Kill…"):
            expect(page.locator(control)).to_be_hidden()
        page.close()
        kill = {"scope": "tenant", "tenant": "acme", "reason": "r", "force": True}
        status, body, _ = board.request("/api/kill", kill, board.session())
        assert status == 403 and "may only read" in body, body
    finally:
        board.stop()
        with tether.AdminClient(guarded.addr, token=BOB) as bob:
            bob.resume(tether.selector(tenant="acme"), "done")


def test_a_refusal_by_the_coordinator_keeps_its_status(
    guarded: Coordinator, tmp_path: Path
) -> None:
    board = Dashboard(guarded, tmp_path / "operator.log", "--token", BOB, "--tenant", "acme")
    try:
        kill = {"scope": "tenant", "tenant": "globex", "reason": "not mine", "force": True}
        status, body, _ = board.request("/api/kill", kill, board.session())
        assert status == 403, body
        answer = json.loads(body)
        assert answer["status"] == "PERMISSION_DENIED"
        assert "may not kill in tenant globex" in answer["error"]
    finally:
        board.stop()


def test_watch_with_progress_carries_checkpoints_and_their_changes(
    coord: Coordinator, tenant: str
) -> None:
    """What the dashboard's fleet table is fed: WatchAgents with ``progress``."""
    with (
        tether.AdminClient(coord.addr) as admin,
        tether.Agent(f"agent://{tenant}/email", run_id="p-1", target=coord.addr) as agent,
    ):
        agent.report({"batch": 1})
        eventually(lambda: admin.agents(tenant=tenant)[0].checkpoint == {"batch": 1})
        events = admin.watch(tenant=tenant, progress=True)
        first = next(events)
        assert (first.snapshot, first.instance.checkpoint) == (True, {"batch": 1})
        agent.report({"batch": 2})
        change = next(events)
        assert (change.snapshot, change.instance.state, change.previous) == (
            False, tether.State.ACTIVE, tether.State.ACTIVE,
        )  # fmt: skip
        assert change.instance.checkpoint == {"batch": 2}
        assert isinstance(events, Generator)
        events.close()  # cancels the stream
        plain = admin.watch(tenant=tenant)  # without progress: states only, no checkpoints
        assert next(plain).instance.checkpoint is None
        assert isinstance(plain, Generator)
        plain.close()


def test_a_post_without_the_page_s_token_is_refused(
    dashboard: Dashboard, coord: Coordinator, tenant: str
) -> None:
    kill = {"scope": "tenant", "tenant": tenant, "reason": "csrf", "force": True}
    good = dashboard.session()
    forged = {
        "no cookie, no token": {"content-type": "application/json"},
        "cookie, no token": {**good, "x-tether-csrf": ""},
        "a token of another session": {**good, "cookie": "tether_dashboard=someone-else"},
        "another site's Origin": {**good, "origin": "http://evil.example"},
        "a cross-site fetch": {**good, "sec-fetch-site": "cross-site"},
    }
    for what, headers in forged.items():
        status, body, _ = dashboard.request("/api/kill", kill, headers)
        assert status == 403, (what, body)
        assert "reload the page" in body or "refused" in body, (what, body)
    with tether.AdminClient(coord.addr) as admin:
        assert not admin.halts(tenant=tenant)
    status, body, _ = dashboard.request("/api/kill", kill, good)
    assert status == 200, body
    assert json.loads(body)["halt"]["what"] == f"tenant {tenant}"


def test_bad_input_is_a_4xx_and_a_refusal_keeps_its_status(
    dashboard: Dashboard, tenant: str
) -> None:
    good = dashboard.session()
    cases = [
        ({"scope": "agent", "tenant": tenant, "agent": "x"}, 400, "a reason is required"),
        ({"scope": "fleet", "reason": "r"}, 400, "scope must be one of"),
        ({"scope": "agent", "tenant": "a/b", "agent": "x", "reason": "r"}, 400, "not a valid name"),
        ({"scope": "tenant", "tenant": tenant, "reason": "r", "grace": 5}, 400, "mode soft"),
        ({"scope": "tenant", "tenant": tenant, "reason": "r", "mode": "soft", "grace": -1}, 400,
         "between 0 and 3600"),
        # never registered, no force: the coordinator refuses, and the page is told why
        ({"scope": "tenant", "tenant": tenant, "reason": "r"}, 409, "FAILED_PRECONDITION"),
    ]  # fmt: skip
    for body, status, message in cases:
        got, text, _ = dashboard.request("/api/kill", body, good)
        assert (got, message in text) == (status, True), (body, got, text)
    got, text, _ = dashboard.request("/api/kill", b"kill", {**good, "content-type": "text/plain"})
    assert got == 400 and "application/json" in text
    assert dashboard.get("/api/effects")[0] == 400
    assert dashboard.get(f"/api/effects?tenant={tenant}&since=yesterday")[0] == 400
    assert dashboard.get(f"/api/effects?tenant={tenant}&since=1h")[0] == 200
    assert dashboard.request("/api/resume", {"halt_id": "nope"}, good)[0] == 404


def test_a_foreign_host_header_is_refused(dashboard: Dashboard) -> None:
    """DNS rebinding: a page on another name that resolves to loopback reads nothing."""
    status, body, _ = dashboard.request("/api/halts", headers={"host": "evil.example"})
    assert status == 400 and "unknown Host" in body
    assert dashboard.get("/api/halts")[0] == 200


def test_page_and_assets_ship_in_the_package(dashboard: Dashboard) -> None:
    status, page, headers = dashboard.request("/")
    assert status == 200
    assert "default-src 'self'" in headers["content-security-policy"]
    assert "SameSite=Strict" in headers["set-cookie"] and "HttpOnly" in headers["set-cookie"]
    assert not re.search(r'(src|href)="(https?:)?//', page)  # no CDN: it works offline
    for asset in ("/static/app.js", "/static/app.css"):
        assert dashboard.get(asset)[0] == 200


def test_kill_order_and_effects_query_are_checked_before_any_call() -> None:
    order = kill_order({"scope": "run", "run_id": "r-1", "tenant": "acme", "reason": " why ",
                        "mode": "soft", "grace": "2.5", "capability": "send_email"})  # fmt: skip
    assert (order.selector.describe(), order.reason, order.soft, order.grace) == (
        "send_email in run r-1 (tenant acme)", "why", True, 2.5,
    )  # fmt: skip
    bad: Any
    for bad in ([], {"scope": "global", "reason": "r", "force": "yes"},
                {"scope": "run", "reason": "r"}, {"scope": "tenant", "reason": "r"},
                {"scope": "global", "reason": "r", "mode": "soft", "grace": float("nan")}):  # fmt: skip
        with pytest.raises(BadRequest):
            kill_order(bad)
    now = datetime(2026, 1, 2, tzinfo=UTC)
    query = effects_query({"tenant": "acme", "since": "2h", "until": "2026-01-01T23:30:00"}, now)
    assert (query.since, query.until) == (
        datetime(2026, 1, 1, 22, tzinfo=UTC), datetime(2026, 1, 1, 23, 30, tzinfo=UTC),
    )  # fmt: skip
    with pytest.raises(BadRequest, match="ends before it starts"):
        effects_query({"tenant": "acme", "since": "1h", "until": "2h"}, now)


def test_dashboard_refuses_a_busy_port_and_a_bad_listen(coord: Coordinator) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        for listen, code, message in ((f"127.0.0.1:{port}", 1, "cannot listen"),
                                      ("127.0.0.1", 2, "give HOST:PORT")):  # fmt: skip
            result = subprocess.run(
                [sys.executable, "-m", "tether._cli", "dashboard", "--listen", listen,
                 "--addr", coord.addr],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert result.returncode == code, result.stderr
            assert message in result.stderr and len(result.stderr.splitlines()) == 1
