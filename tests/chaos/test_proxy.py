"""The fault proxy itself, against a loopback echo server."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.chaos.proxy import Proxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    front = Proxy(f"127.0.0.1:{server.server_address[1]}").start()
    yield front
    front.close()
    server.shutdown()
    server.server_close()


def _dial(proxy: Proxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=5)


def test_forwards_both_ways(proxy: Proxy) -> None:
    with _dial(proxy) as conn:
        conn.sendall(b"ping")
        assert conn.recv(100) == b"ping"


def test_pause_holds_bytes_with_sockets_open_and_resume_delivers_them(proxy: Proxy) -> None:
    with _dial(proxy) as conn:
        conn.sendall(b"a")
        assert conn.recv(100) == b"a"
        proxy.pause()
        conn.sendall(b"held")  # the socket is open: sending works
        conn.settimeout(0.3)
        with pytest.raises(TimeoutError):
            conn.recv(100)
        proxy.resume()
        conn.settimeout(5)
        assert conn.recv(100) == b"held"


def test_pause_holds_new_connections_too(proxy: Proxy) -> None:
    proxy.pause()
    with _dial(proxy) as conn:  # accepted
        conn.sendall(b"x")
        conn.settimeout(0.3)
        with pytest.raises(TimeoutError):
            conn.recv(100)
        proxy.resume()
        conn.settimeout(5)
        assert conn.recv(100) == b"x"


def test_cut_resets_open_connections_and_new_ones_work(proxy: Proxy) -> None:
    with _dial(proxy) as conn:
        conn.sendall(b"a")
        assert conn.recv(100) == b"a"
        proxy.cut()
        with contextlib.suppress(ConnectionResetError):
            assert conn.recv(100) == b""
    with _dial(proxy) as conn:
        conn.sendall(b"b")
        assert conn.recv(100) == b"b"


def test_delay_adds_latency_each_way(proxy: Proxy) -> None:
    proxy.delay(0.2)
    with _dial(proxy) as conn:
        started = time.monotonic()
        conn.sendall(b"slow")
        assert conn.recv(100) == b"slow"
        assert time.monotonic() - started >= 0.4  # a lower bound: 0.2 s there, 0.2 s back
