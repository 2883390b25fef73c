"""
Operating the proxy: the access log, timeouts for slow heads and idle
keep-alive connections, graceful shutdown on SIGTERM/SIGINT, config and
listener errors at start (a clear line, never a traceback), and repeated
``--listen``.  The wheel and its ``twistd`` dropin are in
test_packaging.py.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

from flowtools import TIMEOUT
from support import REPO, ProxyProcess, proxy_config, twistd_command, wait_until

ACCESS = r"^\d+\.\d{3} +\d+ "
LISTENING = re.compile(r"proxyframe listening on 127\.0\.0\.1:(\d+)")
#: The environment of a ``twistd`` that uses this working tree's code.
TREE_ENV = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


# -- helpers --------------------------------------------------------------------

def get(port: int, url: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, bytes]:
    """GET *url* through the proxy on *port*; returns the (still open) connection, response and body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    conn.request("GET", url)
    resp = conn.getresponse()
    return conn, resp, resp.read()


def closed_within(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, float]:
    """
    Read until the peer closes (EOF or reset) and return what arrived and
    how many seconds that took; fail if it is still open after *timeout*.
    """
    sock.settimeout(timeout)
    start, chunks = time.monotonic(), []
    try:
        while piece := sock.recv(65536):
            chunks.append(piece)
    except ConnectionResetError:
        pass
    except socket.timeout:
        raise AssertionError(f"still open after {timeout} s; received {b''.join(chunks)!r}") from None
    return b"".join(chunks), time.monotonic() - start


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def twistd(*args: str, cwd, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``twistd -n proxyframe ARGS`` on this tree to completion; stdout and stderr together."""
    return subprocess.run(twistd_command() + ["-n", "--pidfile=", "proxyframe", *args], cwd=cwd, env=TREE_ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def assert_no_traceback(output: str) -> None:
    assert "Traceback" not in output, output
    assert "listening on" not in output, output


# -- access log ---------------------------------------------------------------------

def test_access_log_has_one_line_per_exchange(proxy, origin):
    """
    With no filter configured, each exchange logs one line in Squid's native
    format on stdout: time, elapsed ms, client, result code/status, body
    bytes, method, target, user, hierarchy and content type.
    """
    conn, resp, body = get(proxy.port, origin.url("/bytes/1234"))
    conn.request("GET", origin.url("/sleep/0.5"))
    assert conn.getresponse().read() == b"hello"
    conn.close()
    assert (resp.status, len(body)) == (200, 1234)
    with socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT) as sock:
        sock.sendall(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert closed_within(sock)[0].startswith(b"HTTP/1.1 403 ")
    proxy.wait_for_line(ACCESS + re.escape(f"127.0.0.1 TCP_MISS/200 1234 GET {origin.url('/bytes/1234')} - "
                                           "HIER_DIRECT/127.0.0.1 "))
    slow = proxy.wait_for_line(ACCESS + re.escape(f"127.0.0.1 TCP_MISS/200 5 GET {origin.url('/sleep/0.5')} "))
    proxy.wait_for_line(ACCESS + r"127\.0\.0\.1 TCP_DENIED/403 \d+ " + re.escape(f"CONNECT 127.0.0.1:{origin.port} - HIER_NONE/- "))
    assert 500 <= int(slow.split()[1]) < 5000
    assert len(proxy.access_lines()) == 3


def test_access_log_goes_to_stdout_by_default(origin, tmp_path):
    """With no [[filter]] in the config, access lines are written to stdout, not stderr."""
    config = tmp_path / "minimal.toml"
    config.write_text('listen = ["tcp:0:interface=127.0.0.1"]\n')
    proc = subprocess.Popen(twistd_command() + ["-n", "--pidfile=", "proxyframe", "--config", str(config)],
                            cwd=tmp_path, env=TREE_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(LISTENING.search(_read_until(proc.stdout, LISTENING))[1])
        get(port, origin.url("/"))[0].close()
        line = _read_until(proc.stdout, re.compile(ACCESS))
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
    assert re.search(re.escape(f" TCP_MISS/200 5 GET {origin.url('/')} "), line)
    assert "TCP_MISS" not in err


def _read_until(stream, pattern: re.Pattern) -> str:
    """Read lines from *stream* (in a thread, so a silent process cannot hang the test) until *pattern*."""
    found: list[str] = []

    def scan():
        for line in stream:
            if pattern.search(line):
                found.append(line)
                return

    reader = threading.Thread(target=scan, daemon=True)
    reader.start()
    reader.join(TIMEOUT)
    assert found, f"no line matching {pattern.pattern!r}"
    return found[0]


def test_chain_without_accesslog_writes_no_line(origin, start_proxy):
    """``filter = []`` (no filter at all): exchanges are relayed and no access line is written."""
    proxy = start_proxy(filter=[])
    conn, resp, _ = get(proxy.port, origin.url("/"))
    conn.close()
    proxy.stop()  # all output is in once the process has exited
    assert resp.status == 200
    assert proxy.access_lines() == []
    assert any("Main loop terminated" in line for line in proxy.lines)


# -- timeouts ---------------------------------------------------------------------

def test_partial_head_times_out_with_408(start_proxy, origin):
    """
    A client that sends part of a request head and then nothing gets 408
    with ``Proxy-Status`` and a close after ``timeouts.header`` (RFC 9110
    §15.5.9); the origin is never contacted.
    """
    proxy = start_proxy(timeouts={"header": 1.0})
    with socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT) as sock:
        sock.sendall(f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n".encode())
        data, elapsed = closed_within(sock)
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert b"error=http_request_error" in data
    assert 0.9 <= elapsed < 3
    assert (origin.connections, origin.requests) == (0, [])


def test_trickled_head_times_out_with_408(start_proxy, origin):
    """
    The header timeout bounds the whole head, not the gap between bytes: a
    client trickling one byte every 0.2 s (slowloris) still gets 408 after
    about ``timeouts.header``, and the origin is never contacted.
    """
    proxy = start_proxy(timeouts={"header": 1.0})
    head = f"GET {origin.url('/')} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: {'a' * 40}\r\n\r\n".encode()
    stop = threading.Event()
    with socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT) as sock:
        def trickle():
            for i in range(len(head)):
                if stop.wait(0.2):
                    return
                try:
                    sock.send(head[i:i + 1])
                except OSError:
                    return

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        try:
            data, elapsed = closed_within(sock)
        finally:
            stop.set()
            sender.join(5)
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert 0.9 <= elapsed < 3
    assert (origin.connections, origin.requests) == (0, [])


@pytest.mark.parametrize("after_response", [True, False], ids=["after-response", "never-used"])
def test_idle_client_connection_is_closed(start_proxy, origin, after_response):
    """
    A keep-alive client connection with no request in progress is closed
    after ``timeouts.client_idle`` (RFC 9112 §9.5), whether it already
    carried an exchange or never sent a byte.
    """
    proxy = start_proxy(timeouts={"client_idle": 1.0})
    if after_response:
        conn, resp, body = get(proxy.port, origin.url("/"))
        assert (resp.status, body, resp.getheader("connection")) == (200, b"hello", None)
        sock = conn.sock
    else:
        sock = socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT)
    with sock:
        data, elapsed = closed_within(sock)
    assert data == b""
    assert 0.9 <= elapsed < 3
    assert len(origin.requests) == int(after_response)


def test_client_idle_timeout_does_not_cut_an_exchange(start_proxy, origin):
    """``timeouts.client_idle`` does not run while a response is awaited: a 2 s origin still answers."""
    proxy = start_proxy(timeouts={"client_idle": 1.0})
    conn, resp, body = get(proxy.port, origin.url("/sleep/2"))
    conn.close()
    assert (resp.status, body) == (200, b"hello")


# -- graceful shutdown -----------------------------------------------------------

def slow_request(proxy, url: str) -> tuple[threading.Thread, list]:
    """Start a GET for *url* in a thread; the list gets (status, body, Connection header)."""
    result: list = []

    def run():
        conn, resp, body = get(proxy.port, url)
        result.append((resp.status, body, resp.getheader("connection")))
        conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_accepting_and_finishes_in_flight_exchange(proxy, origin, sig):
    """
    On SIGTERM or SIGINT the proxy stops accepting at once and closes idle
    keep-alive connections, while the exchange in flight completes (with
    ``Connection: close``, RFC 9112 §9.6); then the process exits as twistd
    does after a signal (killed by that same signal, not by a timeout).
    """
    idle, resp, _ = get(proxy.port, origin.url("/"))
    assert resp.status == 200
    thread, result = slow_request(proxy, origin.url("/sleep/2.5"))
    wait_until(lambda: len(origin.requests) == 2, what="the slow request to reach the origin")
    signalled = time.monotonic()
    proxy.proc.send_signal(sig)
    wait_until(lambda: refuses_connections(proxy.port), 2, "the listener to close")
    assert closed_within(idle.sock, 2)[0] == b""
    assert thread.is_alive(), "the slow exchange ended before the listener closed"
    thread.join(TIMEOUT)
    assert result == [(200, b"hello", "close")]
    assert proxy.proc.wait(TIMEOUT) == -sig
    assert time.monotonic() - signalled < 5
    assert any("Main loop terminated" in line for line in proxy.lines)


def test_shutdown_grace_cuts_slow_exchange(start_proxy, origin):
    """
    An exchange still running when ``timeouts.shutdown_grace`` (1 s) ends
    is cut (the client gets no response, only a close) and the process exits
    within a few seconds, though the origin would take 10 s.
    """
    proxy = start_proxy(timeouts={"shutdown_grace": 1.0})
    with socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT) as sock:
        sock.sendall(f"GET {origin.url('/sleep/10')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        wait_until(lambda: len(origin.requests) == 1, what="the request to reach the origin")
        signalled = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        data, _ = closed_within(sock)
    assert data == b""
    assert proxy.proc.wait(TIMEOUT) == -signal.SIGTERM
    assert 0.9 <= time.monotonic() - signalled < 4


# -- configuration and listeners --------------------------------------------------

BAD_CONFIGS = [
    pytest.param('colour = "blue"\n', ["colour", "expected one of", "connect_ports"], id="unknown-key"),
    pytest.param("[timeouts]\nconect = 5.0\n", ["timeouts.conect", "expected one of", "connect"],
                 id="unknown-table-key"),
    pytest.param('[timeouts]\nconnect = "soon"\n', ["timeouts.connect", "must be a number", "'soon'"], id="wrong-type"),
    pytest.param("listen = [8080]\n", ["listen[0]", "must be a string"], id="wrong-item-type"),
    pytest.param("connect_ports = [true]\n", ["connect_ports[0]", "must be an integer"], id="bool-for-int"),
    pytest.param("timeouts = 5\n", ["[timeouts]", "must be a table"], id="not-a-table"),
    pytest.param("[timeouts]\nheader = -1\n", ["timeouts.header", "greater than 0"], id="negative-timeout"),
    pytest.param("connect_ports = [443, 70000]\n", ["connect_ports", "70000", "1-65535"], id="port-out-of-range"),
    pytest.param('via = "x"\nlisten = = 1\n', ["not valid TOML", "line 2"], id="bad-toml"),
    pytest.param(None, ["cannot read", "No such file"], id="missing-file"),
]


@pytest.mark.parametrize("content, expected", BAD_CONFIGS)
def test_bad_config_fails_at_start_naming_file_and_key(tmp_path, content, expected):
    """
    A config that cannot be used stops ``twistd proxyframe`` before it
    listens, with a non-zero status and a message naming the file, the key
    and what was expected, and no traceback.
    """
    path = tmp_path / "bad.toml"
    if content is not None:
        path.write_text(content)
    result = twistd("--config", str(path), cwd=tmp_path)
    assert result.returncode != 0
    assert_no_traceback(result.stdout)
    (message,) = [line for line in result.stdout.splitlines() if f"{path}:" in line]
    for text in expected:
        assert text in message, message


def test_repeated_listen_replaces_config_and_each_relays(start_proxy, origin):
    """
    ``--listen`` twice: the proxy listens on exactly those two endpoints
    (not the config's), logs both, and relays through each.
    """
    proxy = start_proxy(extra_args=["--listen", "tcp:0:interface=127.0.0.1"] * 2)
    wait_until(lambda: len(_ports(proxy)) == 2, what="two listening lines")
    for port in _ports(proxy):
        conn, resp, body = get(port, origin.url("/"))
        conn.close()
        assert (resp.status, body) == (200, b"hello")
    assert len(set(_ports(proxy))) == 2
    assert len(origin.requests) == 2


def _ports(proxy: ProxyProcess) -> list[int]:
    return [int(m[1]) for line in list(proxy.lines) if (m := LISTENING.search(line))]


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


@pytest.mark.parametrize("listen, reason", [
    (["tcp:{busy}:interface=127.0.0.1"], "Address already in use"),
    (["tcp:0:interface=127.0.0.1", "tcp:{busy}:interface=127.0.0.1"], "Address already in use"),
    (["tcp:notaport"], "not a valid endpoint"),
], ids=["in-use", "second-in-use", "malformed"])
def test_listener_that_cannot_open_stops_the_process(tmp_path, busy_port, listen, reason):
    """
    A listen endpoint that is taken or malformed stops the process with
    status 1 and one line naming the endpoint and the reason, no traceback;
    a proxy never keeps running on only some of its listeners.
    """
    args = [arg for endpoint in listen for arg in ("--listen", endpoint.format(busy=busy_port))]
    result = twistd(*args, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout, result.stdout
    (line,) = [line for line in result.stdout.splitlines() if "cannot listen" in line]
    assert listen[-1].format(busy=busy_port) in line and reason in line, line


def test_twistd_runs_on_the_proxy_reactor_unless_told_otherwise(start_proxy, origin, tmp_path):
    """
    ``twistd proxyframe`` installs proxyframe.reactor.ProxyReactor (events
    dispatched without log.callWithLogger); ``twistd --reactor=poll``
    keeps the reactor it was told.  Both relay.
    """
    default = start_proxy()
    assert any("reactor class: proxyframe.reactor.ProxyReactor." in line for line in default.lines)
    chosen = ProxyProcess(proxy_config(), tmp_path, twistd=twistd_command() + ["--reactor=poll"])
    try:
        assert any("reactor class: twisted.internet.pollreactor.PollReactor." in line for line in chosen.lines)
        for proxy in (default, chosen):
            conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=TIMEOUT)
            conn.request("GET", origin.url("/r"))
            assert conn.getresponse().read() == b"hello"
            conn.close()
    finally:
        chosen.stop()
