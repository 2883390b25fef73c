"""
CONNECT tunnels (RFC 9110 §9.3.6): authority-form target, a port
allow-list from the config (default 443 only, others 403), then a 200 and
a byte-exact bidirectional tunnel with back-pressure and half-close passed
on in each direction.  The tunnel tests run with each relay: splice(2) in
the kernel (the default on Linux) and Python (``splice = false``).
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

from flowtools import (
    IN_FLIGHT_BOUND,
    MIB,
    SMALL_BUFFER,
    TIMEOUT,
    BodyHash,
    Progress,
    expected_sha256,
    small_buffer_socket,
)
from support import body_bytes, body_chunks, pipe_descriptors, read_response

# -- helpers --------------------------------------------------------------------


def connect_head(target: str) -> bytes:
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()


def open_tunnel(proxy, port: int, early: bytes = b"", option: int | None = None) -> socket.socket:
    """
    CONNECT to 127.0.0.1:*port* (sending *early* bytes in the same write as
    the head) and read the response head byte by byte, so no tunnelled byte
    is consumed.  Asserts a 200 without body framing (RFC 9110 §9.3.6).
    *option* (``SO_RCVBUF``/``SO_SNDBUF``) is set small on the client socket.
    """
    sock = small_buffer_socket(option)
    sock.connect((proxy.host, proxy.port))
    sock.sendall(connect_head(f"127.0.0.1:{port}") + early)
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        assert byte, f"connection closed after {head!r}"
        head += byte
    assert head.startswith(b"HTTP/1.1 200 "), head
    names = {line.split(b":")[0].lower() for line in head.split(b"\r\n")[1:] if line}
    assert not names & {b"content-length", b"transfer-encoding"}, head
    return sock


def recv_all(sock: socket.socket) -> bytes:
    """Read until EOF."""
    chunks = []
    while piece := sock.recv(MIB):
        chunks.append(piece)
    return b"".join(chunks)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_until_eof(sock: socket.socket) -> BodyHash:
    body = BodyHash()
    while piece := sock.recv(MIB):
        body.update(piece)
    return body


class Listener:
    """A raw listening socket on 127.0.0.1:0 that is never accepted from: it counts handshakes."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]

    def pending(self) -> int:
        """Connections completed to this port so far (drains the backlog)."""
        self.sock.setblocking(False)
        count = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener():
    sock = Listener()
    yield sock
    sock.close()


def refused(proxy, target: str) -> tuple[int, dict[str, str], bytes]:
    """Send a CONNECT for *target*; returns the proxy's response, which must close the connection."""
    with socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT) as sock:
        sock.sendall(connect_head(target))
        status, headers, body = read_response(sock, "CONNECT")
        assert sock.recv(1) == b"", "the connection stays open after a refused CONNECT"
    return status, headers, body


