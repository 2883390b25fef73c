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
