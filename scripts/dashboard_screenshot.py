"""Take the README's dashboard screenshot from a real small fleet.

Starts etcd, a coordinator and ``tether dashboard`` on free loopback ports, runs a few agents
(the email campaign of the worked example, a CRM sync, a research bot), kills the campaign,
lets one instance exit and SIGKILLs another so that every state shows, then photographs the
page with Debian's chromium::

    .venv/bin/python scripts/dashboard_screenshot.py docs/dashboard.png
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import tether
from tether_server import CoordinatorProcess, EtcdProcess, free_port, wait_until

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SLOW_AGENT = """
import sys, time, tether
with tether.Agent(sys.argv[1], run_id=sys.argv[2], target=sys.argv[3]) as agent:
    for i in range(10**6):
        agent.report({"pages": i}); time.sleep(0.2)
"""


def campaign(addr: str, shard: int, stop: threading.Event) -> None:
    uri, run_id = "agent://acme/email-campaign", f"campaign-42.shard-{shard}"
    with tether.Agent(uri, run_id=run_id, target=addr, capabilities=["send_email"]) as agent:
        batch = shard
        try:
            while not stop.is_set():
                agent.check()
                with agent.effect("send_email", key=f"batch-{batch}"):
                    time.sleep(0.05)  # "send" 100 emails
                batch += 3
                agent.report({"batch": batch})
                time.sleep(0.3)
        except tether.Killed:
            stop.wait()


def crm(addr: str, run_id: str, seconds: float, stop: threading.Event) -> None:
    with tether.Agent("agent://acme/crm-sync", run_id=run_id, target=addr) as agent:
        for i in range(1, 10**6):
            agent.report({"synced": i * 25})
            if stop.wait(0.25) or i * 0.25 >= seconds:
                return


def fleet(addr: str, stop: threading.Event) -> list[threading.Thread]:
    threads = [threading.Thread(target=campaign, args=(addr, n, stop)) for n in range(3)]
    threads.append(threading.Thread(target=crm, args=(addr, "nightly-0412", 1e9, stop)))
    threads.append(threading.Thread(target=crm, args=(addr, "backfill-7", 1.5, stop)))
    for thread in threads:
        thread.start()
    return threads


def slow_agent(run_id: str, addr: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-c", SLOW_AGENT, "agent://globex/research-bot", run_id, addr]
    return subprocess.Popen(argv)


def photograph(url: str, out: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(url)
        expect(page.locator("#fleet tbody tr")).to_have_count(7, timeout=15_000)
        page.select_option("#effects-since", "15m")
        page.click("#effects-form button")
        expect(page.locator("#effects tbody tr").first).to_be_visible()
        page.fill("#kill-tenant", "globex")
        page.fill("#kill-agent", "research-bot")
        time.sleep(1.0)
        page.screenshot(path=str(out), full_page=True)
        browser.close()


def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        etcd = EtcdProcess(Path(tmp) / "etcd").start()
        coord = CoordinatorProcess(etcd.url, lease_ttl=2).start()
        port = free_port()
        board = subprocess.Popen([sys.executable, "-m", "tether", "dashboard", "--listen",
                                  f"127.0.0.1:{port}", "--addr", coord.addr])  # fmt: skip
        url = f"http://127.0.0.1:{port}/"
        stop = threading.Event()
        research, crashed = (slow_agent(run, coord.addr) for run in ("survey-3", "survey-2"))
        threads = fleet(coord.addr, stop)
        try:
            wait_until(lambda: urllib.request.urlopen(url + "healthz").status == 200, 15, "board")
            time.sleep(3)
            crashed.send_signal(signal.SIGKILL)  # STALE once its lease runs out
            with tether.AdminClient(coord.addr, actor="oncall@acme") as admin:
                admin.kill(tether.selector(agent="agent://acme/email-campaign"),
                           "broken unsubscribe link")  # fmt: skip
            time.sleep(3)
            photograph(url, out)
        finally:
            stop.set()
            research.terminate()
            board.terminate()
            for thread in threads:
                thread.join(10)
            coord.stop()
            etcd.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/dashboard.png"))
