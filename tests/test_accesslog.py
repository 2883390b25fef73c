"""
The ``accesslog`` filter: one line per exchange in Squid's native format,
the Common and Combined Log Formats, or JSON lines; to stdout or a file
that is reopened on SIGHUP (logrotate); nothing lost on SIGTERM; a stuck
disk never stalls the proxy; bad options stop the start naming the option.

Every test runs ``twistd proxyframe`` with a real origin and real clients.
"""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import os
import re
import select
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from passlib.hash import apr_md5_crypt
from twisted.internet.testing import MemoryReactorClock
from zope.interface.verify import verifyObject

from flowtools import TIMEOUT
from support import Daemon, ProxyProcess, body_bytes, wait_until
from proxyframe.config import Config, ConfigError
from proxyframe.filters import FilterContext
from proxyframe.interfaces import IFilter
from proxyframe.plugins.pf_accesslog import accesslog

FORMATS = ("squid", "common", "combined", "json")
JSON_KEYS = {"time", "client", "user", "method", "target", "status", "bytes_sent", "bytes_received",
             "duration", "error", "cache_status", "user_agent", "referer"}


def config_text(*filters: dict, **top) -> str:
    """A config listening on 127.0.0.1:0 with one ``accesslog`` entry per dict of options."""
    top = {"listen": ["tcp:0:interface=127.0.0.1"], **top}
    lines = [f"{key} = {json.dumps(value)}" for key, value in top.items()]
    for options in filters:
        lines += ["[[filter]]", 'use = "accesslog"'] + [f"{k} = {json.dumps(v)}" for k, v in options.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def start(tmp_path):
    """``start(*filters, **top)``: a proxyframe process with those accesslog entries; stopped at teardown."""
    started: list[ProxyProcess] = []

    def start_(*filters: dict, **top) -> ProxyProcess:
        proc = ProxyProcess(config_text(*filters, **top), tmp_path)
        started.append(proc)
        return proc

    yield start_
    for proc in started:
        proc.stop()


def every_format() -> list[dict]:
    """One entry per format, each to ``<format>.log`` beside the config."""
    return [{"format": name, "path": f"{name}.log"} for name in FORMATS]


def log_lines(path: Path, count: int) -> list[str]:
    """Wait until *path* holds *count* lines; return them (failing if there are more)."""
    def read():
        return path.read_text().splitlines() if path.exists() else []
    wait_until(lambda: len(read()) >= count, TIMEOUT, f"{count} lines in {path.name}")
    lines = read()
    assert len(lines) == count, lines
    return lines


def logged(tmp_path: Path, count: int = 1) -> dict[str, str]:
    """The last line of each format's file, once each holds *count* lines."""
    return {name: log_lines(tmp_path / f"{name}.log", count)[-1] for name in FORMATS}


def check_clf_time(stamp: str, before: float, after: float) -> None:
    """A Common Log Format ``[10/Oct/2000:13:55:36 -0700]`` within [before, after]."""
    when = datetime.datetime.strptime(stamp, "[%d/%b/%Y:%H:%M:%S %z]").timestamp()
    assert int(before) <= when <= after, (stamp, before, after)


def check_squid(line: str, before: float, after: float, rest: str) -> None:
    """``time elapsed remotehost`` then *rest* exactly; time and elapsed within the window."""
    m = re.fullmatch(r"(\d+\.\d{3}) +(\d+) 127\.0\.0\.1 (.*)", line)
    assert m, line
    assert m[3] == rest
    assert int(before) <= float(m[1]) <= after + 0.001
    assert 0 <= int(m[2]) <= (after - before) * 1000 + 1


def check_json(line: str, before: float, after: float, **expected) -> dict:
    """The JSON line has exactly the stable keys, *expected* values, and a sane time and duration."""
    record = json.loads(line)
    assert set(record) == JSON_KEYS
    assert {k: record[k] for k in expected} == expected
    when = datetime.datetime.fromisoformat(record["time"]).timestamp()
    assert record["time"].endswith("Z") and int(before) <= when <= after
    assert 0 <= record["duration"] <= after - before
    return record


# -- each format ---------------------------------------------------------------------

def test_get_in_every_format(start, origin, tmp_path):
    """
    A relayed GET gives, in each format, one line with the client address,
    method, target URI, status, body bytes sent, user ``-`` and a
    non-negative duration; Combined adds Referer and User-Agent, escaping
    ``"`` as Apache does.
    """
    proxy = start(*every_format())
    url = origin.url("/")
    before = time.time()
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=TIMEOUT)
    conn.request("GET", url, headers={"User-Agent": 'probe/1.0 "x"', "Referer": "http://ref.example/a b"})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert (resp.status, body, len(origin.requests)) == (200, b"hello", 1)
    lines = logged(tmp_path)
    after = time.time()  # the line is written after the exchange's end is stamped

    check_squid(lines["squid"], before, after, f"TCP_MISS/200 5 GET {url} - HIER_DIRECT/127.0.0.1 text/plain")
    m = re.fullmatch(r'127\.0\.0\.1 - - (\[[^]]+\]) "GET (\S+) HTTP/1\.1" 200 5', lines["common"])
    assert m and m[2] == url, lines["common"]
    check_clf_time(m[1], before, after)
    assert lines["combined"] == lines["common"] + r' "http://ref.example/a b" "probe/1.0 \"x\""'
    check_json(lines["json"], before, after, client="127.0.0.1", user=None, method="GET", target=url, status=200,
               bytes_sent=5, bytes_received=0, error=None, cache_status=None, user_agent='probe/1.0 "x"',
               referer="http://ref.example/a b")