class RecordingOrigin:
    """What a raw tunnel origin received, filled in by its thread."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.body: BodyHash | None = None


# -- curl over TLS ----------------------------------------------------------------

def test_curl_https_through_tunnel_is_byte_exact(splice_proxy, tls_origin, curl, tmp_path):
    """
    curl fetches https:// through the proxy with CONNECT (to a port in
    ``connect_ports``): the TLS session runs end to end, the body is byte
    exact, and the origin saw exactly one request, unmodified by the proxy
    (no Via: a tunnel does not touch the bytes).
    """
    proxy = splice_proxy(connect_ports=[tls_origin.port])
    out = tmp_path / "body"
    result = subprocess.run(
        [curl, "-sS", "-k", "-x", proxy.url, f"https://127.0.0.1:{tls_origin.port}/bytes/5000000?seed=7",
         "-o", str(out), "-w", "%{http_connect} %{http_code}"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "200 200"
    assert sha(out.read_bytes()) == expected_sha256(5000000, 7)
    (seen,) = tls_origin.requests
    assert (seen.method, seen.target) == ("GET", "/bytes/5000000?seed=7")
    assert seen.header("via") is None


# -- the port allow-list ------------------------------------------------------

def test_default_config_refuses_connect_to_other_ports(start_proxy, listener):
    """
    With no ``connect_ports`` in the config only 443 is allowed: CONNECT to
    any other port gets 403 with ``Proxy-Status: ...; error=http_request_denied``
    (RFC 9209 §2.3), the connection is closed, and nothing connects to the
    target.
    """
    proxy = start_proxy()
    status, headers, _ = refused(proxy, f"127.0.0.1:{listener.port}")
    assert status == 403
    assert "error=http_request_denied" in headers["proxy-status"]
    assert listener.pending() == 0


def test_default_config_allows_port_443(start_proxy):
    """
    Port 443 is allowed by default: CONNECT 127.0.0.1:443 is attempted (502
    connection_refused when nothing listens there, 200 when something
    does), never refused with 403.
    """
    proxy = start_proxy()
    with socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT) as sock:
        sock.sendall(connect_head("127.0.0.1:443"))
        status_line = sock.recv(64).split(b"\r\n")[0]
    assert status_line.split(b" ")[1] in (b"200", b"502"), status_line


def test_configured_ports_replace_the_default(start_proxy, listener):
    """``connect_ports`` replaces the default: a port it lists is tunnelled, 443 then gets 403."""
    proxy = start_proxy(connect_ports=[listener.port])
    status, headers, _ = refused(proxy, "127.0.0.1:443")
    assert status == 403
    assert "error=http_request_denied" in headers["proxy-status"]
    open_tunnel(proxy, listener.port).close()
    assert listener.pending() == 1


def test_connect_to_refused_port_is_502(start_proxy, listener):
    """An allowed port where nothing listens: 502 with ``error=connection_refused`` (RFC 9110 §15.6.3)."""
    port = listener.port
    listener.close()
    proxy = start_proxy(connect_ports=[port])
    status, headers, _ = refused(proxy, f"127.0.0.1:{port}")
    assert status == 502
    assert "error=connection_refused" in headers["proxy-status"]


@pytest.mark.parametrize("template", [
    "127.0.0.1",                      # no port (RFC 9112 §3.2.3 requires one)
    "127.0.0.1:",                     # empty port
    "127.0.0.1:+{port}",              # not digits
    "127.0.0.1:{port}0000",           # out of range
    "127.0.0.1:{port}/",              # a path
    "http://127.0.0.1:{port}",        # absolute-form
    "user@127.0.0.1:{port}",          # userinfo
    "/127.0.0.1:{port}",              # origin-form
    "[127.0.0.1]:{port}",             # not an IPv6 literal
    "127.0.0.1%00:{port}",            # garbage in the host
])
def test_malformed_connect_target_is_400(start_proxy, listener, template):
    """
    A CONNECT target that is not ``host:port`` (RFC 9112 §3.2.3) gets 400
    and a close, even when its port is allowed, and nothing connects.
    """
    proxy = start_proxy(connect_ports=[listener.port])
    status, headers, _ = refused(proxy, template.format(port=listener.port))
    assert status == 400
    assert "error=http_request_error" in headers["proxy-status"]
    assert listener.pending() == 0


# -- the tunnel -------------------------------------------------------------------

@pytest.mark.parametrize("pipelined", [False, True], ids=["after-200", "pipelined"])
def test_tunnel_is_byte_exact_and_passes_on_client_half_close(splice_proxy, origin, pipelined):
    """
    Bytes the client sends (after the 200, or in the same write as the
    CONNECT head) reach the origin exactly; the client's half-close
    (``shutdown(SHUT_WR)``) reaches the origin as EOF right after them; the
    origin's reply, sent after that EOF, reaches the client intact, then EOF.
    """
    size, reply = 8 * MIB + 3, body_bytes(3 * MIB + 1, seed=9)
    record = RecordingOrigin()

    def raw(sock):
        record.body = hash_until_eof(sock)
        record.done.set()
        sock.sendall(reply)

    origin.raw = raw
    proxy = splice_proxy(connect_ports=[origin.port])
    payload = body_bytes(size, seed=8)
    early, later = (payload, b"") if pipelined else (b"", payload)
    with open_tunnel(proxy, origin.port, early=early) as sock:
        sock.sendall(later)
        sock.shutdown(socket.SHUT_WR)
        received = recv_all(sock)
    assert record.done.is_set()
    assert (record.body.length, record.body.hexdigest()) == (size, sha(payload))
    assert (len(received), sha(received)) == (len(reply), sha(reply))


def test_tunnel_passes_on_origin_half_close(splice_proxy, origin):
    """
    The origin sends data then half-closes while still reading: the client
    gets the data then EOF, yet can still send, and the origin receives
    what the client sent after that, then the client's EOF.
    """
    down, up = body_bytes(MIB + 5, seed=3), body_bytes(2 * MIB + 7, seed=4)
    record = RecordingOrigin()

    def raw(sock):
        sock.sendall(down)
        sock.shutdown(socket.SHUT_WR)
        record.body = hash_until_eof(sock)
        record.done.set()

    origin.raw = raw
    proxy = splice_proxy(connect_ports=[origin.port])
    with open_tunnel(proxy, origin.port) as sock:
        received = recv_all(sock)
        assert (len(received), sha(received)) == (len(down), sha(down))
        sock.sendall(up)
        sock.shutdown(socket.SHUT_WR)
        assert record.done.wait(TIMEOUT), "the origin never saw the client's EOF"
        assert sock.recv(1) == b""
    assert (record.body.length, record.body.hexdigest()) == (len(up), sha(up))


def test_tunnel_slow_client_pauses_the_origin(splice_proxy, origin):
    """
    Back-pressure in a tunnel: an origin sending 256 MiB to a client that
    reads nothing is blocked after at most IN_FLIGHT_BOUND; when the client reads,
    everything arrives in order.
    """
    size, sent = 256 * MIB, Progress()

    def raw(sock):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        for piece in body_chunks(size, seed=5):
            sock.sendall(piece)
            sent.add(len(piece))

    origin.raw = raw
    proxy = splice_proxy(connect_ports=[origin.port])
    with open_tunnel(proxy, origin.port, option=socket.SO_RCVBUF) as sock:
        stalled_at = sent.wait_stalled()
        assert stalled_at < IN_FLIGHT_BOUND, f"origin sent {stalled_at / MIB:.1f} MiB into the tunnel"
        body = hash_until_eof(sock)
    assert (body.length, body.hexdigest()) == (size, expected_sha256(size, 5))


def test_tunnel_slow_origin_pauses_the_client(splice_proxy, origin):
    """
    Back-pressure in a tunnel the other way: a client sending 256 MiB to an
    origin that reads nothing is blocked after at most IN_FLIGHT_BOUND; when
    the origin reads, everything arrives in order.
    """
    size, sent, gate = 256 * MIB, Progress(), threading.Event()
    record = RecordingOrigin()

    def raw(sock):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
        if gate.wait(TIMEOUT):
            record.body = hash_until_eof(sock)
            record.done.set()

    origin.raw = raw
    proxy = splice_proxy(connect_ports=[origin.port])
    with open_tunnel(proxy, origin.port, option=socket.SO_SNDBUF) as sock:
        def send():
            for piece in body_chunks(size, seed=6):
                sock.sendall(piece)
                sent.add(len(piece))
            sock.shutdown(socket.SHUT_WR)

        threading.Thread(target=send, daemon=True).start()
        try:
            stalled_at = sent.wait_stalled()
        finally:
            gate.set()
        assert stalled_at < IN_FLIGHT_BOUND, f"client sent {stalled_at / MIB:.1f} MiB into the tunnel"
        assert record.done.wait(TIMEOUT), "the origin did not read the whole upload"
    assert (record.body.length, record.body.hexdigest()) == (size, expected_sha256(size, 6))


def test_concurrent_tunnels_are_byte_exact(splice_proxy, origin):
    """
    Twelve tunnels at once, each sending a different body each way while
    the other way flows: every byte arrives at its own peer, in order (the
    splice relay's pipes are shared between tunnels while empty).
    """
    count = 12
    records: dict[int, RecordingOrigin] = {}
    lock = threading.Lock()

    def raw(sock):
        number = int(sock.recv(2))
        record = RecordingOrigin()
        with lock:
            records[number] = record
        threading.Thread(target=sock.sendall, args=(body_bytes(MIB + 97 * number, seed=100 + number),),
                         daemon=True).start()
        record.body = hash_until_eof(sock)
        record.done.set()

    origin.raw = raw
    proxy = splice_proxy(connect_ports=[origin.port])
    received: dict[int, BodyHash] = {}

    def client(number: int) -> None:
        with open_tunnel(proxy, origin.port, early=b"%02d" % number) as sock:
            up = body_bytes(2 * MIB + 31 * number, seed=200 + number)
            sender = threading.Thread(target=sock.sendall, args=(up,), daemon=True)
            sender.start()
            body = BodyHash()
            while body.length < MIB + 97 * number and (piece := sock.recv(MIB)):
                body.update(piece)
            received[number] = body
            sender.join(TIMEOUT)
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert sorted(received) == list(range(count))
    for n in range(count):
        down = received[n]
        assert (down.length, down.hexdigest()) == (MIB + 97 * n, expected_sha256(MIB + 97 * n, 100 + n))
        assert records[n].done.wait(TIMEOUT)
        up = records[n].body
        assert (up.length, up.hexdigest()) == (2 * MIB + 31 * n, expected_sha256(2 * MIB + 31 * n, 200 + n))


def test_origin_reset_ends_the_tunnel(splice_proxy, origin):
    """
    The origin resets its connection mid-stream: the client's connection is
    closed too (no hang), and the proxy opens the next tunnel as usual.
    """
    def raw(sock):
        if sock.recv(5) == b"reset":
            sock.sendall(body_bytes(MIB, seed=11))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.sendall(b"fine")
        sock.close()

    origin.raw = raw
    proxy = splice_proxy(connect_ports=[origin.port])
    with open_tunnel(proxy, origin.port) as sock:
        sock.settimeout(TIMEOUT)
        sock.sendall(b"reset")
        try:
            while sock.recv(MIB):
                pass
        except ConnectionResetError:
            pass
    with open_tunnel(proxy, origin.port) as sock:
        sock.sendall(b"other")
        assert recv_all(sock) == b"fine"


def test_relay_in_use_is_the_configured_one(splice_proxy, origin):
    """
    Which relay runs: with a tunnel stalled both ways (neither peer reads),
    the splice relay holds the waiting bytes in a pipe per direction (one
    more pipe than it keeps for reuse after a first tunnel); the Python
    relay holds them in its transports and opens no pipe.
    """
    gate = threading.Event()
    sent_up, sent_down = Progress(), Progress()

    def flood(sock, progress):
        try:
            for piece in body_chunks(64 * MIB, seed=12):
                sock.sendall(piece)
                progress.add(len(piece))
        except OSError:
            pass

    def raw(sock):
        if sock.recv(5) == b"stall":
            threading.Thread(target=flood, args=(sock, sent_down), daemon=True).start()
            gate.wait(TIMEOUT)
        sock.close()

    origin.raw = raw
    proxy = splice_proxy(connect_ports=[origin.port])
    with open_tunnel(proxy, origin.port) as sock:
        sock.sendall(b"first")
        assert recv_all(sock) == b""
    time.sleep(0.5)  # the first tunnel's close reaches the proxy
    before = pipe_descriptors(proxy.pid)
    with open_tunnel(proxy, origin.port) as sock:
        sock.sendall(b"stall")
        threading.Thread(target=flood, args=(sock, sent_up), daemon=True).start()
        try:
            sent_up.wait_stalled()
            sent_down.wait_stalled()
            added = pipe_descriptors(proxy.pid) - before
        finally:
            gate.set()
    assert added == (2 if splice_proxy.splice else 0), added


def test_client_reset_ends_the_tunnel(splice_proxy, origin):
    """
    The client resets its connection while the origin is sending: the
    origin's connection is closed too (it sees EOF or a reset, no hang).
    """
    ended = threading.Event()

    def raw(sock):
        try:
            for piece in body_chunks(256 * MIB, seed=13):
                sock.sendall(piece)
        except OSError:
            ended.set()
            return
        raise AssertionError("the origin sent 256 MiB into a reset tunnel")

    origin.raw = raw
    proxy = splice_proxy(connect_ports=[origin.port])
    sock = open_tunnel(proxy, origin.port)
    assert sock.recv(MIB)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    assert ended.wait(TIMEOUT), "the origin's connection stayed open"


def test_shutdown_grace_cuts_an_open_tunnel(splice_proxy, origin):
    """
    A tunnel still open when ``timeouts.shutdown_grace`` (1 s) ends after
    SIGTERM is cut on both sides, and the process exits.
    """
    origin_closed = threading.Event()

    def raw(sock):
        sock.sendall(b"hello")
        try:
            if sock.recv(1) == b"":
                origin_closed.set()
        except ConnectionResetError:
            origin_closed.set()

    origin.raw = raw
    proxy = splice_proxy(connect_ports=[origin.port], timeouts={"shutdown_grace": 1.0})
    with open_tunnel(proxy, origin.port) as sock:
        sock.settimeout(TIMEOUT)
        assert sock.recv(5) == b"hello"
        signalled = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass
        assert 0.9 <= time.monotonic() - signalled < 4
    assert origin_closed.wait(TIMEOUT)
    assert proxy.proc.wait(TIMEOUT) == -signal.SIGTERM


def test_tunnel_without_a_pipe_to_spare_is_relayed_in_python(start_proxy, origin):
    """
    When the process has no descriptors left for a pipe (``EMFILE``), a
    tunnel is still opened and relayed, byte-exact both ways, by the Python
    relay: no pipe is made.
    """
    up, down = body_bytes(3 * MIB + 1, seed=14), body_bytes(2 * MIB + 3, seed=15)
    record = RecordingOrigin()

    def raw(sock):
        record.body = hash_until_eof(sock)
        record.done.set()
        sock.sendall(down)

    proxy = start_proxy(connect_ports=[origin.port], splice=True)
    # A first exchange, so that what the proxy opens once (its upstream
    # resolver's machinery) is open before the limit.
    with socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT) as sock:
        sock.sendall(f"GET {origin.url('/bytes/10?seed=1')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, _, body = read_response(sock, "GET")
        assert (status, body) == (200, body_bytes(10, seed=1))
    origin.raw = raw
    fds = len(os.listdir(f"/proc/{proxy.pid}/fd"))
    pipes = pipe_descriptors(proxy.pid)
    # Room for the client's socket and the upstream socket, not for a pipe.
    resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (fds + 2, fds + 2))
    with open_tunnel(proxy, origin.port) as sock:
        sock.sendall(up)
        sock.shutdown(socket.SHUT_WR)
        received = recv_all(sock)
    assert record.done.wait(TIMEOUT)
    assert (record.body.length, record.body.hexdigest()) == (len(up), sha(up))
    assert (len(received), sha(received)) == (len(down), sha(down))
    assert pipe_descriptors(proxy.pid) == pipes
