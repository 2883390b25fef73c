"""
The ``metrics`` filter: every exchange counted in ``exchange_done``, served
in Prometheus's text format at ``/metrics`` by the one process of
``workers = 1``, or summed over every worker by the supervisor of
``workers = N`` (prometheus-client's multiprocess mode), dead workers'
counts included.

The integration tests run the real ``twistd proxyframe`` with the metrics
endpoint on port 0, read its address from the log line, and scrape it with
urllib; the counters are checked against what the clients sent and
received.  The filter's arithmetic is checked with plain ``Exchange``
values and no sockets.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import stat
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from flowtools import TIMEOUT
from support import Origin, body_bytes, proxy_config, start_failure, wait_until
from test_workers import ProcessClock, connection_to, end, open_fds, serving
from proxyframe import ConfigError, load_config
from proxyframe.chain import build_chain
from proxyframe.exchange import Exchange, Headers, Request, Response
from proxyframe.interfaces import IFilter
from proxyframe.plugins.pf_metrics import DURATION_BUCKETS, Metrics
from proxyframe.service import metrics_filter
from proxyframe.workers import RESTART_DELAY, Workers

METRICS_AT = re.compile(r"proxyframe metrics at (http://127\.0\.0\.1:(\d+)/metrics)")
LOCAL = "tcp:0:interface=127.0.0.1"
#: Body sizes (bytes) of the exchanges the integration tests make.
RESPONSE_SIZE, REQUEST_SIZE = 1000, 300


# -- helpers --------------------------------------------------------------------

def metrics_filter_entry(**options) -> dict:
    return {"use": "metrics", "listen": LOCAL, **options}


def metrics_url(proxy) -> str:
    """The /metrics URL the proxy logged (waited for)."""
    return METRICS_AT.search(proxy.wait_for_line(METRICS_AT.pattern, TIMEOUT))[1]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """GET *url*; every sample as ``{(name, sorted label pairs): value}``."""
    with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = resp.read().decode("utf-8")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    """One sample's value; 0 when absent (a label pair never seen)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str) -> float:
    """The sum of a metric over all its label values."""
    return sum(v for (n, _), v in samples.items() if n == name)