def test_default_is_squid_format_on_stdout(start, origin):
    """
    With no options the line goes to stdout (the process's own, not through
    twistd's logger) in Squid's native format, once per exchange.
    """
    proxy = start({})
    url = origin.url("/bytes/100")
    before = time.time()
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=TIMEOUT)
    conn.request("GET", url)
    assert conn.getresponse().read() == body_bytes(100)
    conn.close()
    line = proxy.wait_for_line(r"^\d+\.\d{3} ")
    after = time.time()  # the line is written after the exchange's end is stamped
    check_squid(line, before, after, f"TCP_MISS/200 100 GET {url} - HIER_DIRECT/127.0.0.1 -")
    proxy.stop()
    assert [entry for entry in proxy.lines if re.match(r"\d+\.\d{3} ", entry)] == [line]


def test_no_config_at_all_relays_loopback_and_logs_squid_lines(origin, tmp_path):
    """
    ``twistd -n proxyframe`` with no --config (only ``--listen``): the
    default chain, loopback-only acl then accesslog, relays a request from
    127.0.0.1 and logs it on stdout in Squid's native format, once.
    """
    proxy = ProxyProcess(None, tmp_path, ["--listen", "tcp:0:interface=127.0.0.1"])
    try:
        url = origin.url("/bytes/100?seed=9")
        before = time.time()
        conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=TIMEOUT)
        conn.request("GET", url)
        assert conn.getresponse().read() == body_bytes(100, seed=9)
        conn.close()
        line = proxy.wait_for_line(r"^\d+\.\d{3} ")
        after = time.time()  # the line is written after the exchange's end is stamped
    finally:
        proxy.stop()
    assert [r.target for r in origin.requests] == ["/bytes/100?seed=9"]
    check_squid(line, before, after, f"TCP_MISS/200 100 GET {url} - HIER_DIRECT/127.0.0.1 -")
    assert proxy.access_lines() == [line]


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of this host that is not loopback (the route's source; no packet is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 9))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_no_config_at_all_refuses_other_clients(origin, tmp_path):
    """
    With no --config the default chain's acl serves loopback clients only:
    a client from another address of this host gets 403 (and its Squid
    line says TCP_DENIED), and nothing reaches the origin.
    """
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address")
    proxy = ProxyProcess(None, tmp_path, ["--listen", f"tcp:0:interface={address}"])
    try:
        url = origin.url("/")
        conn = http.client.HTTPConnection(address, proxy.port, timeout=TIMEOUT)
        conn.request("GET", url)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        line = proxy.wait_for_line(r"^\d+\.\d{3} ")
    finally:
        proxy.stop()
    assert resp.status == 403
    assert origin.requests == []
    assert re.fullmatch(rf"\d+\.\d{{3}} +\d+ {re.escape(address)} TCP_DENIED/403 {len(body)} GET {re.escape(url)} - "
                        r"HIER_NONE/- text/\S+", line), line


def test_default_goes_to_twistd_log_file_when_daemonized(origin, tmp_path):
    """
    ``twistd proxyframe`` without ``-n`` daemonizes, and its standard output
    becomes /dev/null: the default ``path = "-"`` then sends each line
    through twisted.logger (namespace ``proxyframe.accesslog``) to the file
    ``--logfile`` names, in Squid's format, instead of losing it.
    """
    daemon = Daemon(config_text({}), tmp_path)

    def logged_lines() -> list[str]:
        return [m[1] for m in re.finditer(r"\[proxyframe\.accesslog#info\] (\d+\.\d{3} .*)", daemon.log_text())]

    try:
        port = daemon.port()
        url = origin.url("/bytes/100")
        before = time.time()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        conn.request("GET", url)
        assert conn.getresponse().read() == body_bytes(100)
        conn.close()
        wait_until(logged_lines, TIMEOUT, "the access line in the log file")
        after = time.time()  # the line is written after the exchange's end is stamped
    finally:
        daemon.stop()
    (line,) = logged_lines()
    check_squid(line, before, after, f"TCP_MISS/200 100 GET {url} - HIER_DIRECT/127.0.0.1 -")
    assert not daemon.pidfile.exists()


def test_502_is_logged_with_its_error(start, tmp_path):
    """
    An unreachable origin: the client gets 502 (RFC 9110 §15.6.3) and each
    format logs 502 with the bytes of the error page; Squid's line has no
    upstream (``HIER_NONE/-``) and the JSON line the RFC 9209 error type
    that ``Proxy-Status`` carries.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    proxy = start(*every_format())
    url = f"http://127.0.0.1:{dead}/gone"
    before = time.time()
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=TIMEOUT)
    conn.request("GET", url)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    error = re.search(r"error=([a-z_]+)", resp.getheader("Proxy-Status"))[1]
    content_type = resp.getheader("Content-Type").split(";")[0]
    assert resp.status == 502 and body
    lines = logged(tmp_path)
    after = time.time()  # the line is written after the exchange's end is stamped

    check_squid(lines["squid"], before, after, f"TCP_MISS/502 {len(body)} GET {url} - HIER_NONE/- {content_type}")
    assert re.fullmatch(rf'127\.0\.0\.1 - - \[[^]]+\] "GET {re.escape(url)} HTTP/1\.1" 502 {len(body)}',
                        lines["common"]), lines["common"]
    assert lines["combined"] == lines["common"] + ' "-" "-"'
    check_json(lines["json"], before, after, status=502, bytes_sent=len(body), error=error, target=url,
               user_agent=None, referer=None)


def test_connect_tunnel_is_logged(start, origin, tmp_path):
    """
    A CONNECT tunnel (RFC 9110 §9.3.6) is one exchange: Squid's code is
    ``TCP_TUNNEL``, the URL the authority-form target, and the byte counts
    are those relayed through the tunnel in each direction.
    """
    proxy = start(*every_format(), connect_ports=[origin.port])
    authority = f"127.0.0.1:{origin.port}"
    request = f"GET / HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    before = time.time()
    with socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT) as sock:
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        head, tunnelled = data.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200 ")
        sock.sendall(request)
        while not tunnelled.endswith(b"\r\n\r\nhello"):
            tunnelled += sock.recv(4096)
    lines = logged(tmp_path)
    after = time.time()

    assert len(origin.requests) == 1
    check_squid(lines["squid"], before, after, f"TCP_TUNNEL/200 {len(tunnelled)} CONNECT {authority} - "
                                               f"HIER_DIRECT/127.0.0.1 -")
    assert re.fullmatch(rf'127\.0\.0\.1 - - \[[^]]+\] "CONNECT {authority} HTTP/1\.1" 200 {len(tunnelled)}',
                        lines["common"]), lines["common"]
    check_json(lines["json"], before, after, method="CONNECT", target=authority, status=200,
               bytes_sent=len(tunnelled), bytes_received=len(request), error=None)


def test_squid_line_escapes_user_and_target(origin, tmp_path):
    """
    Squid's line shows the authenticated user and the target as sent when
    they are printable ASCII, and escapes them as Apache does when they are
    not (``\\"``, ``\\\\``, ``\\xhh`` for each UTF-8 byte): requests by two users
    on one connection, one plain and one not, each get its own line.
    """
    (tmp_path / "users.htpasswd").write_text(
        f"bench:{apr_md5_crypt.hash('pw')}\njos\u00e9:{apr_md5_crypt.hash('pw')}\n", encoding="utf-8")
    text = config_text().rstrip("\n") + (
        '\n[[filter]]\nuse = "auth"\nhtpasswd_file = "users.htpasswd"\n'
        '[[filter]]\nuse = "accesslog"\nformat = "squid"\npath = "squid.log"\n')
    proxy = ProxyProcess(text, tmp_path)
    try:
        before = time.time()
        with socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT) as sock:
            for user, path in ((b"jos\xc3\xa9", b'/a"b\\c'), (b"bench", b"/plain"), (b"jos\xc3\xa9", b"/plain")):
                credentials = base64.b64encode(user + b":pw")
                sock.sendall(b"GET http://127.0.0.1:%d%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                             b"Proxy-Authorization: Basic %s\r\n\r\n" % (origin.port, path, origin.port, credentials))
                data = b""
                while not data.endswith(b"\r\n\r\nhello"):
                    chunk = sock.recv(4096)
                    assert chunk, data
                    data += chunk
                assert data.startswith(b"HTTP/1.1 200 "), data
        lines = log_lines(tmp_path / "squid.log", 3)
        after = time.time()
    finally:
        proxy.stop()
    url = origin.url("")
    check_squid(lines[0], before, after, f'TCP_MISS/200 5 GET {url}/a\\"b\\\\c jos\\xc3\\xa9 HIER_DIRECT/127.0.0.1 '
                                         f"text/plain")
    check_squid(lines[1], before, after, f"TCP_MISS/200 5 GET {url}/plain bench HIER_DIRECT/127.0.0.1 text/plain")
    check_squid(lines[2], before, after, f"TCP_MISS/200 5 GET {url}/plain jos\\xc3\\xa9 HIER_DIRECT/127.0.0.1 "
                                         f"text/plain")
    assert [r.target for r in origin.requests] == ['/a"b\\c', "/plain", "/plain"]


# -- files ----------------------------------------------------------------------------

def get_all(proxy: ProxyProcess, urls: list[str]) -> None:
    """GET each URL through the proxy on one persistent connection."""
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=TIMEOUT)
    for url in urls:
        conn.request("GET", url)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
    conn.close()


def targets(lines: list[str]) -> list[str]:
    return [json.loads(line)["target"] for line in lines]


def test_sighup_reopens_the_file_like_logrotate(start, origin, tmp_path):
    """
    logrotate renames the file and sends SIGHUP: later lines go to a new
    file at the configured path, earlier ones stay in the renamed file, and
    the proxy keeps running.
    """
    (tmp_path / "logs").mkdir()
    proxy = start({"format": "json", "path": "logs/access.log"})
    log, rotated = tmp_path / "logs" / "access.log", tmp_path / "logs" / "access.log.1"
    first = [origin.url("/one"), origin.url("/two")]
    get_all(proxy, first)
    log_lines(log, 2)
    log.rename(rotated)
    os.kill(proxy.pid, signal.SIGHUP)
    wait_until(log.exists, TIMEOUT, "the reopened file")
    get_all(proxy, [origin.url("/three")])
    assert targets(log_lines(log, 1)) == [origin.url("/three")]
    assert proxy.proc.poll() is None
    proxy.stop()
    assert targets(log_lines(rotated, 2)) == first
    assert targets(log_lines(log, 1)) == [origin.url("/three")]


def test_sigterm_loses_no_line(start, origin, tmp_path):
    """
    On SIGTERM every exchange is in the file once the process has exited:
    N quick requests just before the signal, and one still in progress when
    it arrives (finished within ``timeouts.shutdown_grace``).
    """
    proxy = start({"format": "json", "path": "access.log"})
    urls = [origin.url(f"/n{i}") for i in range(50)]
    get_all(proxy, urls)
    slow = http.client.HTTPConnection(proxy.host, proxy.port, timeout=TIMEOUT)
    slow.request("GET", origin.url("/sleep/1"))
    wait_until(lambda: len(origin.requests) == 51, TIMEOUT, "the slow request at the origin")
    proxy.proc.send_signal(signal.SIGTERM)
    assert slow.getresponse().read() == b"hello"
    slow.close()
    assert proxy.stop() == -signal.SIGTERM  # twistd's exit after a clean shutdown on SIGTERM
    assert targets((tmp_path / "access.log").read_text().splitlines()) == urls + [origin.url("/sleep/1")]


class Fifo:
    """A named pipe at *path* whose reading end the test holds: a disk as slow as the test wants."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.received = b""

    def read_until(self, done) -> list[str]:
        """Read until ``done(received)`` is true or the writer closes; returns the JSON lines' targets."""
        deadline = time.monotonic() + TIMEOUT
        while not done(self.received):
            assert time.monotonic() < deadline, f"timed out reading {self.path.name}"
            if select.select([self.fd], [], [], 1)[0]:
                piece = os.read(self.fd, 65536)
                if not piece:
                    break
                self.received += piece
        return targets(self.received.decode().splitlines())

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def fifo(tmp_path):
    pipe = Fifo(tmp_path / "access.fifo")
    yield pipe
    pipe.close()


def long_urls(origin, count: int) -> list[str]:
    """URLs whose JSON lines are about 4 KiB each, so a few fill a pipe."""
    return [origin.url(f"/{i}/" + "x" * 4000) for i in range(count)]


def test_sigterm_waits_for_a_slow_disk(start, origin, fifo):
    """
    On SIGTERM the lines still waiting for a slow disk are written before
    the process exits (within ``timeouts.shutdown_grace``), not lost with
    the writer thread.
    """
    proxy = start({"format": "json", "path": fifo.path.name})
    urls = long_urls(origin, 30)  # 120 KiB: the pipe holds 64 KiB, the rest waits in the proxy
    get_all(proxy, urls)
    proxy.proc.send_signal(signal.SIGTERM)
    proxy.wait_for_line("Received SIGTERM")
    assert fifo.read_until(lambda received: False) == urls
    assert proxy.stop() == -signal.SIGTERM


def test_stuck_disk_drops_lines_and_never_stalls_the_proxy(start, origin, fifo):
    """
    Writing to a pipe nobody reads (a stuck disk): every request is still
    answered at once, lines past ``buffer_bytes`` are dropped and counted
    in a warning, and once the pipe drains the lines kept arrive in order.
    """
    proxy = start({"format": "json", "path": fifo.path.name, "buffer_bytes": 16384})
    urls = long_urls(origin, 40)  # 160 KiB > pipe + buffer
    started = time.monotonic()
    get_all(proxy, urls)
    assert time.monotonic() - started < 10
    marker = origin.url("/marker")
    threading.Timer(0.5, get_all, (proxy, [marker])).start()
    kept = fifo.read_until(lambda received: marker.encode() in received)
    assert kept[-1] == marker and kept[:-1] == [u for u in urls if u in kept]
    dropped = len(urls) - len(kept[:-1])
    assert dropped > 0
    proxy.stop()
    warnings = [int(m[1]) for line in proxy.lines if (m := re.search(r"accesslog dropped (\d+) lines", line))]
    assert sum(warnings) == dropped


# -- options ----------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"format": "xml"}, "format: 'xml' is not one of squid, common, combined, json"),
    ({"path": "no-such-dir/access.log"}, "path: cannot open "),
    ({"formatt": "json"}, "unknown option 'formatt'"),
    ({"buffer_bytes": 0}, "buffer_bytes must be an integer of bytes >= 1"),
], ids=["format", "path", "unknown", "buffer_bytes"])
def test_bad_option_stops_the_start(tmp_path, options, message):
    """A bad option stops the start with one line naming the filter and the option, no traceback."""
    with pytest.raises(RuntimeError) as failed:
        ProxyProcess(config_text(options), tmp_path)
    output = str(failed.value)
    assert f"filter[0] (accesslog): {message}" in output
    assert "Traceback" not in output


def test_filter_provides_ifilter():
    """``build`` returns an IFilter provider and checks option types before opening anything."""
    context = FilterContext(MemoryReactorClock(), Config(), Path.cwd(), 0)
    verifyObject(IFilter, accesslog.build({"format": "json"}, context))
    for bad in ({"format": 1}, {"format": ["json"]}, {"path": ""}, {"path": 3}, {"buffer_bytes": True}):
        with pytest.raises(ConfigError):
            accesslog.build(bad, context)
