"""
The upstream connection pool: idle connections are reused, closed after
``timeouts.upstream_idle``, and bounded per origin and in all (RFC 9112
§9.3 persistence, with limits a proxy needs).
"""

from __future__ import annotations

import concurrent.futures
import http.client

from support import Origin, wait_until


def get(proxy, url: str) -> int:
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
    conn.request("GET", url)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status


def test_idle_upstream_connection_is_closed_after_timeout(start_proxy, origin):
    """An idle pooled connection is closed after upstream_idle; the next request opens a new one."""
    proxy = start_proxy(timeouts={"upstream_idle": 1.0})
    assert get(proxy, origin.url("/")) == 200
    assert origin.connections == 1
    wait_until(lambda: origin.open_connections == 0, timeout=5, what="the idle connection to close")
    assert get(proxy, origin.url("/")) == 200
    assert origin.connections == 2


def test_idle_connections_per_origin_are_bounded(start_proxy, origin):
    """Four concurrent exchanges need four connections; only max_idle_per_origin (2) stay open after."""
    proxy = start_proxy(upstream={"max_idle_per_origin": 2})
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda _: get(proxy, origin.url("/sleep/0.5")), range(4)))
    assert statuses == [200] * 4
    assert origin.connections == 4
    wait_until(lambda: origin.open_connections == 2, timeout=5, what="two idle connections left")
    # The two kept are reused: no new connection for two more requests.
    assert [get(proxy, origin.url("/")) for _ in range(2)] == [200, 200]
    assert origin.connections == 4


def test_idle_connections_in_all_are_bounded_oldest_first(start_proxy, origin):
    """With max_idle = 1, an idle connection to a second origin closes the older idle one."""
    other = Origin()
    try:
        proxy = start_proxy(upstream={"max_idle": 1})
        assert get(proxy, origin.url("/")) == 200
        assert origin.open_connections == 1
        assert get(proxy, other.url("/")) == 200
        wait_until(lambda: origin.open_connections == 0, timeout=5, what="the oldest idle connection to close")
        assert other.open_connections == 1
    finally:
        other.close()


def closes_first_connection_on_second_request(origin) -> None:
    """The origin answers, keeps the connection, then drops it unanswered at the next request on it."""
    served: dict[int, int] = {}

    def handler(conn, req):
        served[conn.number] = served.get(conn.number, 0) + 1
        if conn.number == 1 and served[1] == 2:
            return False
        body = f"{req.method} on connection {conn.number}".encode()
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        return True

    origin.handler = handler


def test_reused_connection_closed_unanswered_is_retried_once_for_get(proxy, origin):
    """
    RFC 9112 §9.3.1: a GET sent on a reused connection that the origin
    closed without answering is retried once on a new connection.
    """
    closes_first_connection_on_second_request(origin)
    assert get(proxy, origin.url("/one")) == 200
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
    conn.request("GET", origin.url("/two"))
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, b"GET on connection 2")
    conn.close()
    assert [(r.target, r.connection) for r in origin.requests] == [("/one", 1), ("/two", 1), ("/two", 2)]


def test_request_with_body_is_not_retried(proxy, origin):
    """A POST with a body is never sent twice: the client gets 502 connection_terminated."""
    closes_first_connection_on_second_request(origin)
    assert get(proxy, origin.url("/one")) == 200
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
    conn.request("POST", origin.url("/two"), body=b"payload")
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 502
    assert "error=connection_terminated" in resp.getheader("Proxy-Status")
    assert [(r.method, r.connection) for r in origin.requests] == [("GET", 1), ("POST", 1)]