def exchanges(port: int, conn: http.client.HTTPConnection | None, origin: Origin, count: int) -> None:
    """
    *count* exchanges on one keep-alive connection (a new one to *port* when
    *conn* is ``None``), alternating a GET of RESPONSE_SIZE bytes and a POST
    of REQUEST_SIZE bytes answered with RESPONSE_SIZE bytes.
    """
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        for i in range(count):
            if i % 2:
                conn.request("POST", origin.url(f"/bytes/{RESPONSE_SIZE}"), body=body_bytes(REQUEST_SIZE))
            else:
                conn.request("GET", origin.url(f"/bytes/{RESPONSE_SIZE}"))
            resp = conn.getresponse()
            assert resp.status == 200
            assert len(resp.read()) == RESPONSE_SIZE
    finally:
        conn.close()


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process *pid* holds listening sockets on (from /proc)."""
    inodes = {target[len("socket:["):-1] for target in open_fds(pid) if target.startswith("socket:[")}
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.read().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def environment(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [entry.split(b"=", 1) for entry in f.read().split(b"\0") if b"=" in entry]
    return {k.decode(): v.decode() for k, v in pairs}


# -- integration: workers = 2 ------------------------------------------------------

def test_two_workers_counts_are_summed_by_the_supervisor_even_after_one_dies(start_proxy, origin):
    """
    ``workers = 2``: 24 exchanges, half on connections each worker
    accepted, appear once in the supervisor's /metrics, summed: exactly 24
    requests (12 GET, 12 POST, all 200), the response and request body
    bytes the clients received and sent, 24 observations in the duration
    histogram.  Only the supervisor listens on the metrics port; each
    worker has the private 0700 directory in ``PROMETHEUS_MULTIPROC_DIR``.
    After worker 1 is killed with SIGKILL and restarted, 8 more exchanges
    give totals of 32: the dead worker's counts are still in them.  At
    stop, the directory is removed.
    """
    proxy = start_proxy(workers=2, filter=[metrics_filter_entry()])
    url = metrics_url(proxy)
    metrics_port = int(METRICS_AT.search(proxy.wait_for_line(METRICS_AT.pattern))[2])
    pids = serving(proxy, 2)
    workers = list(pids.values())

    assert metrics_port in listening_ports(proxy.pid)
    for pid in workers:
        assert metrics_port not in listening_ports(pid)
    directory = environment(workers[0])["PROMETHEUS_MULTIPROC_DIR"]
    assert environment(workers[1])["PROMETHEUS_MULTIPROC_DIR"] == directory
    assert "PROMETHEUS_MULTIPROC_DIR" not in environment(proxy.pid)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700

    for pid in workers:  # 3 connections of 4 exchanges on each worker
        for _ in range(3):
            exchanges(proxy.port, connection_to(proxy.port, pid, workers), origin, 4)
    samples = scrape(url)
    assert value(samples, "proxyframe_requests_total", method="GET", code="200") == 12
    assert value(samples, "proxyframe_requests_total", method="POST", code="200") == 12
    assert total(samples, "proxyframe_requests_total") == 24
    assert value(samples, "proxyframe_response_body_bytes_total") == 24 * RESPONSE_SIZE
    assert value(samples, "proxyframe_request_body_bytes_total") == 12 * REQUEST_SIZE
    assert value(samples, "proxyframe_request_duration_seconds_count") == 24
    assert value(samples, "proxyframe_request_duration_seconds_bucket", le="+Inf") == 24
    assert total(samples, "proxyframe_errors_total") == 0

    os.kill(pids[1], signal.SIGKILL)
    proxy.wait_for_line(rf"worker 1 \(pid {pids[1]}\) was killed by signal 9", TIMEOUT)
    wait_until(lambda: len(re.findall(r"worker 1 \(pid \d+\) serving", "\n".join(proxy.lines))) == 2,
               TIMEOUT, "worker 1 to be restarted")
    restarted = serving(proxy, 2)
    assert restarted[1] != pids[1]
    workers = list(restarted.values())
    for pid in workers:
        exchanges(proxy.port, connection_to(proxy.port, pid, workers), origin, 4)
    samples = scrape(url)
    assert total(samples, "proxyframe_requests_total") == 32
    assert value(samples, "proxyframe_response_body_bytes_total") == 32 * RESPONSE_SIZE
    assert value(samples, "proxyframe_request_body_bytes_total") == 16 * REQUEST_SIZE
    assert value(samples, "proxyframe_request_duration_seconds_count") == 32

    proxy.stop()
    assert not os.path.exists(directory)


def test_cache_results_of_every_worker_are_summed(start_proxy, origin):
    """
    With the cache filter before it, the metrics filter counts each
    exchange's cache result (Squid's code) and the supervisor sums the
    workers': each worker's memory store misses once, then hits, so 4
    GETs on a connection to each of 2 workers give TCP_MISS 2, TCP_HIT 6,
    and the origin sees 2 requests.
    """
    def cacheable(conn, req) -> bool:
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nCache-Control: max-age=3600\r\n\r\nfresh")
        return True

    origin.handler = cacheable
    proxy = start_proxy(workers=2, filter=[{"use": "cache"}, metrics_filter_entry()])
    url = metrics_url(proxy)
    workers = list(serving(proxy, 2).values())
    for pid in workers:
        conn = connection_to(proxy.port, pid, workers)
        try:
            for _ in range(4):
                conn.request("GET", origin.url("/stored"))
                resp = conn.getresponse()
                assert (resp.status, resp.read()) == (200, b"fresh")
        finally:
            conn.close()
    samples = scrape(url)
    assert value(samples, "proxyframe_cache_lookups_total", result="TCP_MISS") == 2
    assert value(samples, "proxyframe_cache_lookups_total", result="TCP_HIT") == 6
    assert total(samples, "proxyframe_cache_lookups_total") == 8
    assert value(samples, "proxyframe_requests_total", method="GET", code="200") == 8
    assert len(origin.requests) == 2


# -- integration: workers = 1 ------------------------------------------------------

def test_one_process_serves_its_own_counts(start_proxy, origin, tmp_path):
    """
    ``workers = 1``: the process itself serves /metrics, with no
    multiprocess directory.  It counts 200s by method (an unknown method
    as ``other``), a 502 by its RFC 9209 error type, and a CONNECT tunnel
    with the bytes relayed each way, which stay out of the body byte
    counters and the duration histogram.
    """
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
    refused_port = closed.getsockname()[1]
    try:
        proxy = start_proxy(connect_ports=[origin.port], filter=[metrics_filter_entry()])
        url = metrics_url(proxy)
        assert "PROMETHEUS_MULTIPROC_DIR" not in environment(proxy.pid)
        assert int(METRICS_AT.search(proxy.wait_for_line(METRICS_AT.pattern))[2]) in listening_ports(proxy.pid)

        exchanges(proxy.port, None, origin, 2)
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=TIMEOUT)
        conn.request("BREW", origin.url("/"))
        assert conn.getresponse().read() == b"hello"
        conn.request("GET", f"http://127.0.0.1:{refused_port}/")
        assert conn.getresponse().status == 502
        conn.close()

        origin.raw = lambda sock: sock.sendall(sock.recv(100).upper())  # an echo, then close
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock:
            sock.sendall(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(1)
            assert head.startswith(b"HTTP/1.1 200 ")
            sock.sendall(b"tunnelled")
            received = b""
            while piece := sock.recv(100):
                received += piece
            assert received == b"TUNNELLED"
        wait_until(lambda: value(scrape(url), "proxyframe_tunnels_total") == 1, TIMEOUT, "the tunnel counted")
    finally:
        closed.close()

    samples = scrape(url)
    assert value(samples, "proxyframe_requests_total", method="GET", code="200") == 1
    assert value(samples, "proxyframe_requests_total", method="POST", code="200") == 1
    assert value(samples, "proxyframe_requests_total", method="other", code="200") == 1
    assert value(samples, "proxyframe_requests_total", method="GET", code="502") == 1
    assert value(samples, "proxyframe_requests_total", method="CONNECT", code="200") == 1
    assert total(samples, "proxyframe_requests_total") == 5
    assert value(samples, "proxyframe_errors_total", error="connection_refused") == 1
    assert total(samples, "proxyframe_errors_total") == 1
    assert value(samples, "proxyframe_tunnel_sent_bytes_total") == len(b"TUNNELLED")
    assert value(samples, "proxyframe_tunnel_received_bytes_total") == len(b"tunnelled")
    assert value(samples, "proxyframe_request_body_bytes_total") == REQUEST_SIZE
    error_page = value(samples, "proxyframe_response_body_bytes_total") - 2 * RESPONSE_SIZE - len(b"hello")
    assert error_page > 0  # the 502's own page, and nothing from the tunnel
    assert value(samples, "proxyframe_request_duration_seconds_count") == 4


def test_only_get_and_head_of_the_metrics_path_are_served(start_proxy):
    """
    Any other path gets 404 (so does ``/metrics/x``); another method on
    /metrics gets 405 with ``Allow: GET, HEAD``; HEAD gets the head
    without a body.
    """
    proxy = start_proxy(filter=[metrics_filter_entry()])
    url = metrics_url(proxy)
    base = url[:-len("/metrics")]
    for path in ("/", "/metricsx", "/metrics/x", "/favicon.ico"):
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(base + path, timeout=TIMEOUT)
        assert failed.value.code == 404, path
    with pytest.raises(urllib.error.HTTPError) as failed:
        urllib.request.urlopen(urllib.request.Request(url, data=b"x", method="POST"), timeout=TIMEOUT)
    assert failed.value.code == 405
    assert failed.value.headers["Allow"] == "GET, HEAD"
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=TIMEOUT) as resp:
        assert resp.status == 200
        assert resp.read() == b""
    assert value(scrape(url), "proxyframe_tunnels_total") == 0  # GET still served


@pytest.mark.parametrize("workers", [1, 2])
def test_without_the_filter_no_metrics_port_is_opened(start_proxy, workers):
    """Without a ``metrics`` filter, the proxy's own port is the only one listening, and nothing is said of metrics."""
    proxy = start_proxy(workers=workers, filter=[])
    if workers > 1:
        serving(proxy, workers)
    assert listening_ports(proxy.pid) == {proxy.port}
    assert not [line for line in proxy.lines if "metrics" in line]


