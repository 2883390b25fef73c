"""
The ``cache`` filter over each store, through real sockets: what the
backend changes for a user.  The disk store survives a restart, the Redis
store is shared by several proxies and lets the proxy serve (as misses)
while Redis is down.  The stores on their own are tested in
``test_cache_stores.py``.

The disk and Redis stores write after the response went out, so a test
waits for an entry with ``only-if-cached`` requests (which never reach
the origin) before it counts on a hit.
"""

from __future__ import annotations

import pytest

from cachetools import Route, Script, fetch
from support import body_bytes, wait_until


@pytest.fixture
def script(origin):
    handler = Script()
    origin.handler = handler
    return handler


def cache_proxy(start_proxy, **options):
    return start_proxy(filter=[{"use": "accesslog"}, {"use": "cache", **options}])


def stored(proxy, url: str) -> bool:
    """Whether *proxy* answers *url* from its cache (without asking the origin)."""
    return fetch(proxy, url, {"Cache-Control": "only-if-cached, max-stale"}).status != 504


def redis_clients(server) -> int:
    raw = server.raw()
    try:
        info = raw.command("INFO", "clients").decode()
    finally:
        raw.close()
    return int(info.split("connected_clients:")[1].split()[0])


def redis_options(server, prefix: str = "pf:") -> dict:
    return {"store": "redis", "redis_url": f"redis://127.0.0.1:{server.port}/0", "redis_prefix": prefix,
            "redis_timeout": 0.5}


@pytest.fixture(params=["memory", "disk", "redis"])
def any_store(request, start_proxy, start_redis, tmp_path):
    """A caching proxy over each store, ready to store."""
    if request.param == "memory":
        return cache_proxy(start_proxy)
    if request.param == "disk":
        return cache_proxy(start_proxy, store="disk", path=str(tmp_path / "disk-cache"))
    server = start_redis()
    proxy = cache_proxy(start_proxy, **redis_options(server))
    wait_until(lambda: redis_clients(server) >= 3, what="the proxy's connections to Redis")
    return proxy


def test_each_store_serves_hits_variants_and_revalidations(any_store, origin, script):
    """Stored responses, variants (Vary) and 304 updates round-trip through every store byte for byte."""
    body = body_bytes(200_000, seed=4)
    script.routes["/doc"] = lambda received: (
        Route(304, [("ETag", '"d"'), ("Cache-Control", "max-age=60"), ("X-Rev", "2")])
        if received.header("if-none-match") == '"d"' else
        Route(fields=[("Cache-Control", "max-age=10"), ("Age", "20"), ("ETag", '"d"'), ("X-Rev", "1")], body=body))
    script.routes["/lang"] = lambda received: Route(
        fields=[("Cache-Control", "max-age=60"), ("Vary", "Accept-Language")],
        body=(received.header("accept-language") or "-").encode())
    url = origin.url("/doc")
    assert fetch(any_store, url).body == body
    wait_until(lambda: stored(any_store, url), what="the response to be stored")
    revalidated = fetch(any_store, url)
    assert revalidated.body == body and revalidated.header("x-rev") == "2"
    assert "fwd-status=304" in revalidated.cache_status()

    # only-if-cached is answered only by a fresh entry, so the stale one
    # (stored before the 304) gets 504 until the update is stored.
    wait_until(lambda: fetch(any_store, url, {"Cache-Control": "only-if-cached"}).status == 200,
               what="the updated response to be stored")
    hit = fetch(any_store, url)
    assert "fwd=" not in hit.cache_status() and hit.body == body and hit.header("x-rev") == "2"
    assert script.count("/doc") == 2

    lang = origin.url("/lang")
    for value in ("fr", "de"):
        assert fetch(any_store, lang, {"Accept-Language": value}).body == value.encode()
        wait_until(lambda: fetch(any_store, lang, {"Accept-Language": value,
                                                   "Cache-Control": "only-if-cached"}).status == 200,
                   what=f"the {value} variant to be stored")
    for value in ("fr", "de"):
        assert fetch(any_store, lang, {"Accept-Language": value}).body == value.encode()
    assert script.count("/lang") == 2


def test_disk_cache_survives_a_restart(start_proxy, origin, script, tmp_path):
    """A response stored on disk by one proxy process is a hit for the next one on the same directory."""
    body = body_bytes(100_000, seed=8)
    script.routes["/keep"] = Route(fields=[("Cache-Control", "max-age=600")], body=body)
    options = {"store": "disk", "path": str(tmp_path / "disk-cache")}
    first = cache_proxy(start_proxy, **options)
    fetch(first, origin.url("/keep"))
    wait_until(lambda: stored(first, origin.url("/keep")), what="the response to be stored")
    first.stop()
    assert "Server Shut Down." in first.lines[-1]
    second = cache_proxy(start_proxy, **options)
    hit = fetch(second, origin.url("/keep"))
    assert hit.body == body and "hit" in hit.cache_status()
    assert script.count("/keep") == 1


def test_redis_cache_is_shared_between_proxies(start_proxy, start_redis, origin, script):
    """Two proxies (two nodes) on one Redis and prefix: what one stored, the other serves."""
    server = start_redis()
    script.routes["/shared"] = Route(fields=[("Cache-Control", "max-age=600")], body=b"from node one")
    one = cache_proxy(start_proxy, **redis_options(server))
    two = cache_proxy(start_proxy, **redis_options(server))
    wait_until(lambda: redis_clients(server) >= 5, what="both proxies' connections to Redis")
    fetch(one, origin.url("/shared"))
    wait_until(lambda: stored(two, origin.url("/shared")), what="node two to see the response")
    hit = fetch(two, origin.url("/shared"))
    assert hit.body == b"from node one" and "hit" in hit.cache_status()
    assert script.count("/shared") == 1
    other_prefix = cache_proxy(start_proxy, **redis_options(server, prefix="other:"))
    wait_until(lambda: redis_clients(server) >= 7, what="the third proxy's connections")
    assert not stored(other_prefix, origin.url("/shared"))


def test_proxy_serves_while_redis_is_down(start_proxy, start_redis, origin, script):
    """Redis down: requests are forwarded (misses), the outage is logged once; Redis back: hits again."""
    server = start_redis()
    script.routes["/up"] = Route(fields=[("Cache-Control", "max-age=600")], body=b"origin body")
    proxy = cache_proxy(start_proxy, **redis_options(server))
    wait_until(lambda: redis_clients(server) >= 3, what="the proxy's connections to Redis")
    server.stop()
    for _ in range(5):
        reply = fetch(proxy, origin.url("/up"), timeout=5)
        assert reply.status == 200 and reply.body == b"origin body"
    assert script.count("/up") == 5
    warnings = [line for line in proxy.lines if "cache redis store" in line]
    assert len(warnings) == 1, warnings
    assert "Traceback" not in "\n".join(proxy.lines)
    server.start()
    wait_until(lambda: redis_clients(server) >= 3, timeout=15, what="the proxy to reconnect")
    fetch(proxy, origin.url("/up"))
    wait_until(lambda: stored(proxy, origin.url("/up")), what="the response to be stored again")
    assert "hit" in fetch(proxy, origin.url("/up")).cache_status()
    assert script.count("/up") == 6
