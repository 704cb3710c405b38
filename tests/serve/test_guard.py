"""Slow and greedy clients (issue 23): headers and bodies must arrive within the read timeout, an idle
kept-alive connection is closed, connections beyond the cap are closed as they open. Raw sockets on a
loopback port, bounds of seconds (the server's limits are set to 1 s here)."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

import pytest

from peftkit.serve.limits import ServeLimits

from helpers.serve import small_server

LIMITS = ServeLimits(read_timeout_seconds=1.0, keep_alive_seconds=1.0, max_connections=6)


@pytest.fixture(scope="module")
def guarded(serve_files):
    with small_server(serve_files, limits=LIMITS) as server:
        yield server


def _connect(server) -> socket.socket:
    address = urlparse(server.url)
    sock = socket.create_connection((address.hostname, address.port), timeout=5)
    sock.settimeout(0.25)
    return sock


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed the connection (what it sent before is read and dropped)."""
    try:
        while data := sock.recv(4096):
            del data
        return True
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def _seconds_until_closed(sock: socket.socket, trickle: bytes | None, limit: float = 6.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if trickle is not None:
            try:
                sock.sendall(trickle)
            except ConnectionError:
                return time.monotonic() - started
        if _closed(sock):
            return time.monotonic() - started
    return float("inf")


def test_headers_trickling_in_are_cut_off_after_the_read_timeout(guarded) -> None:
    """Before: a header line every 5 s kept a connection open indefinitely."""
    sock = _connect(guarded)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    assert _seconds_until_closed(sock, b"X-Slow: 1\r\n") < 3
    sock.close()


def test_a_body_trickling_in_gets_a_408_after_the_read_timeout(guarded) -> None:
    sock = _connect(guarded)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sock.sendall(head + b"Content-Length: 200\r\n\r\n{")
    received = b""
    started = time.monotonic()
    while b"\r\n\r\n" not in received and time.monotonic() - started < 6:
        try:
            sock.sendall(b" ")
            received += sock.recv(4096)
        except (TimeoutError, ConnectionError):
            pass
    sock.close()
    assert received.startswith(b"HTTP/1.1 408"), received[:100]
    assert time.monotonic() - started < 3


def test_an_idle_kept_alive_connection_is_closed(guarded) -> None:
    sock = _connect(guarded)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.2)
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    assert _seconds_until_closed(sock, None) < 3
    sock.close()


def test_connections_beyond_the_cap_are_closed_as_they_open(guarded) -> None:
    socks = [_connect(guarded) for _ in range(12)]
    time.sleep(0.2)  # well within the read timeout: only the cap closes connections now
    for sock in socks:
        sock.settimeout(0.01)
    closed = sum(_closed(sock) for sock in socks)
    for sock in socks:
        sock.close()
    assert 12 - LIMITS.max_connections <= closed < 12