@pytest.mark.parametrize("listen, message", [
    ("nonsense:1", "filter[0] (metrics): listen: 'nonsense:1' is not a valid endpoint"),
    (9464, "filter[0] (metrics): listen must be a Twisted server endpoint string, not 9464"),
])
def test_bad_listen_option_is_a_usage_error(tmp_path, listen, message):
    """A ``listen`` option that is not an endpoint: exit 1 with the filter and option named, no traceback."""
    out = start_failure(tmp_path, proxy_config(filter=[{"use": "metrics", "listen": listen}]))
    output = out.stdout + out.stderr
    assert out.returncode == 1, output
    assert message in output
    assert "Traceback" not in output


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_port_in_use_stops_the_start(tmp_path, workers):
    """A metrics port already in use stops the start (exit 1, one line naming it), before any worker runs."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        listen = f"tcp:{port}:interface=127.0.0.1"
        out = start_failure(tmp_path, proxy_config(workers=workers, filter=[{"use": "metrics", "listen": listen}]))
    output = out.stdout + out.stderr
    assert out.returncode == 1, output
    assert f"proxyframe cannot listen on {listen} (metrics):" in output
    assert "Address already in use" in output
    assert "serving" not in output
    assert "Traceback" not in output


# -- the filter without sockets ----------------------------------------------------------

def exchange(method: bytes | None, status: int | None, sent: int = 0, received: int = 0,
             seconds: float = 0.01, error: str | None = None) -> Exchange:
    request = None if method is None else Request(method, b"http://example.test/", b"1.1", Headers())
    done = Exchange("127.0.0.1:5000", "127.0.0.1", request, 100.0)
    if status is not None:
        done.response = Response(status, b"", Headers())
    done.bytes_sent, done.bytes_received, done.ended, done.error = sent, received, 100.0 + seconds, error
    return done


def test_filter_counts_by_method_code_error_and_folds_unknown_methods():
    """
    Each exchange is one request by (method, code); unknown methods and
    unparsed heads count as ``other``, an exchange without a response as
    code ``none``; errors count by type; durations land in their bucket.
    """
    metrics = Metrics(LOCAL)
    verifyObject(IFilter, metrics)
    for done in (exchange(b"GET", 200, sent=10, seconds=0.003), exchange(b"GET", 200, sent=5, seconds=0.2),
                 exchange(b"PATCH", 204, received=7), exchange(b"X-MADE-UP", 405), exchange(b"Y-MADE-UP", 405),
                 exchange(None, 400, error="http_request_error"), exchange(b"GET", None, error="client_closed")):
        metrics.exchange_done(done)
    get = metrics.registry.get_sample_value
    assert get("proxyframe_requests_total", {"method": "GET", "code": "200"}) == 2
    assert get("proxyframe_requests_total", {"method": "PATCH", "code": "204"}) == 1
    assert get("proxyframe_requests_total", {"method": "other", "code": "405"}) == 2
    assert get("proxyframe_requests_total", {"method": "other", "code": "400"}) == 1
    assert get("proxyframe_requests_total", {"method": "GET", "code": "none"}) == 1
    assert get("proxyframe_errors_total", {"error": "http_request_error"}) == 1
    assert get("proxyframe_errors_total", {"error": "client_closed"}) == 1
    assert get("proxyframe_response_body_bytes_total") == 15
    assert get("proxyframe_request_body_bytes_total") == 7
    assert get("proxyframe_request_duration_seconds_count") == 7
    assert get("proxyframe_request_duration_seconds_bucket", {"le": "0.0025"}) == 0
    assert get("proxyframe_request_duration_seconds_bucket", {"le": "0.005"}) == 1
    assert get("proxyframe_request_duration_seconds_bucket", {"le": "0.1"}) == 6
    assert get("proxyframe_request_duration_seconds_bucket", {"le": "0.25"}) == 7
    assert len(DURATION_BUCKETS) == 16


def test_tunnel_counts_its_bytes_apart_and_stays_out_of_the_histogram():
    """A CONNECT answered 200 is a tunnel: its relayed bytes and count go to the tunnel metrics only; a refused one does not."""
    metrics = Metrics(LOCAL)
    metrics.exchange_done(exchange(b"CONNECT", 200, sent=4000, received=500, seconds=3600.0))
    metrics.exchange_done(exchange(b"CONNECT", 403, sent=40, error="http_request_denied"))
    get = metrics.registry.get_sample_value
    assert get("proxyframe_tunnels_total") == 1
    assert get("proxyframe_tunnel_sent_bytes_total") == 4000
    assert get("proxyframe_tunnel_received_bytes_total") == 500
    assert get("proxyframe_response_body_bytes_total") == 40
    assert get("proxyframe_request_duration_seconds_count") == 1
    assert get("proxyframe_requests_total", {"method": "CONNECT", "code": "200"}) == 1


def test_two_filters_in_one_process_keep_separate_counts():
    """Each filter has its own registry: building a second chain (as tests and the supervisor do) collides with nothing."""
    first, second = Metrics(LOCAL), Metrics(LOCAL)
    first.exchange_done(exchange(b"GET", 200))
    assert first.registry.get_sample_value("proxyframe_requests_total", {"method": "GET", "code": "200"}) == 1
    assert second.registry.get_sample_value("proxyframe_requests_total", {"method": "GET", "code": "200"}) is None


def test_build_checks_options_and_opens_nothing(tmp_path):
    """
    ``build`` parses ``listen`` without listening (every process builds the
    chain); the service finds the filter in the chain by name.  A second
    ``metrics`` entry and unknown options are config errors.
    """
    path = tmp_path / "m.toml"
    path.write_text(proxy_config(filter=[{"use": "metrics", "listen": "tcp:0:interface=127.0.0.1"}]))
    clock = Clock()
    chain = build_chain(load_config(str(path)), clock)
    found = metrics_filter(chain)
    assert isinstance(found, Metrics) and found.listen == "tcp:0:interface=127.0.0.1"
    assert metrics_filter(build_chain(load_config(None).replace(filters=()), clock)) is None
    path.write_text(proxy_config(filter=[{"use": "metrics"}, {"use": "metrics"}]))
    with pytest.raises(ConfigError, match=r"filter\[1\] \(metrics\): only one metrics filter"):
        build_chain(load_config(str(path)), clock)
    path.write_text(proxy_config(filter=[{"use": "metrics", "port": 9464}]))
    with pytest.raises(ConfigError, match=r"filter\[0\] \(metrics\): unknown option 'port'"):
        build_chain(load_config(str(path)), clock)
    path.write_text(proxy_config(filter=[{"use": "metrics"}]))
    assert metrics_filter(build_chain(load_config(str(path)), clock)).listen == "tcp:9464:interface=127.0.0.1"


class EnvClock(ProcessClock):
    """A ProcessClock that also keeps the environment of each spawn."""

    def __init__(self) -> None:
        super().__init__()
        self.envs: list = []

    def spawnProcess(self, protocol, executable, args, env, childFDs):
        self.envs.append(env)
        return super().spawnProcess(protocol, executable, args, env, childFDs)


def test_workers_get_the_metrics_directory_and_each_exit_is_reported():
    """
    Every worker, restarted ones too, is spawned with the supervisor's
    environment plus ``PROMETHEUS_MULTIPROC_DIR``; each exit is reported
    with the pid (for ``mark_process_dead``) before the restart.  Without
    extra variables the environment is the supervisor's own.
    """
    clock, dead = EnvClock(), []
    Workers(2, [[3], [4]], None, 10.0, clock, env={"PROMETHEUS_MULTIPROC_DIR": "/run/m"}, exited=dead.append).start()
    assert [env["PROMETHEUS_MULTIPROC_DIR"] for env in clock.envs] == ["/run/m", "/run/m"]
    assert {k: v for k, v in clock.envs[0].items() if k != "PROMETHEUS_MULTIPROC_DIR"} == \
        {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    end(clock, 0, ProcessTerminated(signal=9))
    assert dead == [1000]
    clock.advance(RESTART_DELAY)
    assert len(clock.envs) == 3 and clock.envs[2]["PROMETHEUS_MULTIPROC_DIR"] == "/run/m"

    plain = EnvClock()
    Workers(1, [[3]], None, 10.0, plain).start()
    assert plain.envs == [os.environ]


def test_label_values_stay_bounded_whatever_filters_set():
    """
    Past MAX_ERROR_TYPES distinct error types (MAX_CACHE_RESULTS cache
    results), new ones count as ``other``; a status outside 100-999 (a
    filter's own response) counts as code ``other``.  Every exchange is
    still counted.
    """
    from proxyframe.plugins.pf_metrics import MAX_CACHE_RESULTS, MAX_ERROR_TYPES

    metrics = Metrics(LOCAL)
    for i in range(MAX_ERROR_TYPES + 10):
        done = exchange(b"GET", 1234, error=f"made_up_{i}")
        done.notes["cache_status"] = f"TCP_MADE_UP_{i}"
        metrics.exchange_done(done)
    get = metrics.registry.get_sample_value
    assert get("proxyframe_requests_total", {"method": "GET", "code": "other"}) == MAX_ERROR_TYPES + 10
    assert get("proxyframe_errors_total", {"error": "other"}) == 10
    assert get("proxyframe_errors_total", {"error": "made_up_0"}) == 1
    assert get("proxyframe_cache_lookups_total", {"result": "other"}) == MAX_ERROR_TYPES + 10 - MAX_CACHE_RESULTS
    for name, label, limit in (("proxyframe_errors_total", "error", MAX_ERROR_TYPES),
                               ("proxyframe_cache_lookups_total", "result", MAX_CACHE_RESULTS)):
        labels = {s.labels[label] for family in metrics.registry.collect() for s in family.samples
                  if s.name == name}
        assert len(labels) == limit + 1
