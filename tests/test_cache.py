"""
The ``cache`` filter through real sockets: a scripted origin that counts
what it receives (a hit must not reach it), the real ``twistd proxyframe``,
and http.client as the client.  Staleness is made without waiting: the
origin sends ``Age`` (or an old ``Date``) so that a response is stale the
moment it is stored.

Backend-specific behaviour (restart, sharing, outages) is in
``test_cache_backends.py``; the decisions as pure functions are in
``test_cache_rules.py``.
"""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from cachetools import Route, Script, fetch, http_date
from flowtools import MIB, RssSampler
from support import body_bytes, wait_until


@pytest.fixture
def script(origin):
    handler = Script()
    origin.handler = handler
    return handler


@pytest.fixture
def start_cache(start_proxy):
    """``start_cache(**options)``: a proxy whose chain is the access log, then the cache."""
    def start(**options):
        return start_proxy(filter=[{"use": "accesslog"}, {"use": "cache", **options}])
    return start


@pytest.fixture
def cache(start_cache):
    return start_cache()


def log_codes(proxy, count: int) -> list[str]:
    """The result codes of the first *count* access log lines (written by a thread: waited for)."""
    wait_until(lambda: len(proxy.access_lines()) >= count, what=f"{count} access log lines")
    return [line.split()[3] for line in proxy.access_lines()[:count]]


def fresh(seconds: int = 60, *more: tuple[str, str]) -> list[tuple[str, str]]:
    return [("Cache-Control", f"max-age={seconds}"), *more]


# -- storing and hits ---------------------------------------------------------------

def test_hit_is_served_without_the_origin(cache, origin, script):
    """A fresh stored response answers later requests: the origin sees one request, the bodies match."""
    body = body_bytes(100_000, seed=3)
    script.routes["/a"] = Route(fields=fresh(60, ("ETag", '"v1"')), body=body)
    replies = [fetch(cache, origin.url("/a")) for _ in range(3)]
    assert script.count("/a") == 1
    assert all(r.status == 200 and r.body == body for r in replies)
    assert "fwd=uri-miss" in replies[0].cache_status() and "stored" in replies[0].cache_status()
    for hit in replies[1:]:
        assert hit.cache_status().startswith("proxyframe; hit; ttl=")
        assert f'key="http://127.0.0.1:{origin.port}/a"' in hit.cache_status()
        assert int(hit.header("age")) >= 0
        assert hit.header("etag") == '"v1"'
        assert hit.header("via") == "1.1 proxyframe"
    assert log_codes(cache, 3) == ["TCP_MISS/200", "TCP_HIT/200", "TCP_HIT/200"]


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_body_streams_while_it_is_stored(cache, origin, script, framing):
    """A 4 MiB chunked or close-delimited body is relayed and stored whole; the hit is byte-exact."""
    body = body_bytes(4 * MIB, seed=5)
    script.routes["/big"] = Route(fields=fresh(), body=body, framing=framing)
    first = fetch(cache, origin.url("/big"))
    second = fetch(cache, origin.url("/big"))
    assert hashlib.sha256(first.body).digest() == hashlib.sha256(body).digest()
    assert hashlib.sha256(second.body).digest() == hashlib.sha256(body).digest()
    assert second.header("content-length") == str(len(body))
    assert "hit" in second.cache_status()
    assert script.count("/big") == 1


def test_larger_than_object_limit_passes_through_unstored(start_cache, origin, script):
    """A body over max_object_bytes reaches the client intact and is not stored."""
    cache = start_cache(max_object_bytes=1 * MIB)
    body = body_bytes(3 * MIB, seed=7)
    script.routes["/length"] = Route(fields=fresh(), body=body)
    script.routes["/chunked"] = Route(fields=fresh(), body=body, framing="chunked")
    for target in ("/length", "/chunked"):
        for _ in range(2):
            reply = fetch(cache, origin.url(target))
            assert reply.body == body
            assert "stored" not in reply.cache_status()
        assert script.count(target) == 2


def test_large_response_over_the_limit_is_not_held_in_memory(start_cache, origin, script):
    """256 MiB over a 1 MiB object limit: the proxy's RSS grows by less than 48 MiB."""
    cache = start_cache(max_object_bytes=1 * MIB)
    size = 256 * MIB
    origin.handler = lambda conn, req: _stream_chunked(conn, size)
    with RssSampler(cache) as rss:
        reply = fetch(cache, origin.url("/huge"), timeout=120)
    assert len(reply.body) == size
    assert rss.growth < 48 * MIB, f"RSS grew by {rss.growth / MIB:.1f} MiB"


def _stream_chunked(conn, size: int) -> bool:
    conn.send(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"z" * 65536
    for _ in range(size // len(piece)):
        conn.send(b"10000\r\n" + piece + b"\r\n")
    conn.send(b"0\r\n\r\n")
    return True


@pytest.mark.parametrize("fields, request_fields", [
    (fresh(60, ("Cache-Control", "no-store")), {}),
    ([("Cache-Control", "private, max-age=60")], {}),
    (fresh(60, ("Vary", "*")), {}),
    ([("Cache-Control", "max-age=60")], {"Cache-Control": "no-store"}),
    ([("Cache-Control", "max-age=60")], {"Authorization": "Basic dTpw"}),
    ([("Last-Modified", http_date(-86400)), ("Set-Cookie", "session=1")], {}),
    ([], {}),
], ids=["no-store", "private", "vary-star", "request-no-store", "authorization", "heuristic-set-cookie",
        "no-freshness"])
def test_responses_a_shared_cache_must_not_store(cache, origin, script, fields, request_fields):
    """RFC 9111 §3: each of these responses reaches the origin every time."""
    script.routes["/p"] = Route(fields=fields, body=b"personal")
    for _ in range(2):
        reply = fetch(cache, origin.url("/p"), request_fields)
        assert reply.body == b"personal"
        assert "hit" not in reply.cache_status()
    assert script.count("/p") == 2


def test_authorization_allows_storing_when_public(cache, origin, script):
    """RFC 9111 §3.5: with Authorization, ``public`` (or s-maxage, must-revalidate) permits storing."""
    script.routes["/shared"] = Route(fields=[("Cache-Control", "public, max-age=60")])
    for _ in range(2):
        fetch(cache, origin.url("/shared"), {"Authorization": "Basic dTpw"})
    assert script.count("/shared") == 1


def test_partial_and_error_statuses(cache, origin, script):
    """A 206 is never stored; a 404 with max-age is (RFC 9111 §3, RFC 9110 §15.1)."""
    script.routes["/partial"] = Route(206, fresh(60, ("Content-Range", "bytes 0-4/10")))
    script.routes["/gone"] = Route(404, fresh(), b"gone")
    for _ in range(2):
        fetch(cache, origin.url("/partial"))
        assert fetch(cache, origin.url("/gone")).status == 404
    assert script.count("/partial") == 2
    assert script.count("/gone") == 1


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_truncated_response_is_not_stored(cache, origin, script, framing):
    """A response cut short by the origin is never stored (RFC 9111 §3.3)."""
    script.routes["/cut"] = Route(fields=fresh(), body=body_bytes(50_000), framing=framing, cut=20_000)
    for _ in range(2):
        try:
            fetch(cache, origin.url("/cut"))
        except Exception:
            pass
    assert script.count("/cut") == 2


# -- freshness -------------------------------------------------------------------------

def ttl_of(reply) -> int:
    for part in reply.cache_status().split(";"):
        name, _, value = part.strip().partition("=")
        if name == "ttl":
            return int(value)
    raise AssertionError(f"no ttl in {reply.cache_status()}")


@pytest.mark.parametrize("fields, low, high", [
    (lambda: [("Cache-Control", "max-age=10, s-maxage=500")], 490, 500),
    (lambda: [("Cache-Control", "max-age=300")], 290, 300),
    (lambda: [("Date", http_date()), ("Expires", http_date(200))], 185, 200),
    (lambda: [("Date", http_date()), ("Last-Modified", http_date(-10 * 86400))], 86390, 86400),
], ids=["s-maxage", "max-age", "expires", "heuristic-capped"])
def test_freshness_lifetime(cache, origin, script, fields, low, high):
    """RFC 9111 §4.2.1: s-maxage, then max-age, then Expires - Date, then the heuristic (capped at a day)."""
    script.routes["/f"] = Route(fields=fields())
    fetch(cache, origin.url("/f"))
    hit = fetch(cache, origin.url("/f"))
    assert "hit" in hit.cache_status()
    assert low <= ttl_of(hit) <= high
    assert script.count("/f") == 1


def test_heuristic_fraction_is_configurable(start_cache, origin, script):
    """RFC 9111 §4.2.2: 1 % of the 10 days since Last-Modified is 8640 s."""
    cache = start_cache(heuristic_fraction=0.01)
    script.routes["/h"] = Route(fields=[("Date", http_date()), ("Last-Modified", http_date(-10 * 86400))])
    fetch(cache, origin.url("/h"))
    assert 8630 <= ttl_of(fetch(cache, origin.url("/h"))) <= 8640


def test_age_counts_the_age_the_origin_reported(cache, origin, script):
    """RFC 9111 §4.2.3, §5.1: a hit's Age includes the upstream Age; the remaining ttl shrinks by it."""
    script.routes["/aged"] = Route(fields=fresh(100, ("Age", "40")))
    fetch(cache, origin.url("/aged"))
    hit = fetch(cache, origin.url("/aged"))
    assert 40 <= int(hit.header("age")) <= 45
    assert 55 <= ttl_of(hit) <= 60


def test_expired_response_without_validator_is_not_served(cache, origin, script):
    """A response already stale on arrival, with no validator, is fetched again."""
    script.routes["/old"] = Route(fields=fresh(10, ("Age", "20")))
    fetch(cache, origin.url("/old"))
    fetch(cache, origin.url("/old"))
    assert script.count("/old") == 2


# -- request directives -------------------------------------------------------------------

def stale_with_etag(extra: str = "") -> list[tuple[str, str]]:
    """Fields of a response that is stale on arrival and has a validator."""
    return [("Cache-Control", "max-age=10" + extra), ("Age", "20"), ("ETag", '"e1"')]


def not_modified_or(body: bytes, etag: str = '"e1"', fields=()):
    """A route answering 304 to a matching If-None-Match, else 200 with *body*."""
    def route(received):
        if received.header("if-none-match") == etag:
            return Route(304, [("ETag", etag), *fields])
        return Route(fields=[("ETag", etag), *fields], body=body)
    return route


@pytest.mark.parametrize("directive", ["no-cache", "max-age=0"])
def test_request_asking_for_validation_gets_a_conditional_upstream(cache, origin, script, directive):
    """RFC 9111 §5.2.1: no-cache and max-age=0 revalidate a fresh response; a 304 serves the stored body."""
    script.routes["/v"] = not_modified_or(b"stored body", fields=[("Cache-Control", "max-age=60")])
    fetch(cache, origin.url("/v"))
    reply = fetch(cache, origin.url("/v"), {"Cache-Control": directive})
    assert reply.status == 200 and reply.body == b"stored body"
    conditional = script.requests("/v")[1]
    assert conditional.header("if-none-match") == '"e1"'
    assert "fwd=request; fwd-status=304" in reply.cache_status()
    assert log_codes(cache, 2)[1] == "TCP_REFRESH_UNMODIFIED/200"


def test_pragma_no_cache_without_cache_control(cache, origin, script):
    """RFC 9111 §5.4: ``Pragma: no-cache`` alone asks for validation."""
    script.routes["/v"] = not_modified_or(b"body", fields=[("Cache-Control", "max-age=60")])
    fetch(cache, origin.url("/v"))
    fetch(cache, origin.url("/v"), {"Pragma": "no-cache"})
    assert script.count("/v") == 2


def test_max_stale_and_min_fresh(cache, origin, script):
    """RFC 9111 §5.2.1.2-3: max-stale accepts a stale response; min-fresh refuses one too close to stale."""
    script.routes["/s"] = Route(fields=stale_with_etag(), body=b"stale one")
    script.routes["/m"] = Route(fields=fresh(30), body=b"fresh one")
    fetch(cache, origin.url("/s"))
    assert fetch(cache, origin.url("/s"), {"Cache-Control": "max-stale=60"}).body == b"stale one"
    assert fetch(cache, origin.url("/s"), {"Cache-Control": "max-stale"}).body == b"stale one"
    assert script.count("/s") == 1
    fetch(cache, origin.url("/s"), {"Cache-Control": "max-stale=5"})
    assert script.count("/s") == 2
    fetch(cache, origin.url("/m"))
    assert "hit" in fetch(cache, origin.url("/m"), {"Cache-Control": "min-fresh=10"}).cache_status()
    fetch(cache, origin.url("/m"), {"Cache-Control": "min-fresh=50"})
    assert script.count("/m") == 2


def test_only_if_cached(cache, origin, script):
    """RFC 9111 §5.2.1.7: 504 when nothing usable is stored, never reaching the origin; else the hit."""
    script.routes["/o"] = Route(fields=fresh())
    miss = fetch(cache, origin.url("/o"), {"Cache-Control": "only-if-cached"})
    assert miss.status == 504
    assert "fwd=uri-miss" in miss.cache_status()
    assert script.count("/o") == 0
    fetch(cache, origin.url("/o"))
    hit = fetch(cache, origin.url("/o"), {"Cache-Control": "only-if-cached"})
    assert hit.status == 200 and "hit" in hit.cache_status()
    assert script.count("/o") == 1


# -- validation ----------------------------------------------------------------------------

def test_stale_response_is_revalidated_and_updated(cache, origin, script):
    """RFC 9111 §4.3: If-None-Match upstream; the 304's fields replace the stored ones; body from the cache."""
    body = body_bytes(30_000, seed=9)

    def route(received):
        if received.header("if-none-match") == '"e1"':
            return Route(304, [("ETag", '"e1"'), ("Cache-Control", "max-age=60"), ("X-Version", "2")])
        return Route(fields=stale_with_etag() + [("X-Version", "1")], body=body)

    script.routes["/r"] = route
    first = fetch(cache, origin.url("/r"))
    assert first.header("x-version") == "1"
    second = fetch(cache, origin.url("/r"))
    assert second.body == body and second.header("x-version") == "2"
    assert "fwd=stale; fwd-status=304" in second.cache_status()
    third = fetch(cache, origin.url("/r"))
    assert third.body == body and third.header("x-version") == "2"
    assert "hit" in third.cache_status()
    assert script.count("/r") == 2
    assert script.requests("/r")[1].header("if-none-match") == '"e1"'


def test_revalidation_with_last_modified(cache, origin, script):
    """Without an ETag the validator is If-Modified-Since with the stored Last-Modified."""
    modified = http_date(-3600)

    def route(received):
        if received.header("if-modified-since") == modified:
            return Route(304, [("Cache-Control", "max-age=60")])
        return Route(fields=[("Cache-Control", "max-age=1"), ("Age", "5"), ("Last-Modified", modified)])

    script.routes["/lm"] = route
    fetch(cache, origin.url("/lm"))
    reply = fetch(cache, origin.url("/lm"))
    assert reply.status == 200 and reply.body == b"hello"
    assert script.requests("/lm")[1].header("if-modified-since") == modified


def test_revalidation_answered_with_a_new_response(cache, origin, script):
    """A 200 to the conditional request replaces the stored response."""
    versions = iter([b"version one", b"version two"])
    script.routes["/n"] = lambda received: Route(fields=stale_with_etag(), body=next(versions))
    fetch(cache, origin.url("/n"))
    second = fetch(cache, origin.url("/n"))
    assert second.body == b"version two"
    assert log_codes(cache, 2)[1] == "TCP_REFRESH_MODIFIED/200"


def test_304_keeps_the_upstream_connection(cache, origin, script):
    """The 304 the cache turns into a full answer leaves the upstream connection reusable."""
    script.routes["/k"] = not_modified_or(b"body", fields=[("Cache-Control", "max-age=0")])
    for _ in range(3):
        assert fetch(cache, origin.url("/k")).body == b"body"
    assert script.count("/k") == 3
    assert origin.connections == 1


@pytest.mark.parametrize("request_fields, status", [
    ({"If-None-Match": '"e1"'}, 304),
    ({"If-None-Match": 'W/"e1", "other"'}, 304),
    ({"If-None-Match": '"other"'}, 200),
    ({"If-Modified-Since": http_date()}, 304),
    ({"If-Modified-Since": http_date(-7200)}, 200),
])
def test_client_preconditions_are_answered_from_the_cache(cache, origin, script, request_fields, status):
    """RFC 9110 §13.2.2: a client's If-None-Match (weak comparison) or If-Modified-Since against a fresh hit."""
    script.routes["/c"] = Route(fields=fresh(60, ("ETag", '"e1"'), ("Last-Modified", http_date(-3600))),
                                body=b"content")
    fetch(cache, origin.url("/c"))
    reply = fetch(cache, origin.url("/c"), request_fields)
    assert reply.status == status
    assert reply.body == (b"" if status == 304 else b"content")
    assert reply.header("etag") == '"e1"'
    assert script.count("/c") == 1


def test_client_precondition_evaluated_after_revalidation(cache, origin, script):
    """A stale entry revalidated for a client with its own If-None-Match: 304 to the client."""
    script.routes["/cv"] = not_modified_or(b"x", fields=[("Cache-Control", "max-age=10"), ("Age", "20")])
    fetch(cache, origin.url("/cv"))
    reply = fetch(cache, origin.url("/cv"), {"If-None-Match": '"e1"'})
    assert reply.status == 304
    assert script.count("/cv") == 2


# -- Vary ----------------------------------------------------------------------------------

def test_vary_stores_one_variant_per_request_value(cache, origin, script):
    """RFC 9111 §4.1: each Accept-Encoding value gets its own stored response."""
    script.routes["/var"] = lambda received: Route(
        fields=fresh(60, ("Vary", "Accept-Encoding")), body=(received.header("accept-encoding") or "none").encode())
    for value in ("gzip", "br", "gzip", "br"):
        assert fetch(cache, origin.url("/var"), {"Accept-Encoding": value}).body == value.encode()
    assert fetch(cache, origin.url("/var")).body == b"none"
    assert fetch(cache, origin.url("/var")).body == b"none"
    assert script.count("/var") == 3
    assert "fwd=vary-miss" in fetch(cache, origin.url("/var"), {"Accept-Encoding": "zstd"}).cache_status()


# -- invalidation ----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PURGE-IT"])
def test_unsafe_method_invalidates(cache, origin, script, method):
    """RFC 9111 §4.4: a non-error response to an unsafe (or unknown) method removes the target."""
    script.routes["/doc"] = Route(fields=fresh())
    fetch(cache, origin.url("/doc"))
    fetch(cache, origin.url("/doc"), method=method)
    fetch(cache, origin.url("/doc"))
    assert [r.method for r in script.requests("/doc")] == ["GET", method, "GET"]


def test_invalidation_covers_location_and_content_location(cache, origin, script):
    """RFC 9111 §4.4: Location and Content-Location of the same origin are invalidated too."""
    for target in ("/x", "/y", "/z"):
        script.routes[target] = Route(fields=fresh())
        fetch(cache, origin.url(target))
    script.routes["/form"] = Route(201, [("Location", "/x"), ("Content-Location", origin.url("/y"))])
    fetch(cache, origin.url("/form"), method="POST")
    for target in ("/x", "/y", "/z"):
        fetch(cache, origin.url(target))
    assert (script.count("/x"), script.count("/y"), script.count("/z")) == (2, 2, 1)


def test_error_response_does_not_invalidate(cache, origin, script):
    """An error status to an unsafe request leaves the stored response."""
    script.routes["/keep"] = lambda received: (Route(500, [("Cache-Control", "no-store")])
                                               if received.method == "POST" else Route(fields=fresh()))
    fetch(cache, origin.url("/keep"))
    fetch(cache, origin.url("/keep"), method="POST")
    fetch(cache, origin.url("/keep"))
    assert script.count("/keep") == 2


# -- response directives ------------------------------------------------------------------------

@pytest.mark.parametrize("directive", ["must-revalidate", "proxy-revalidate", "s-maxage=10"])
def test_stale_never_served_when_the_response_forbids_it(cache, origin, script, directive):
    """RFC 9111 §5.2.2.2, §5.2.2.8, §5.2.2.10: max-stale cannot override these."""
    script.routes["/mr"] = not_modified_or(b"x", fields=[("Cache-Control", f"max-age=10, {directive}"),
                                                         ("Age", "20")])
    fetch(cache, origin.url("/mr"))
    fetch(cache, origin.url("/mr"), {"Cache-Control": "max-stale=600"})
    assert script.count("/mr") == 2


def test_response_no_cache_always_validates(cache, origin, script):
    """RFC 9111 §5.2.2.4: unqualified no-cache is stored but validated on every use."""
    script.routes["/nc"] = not_modified_or(b"x", fields=[("Cache-Control", "no-cache, max-age=60")])
    for _ in range(3):
        assert fetch(cache, origin.url("/nc")).body == b"x"
    assert script.count("/nc") == 3
    assert all(r.header("if-none-match") == '"e1"' for r in script.requests("/nc")[1:])


def test_qualified_no_cache_hides_the_named_fields_on_hits(cache, origin, script):
    """RFC 9111 §5.2.2.4: no-cache="X-Secret" lets the rest be reused without validation."""
    script.routes["/q"] = Route(fields=[("Cache-Control", 'max-age=60, no-cache="X-Secret"'),
                                        ("X-Secret", "s3"), ("X-Public", "p")])
    assert fetch(cache, origin.url("/q")).header("x-secret") == "s3"
    hit = fetch(cache, origin.url("/q"))
    assert "hit" in hit.cache_status()
    assert hit.header("x-secret") is None and hit.header("x-public") == "p"
    assert script.count("/q") == 1


def test_qualified_private_stores_without_the_named_fields(cache, origin, script):
    """RFC 9111 §5.2.2.7: private="X-User" keeps the response, never the field."""
    script.routes["/pv"] = Route(fields=[("Cache-Control", 'max-age=60, private="X-User"'), ("X-User", "ann")])
    assert fetch(cache, origin.url("/pv")).header("x-user") == "ann"
    hit = fetch(cache, origin.url("/pv"))
    assert "hit" in hit.cache_status() and hit.header("x-user") is None


def test_stale_while_revalidate(cache, origin, script):
    """RFC 5861 §3: the stale response answers at once, and one background revalidation refreshes it."""
    versions = iter([b"v1", b"v2", b"v3"])
    script.routes["/swr"] = lambda received: Route(
        fields=[("Cache-Control", "max-age=1, stale-while-revalidate=60"), ("Age", "5"), ("ETag", '"s"')]
        if received.header("if-none-match") is None else [("Cache-Control", "max-age=60"), ("ETag", '"s2"')],
        body=next(versions))
    assert fetch(cache, origin.url("/swr")).body == b"v1"
    stale = fetch(cache, origin.url("/swr"))
    assert stale.body == b"v1"
    assert "hit" in stale.cache_status() and "fwd=stale" in stale.cache_status()
    wait_until(lambda: script.count("/swr") == 2, what="the background revalidation")
    assert script.requests("/swr")[1].header("if-none-match") == '"s"'

    def refreshed():
        reply = fetch(cache, origin.url("/swr"))
        return reply.body == b"v2" and "fwd=" not in reply.cache_status()
    wait_until(refreshed, what="the refreshed response to be served")
    assert script.count("/swr") == 2


def test_stale_if_error_on_an_error_status(cache, origin, script):
    """RFC 5861 §4: a 5xx from the origin is replaced by the stale response within the window."""
    statuses = iter([200, 500, 503])
    script.routes["/sie"] = lambda received: Route(
        next(statuses), [("Cache-Control", "max-age=1, stale-if-error=600"), ("Age", "5"), ("ETag", '"z"')],
        body=b"good")
    assert fetch(cache, origin.url("/sie")).body == b"good"
    for status in (500, 503):
        reply = fetch(cache, origin.url("/sie"))
        assert reply.status == 200 and reply.body == b"good"
        assert f"fwd-status={status}" in reply.cache_status()
    assert log_codes(cache, 3)[2] == "TCP_REFRESH_FAIL_OLD/200"


def test_stale_if_error_when_the_origin_is_down(cache, origin, script):
    """RFC 5861 §4: the proxy's own 502 (connection refused) is replaced by the stale response."""
    script.routes["/down"] = Route(fields=[("Cache-Control", "max-age=1, stale-if-error=600"), ("Age", "5")],
                                   body=b"still here")
    url = origin.url("/down")
    fetch(cache, url)
    origin.close()
    reply = fetch(cache, url)
    assert reply.status == 200 and reply.body == b"still here"
    assert "fwd-status=502" in reply.cache_status()


def test_stale_if_error_from_the_request(cache, origin, script):
    """RFC 5861 §4: the request's own stale-if-error counts too; without any, the error passes."""
    script.routes["/req"] = lambda received: Route(
        200, [("Cache-Control", "max-age=1"), ("Age", "5"), ("ETag", '"q"')], body=b"body"
    ) if script.count("/req") == 1 else Route(500, [("Cache-Control", "no-store")], b"broken")
    fetch(cache, origin.url("/req"))
    assert fetch(cache, origin.url("/req")).status == 500
    assert fetch(cache, origin.url("/req"), {"Cache-Control": "stale-if-error=600"}).status == 200


def test_targeted_field_overrides_cache_control(start_cache, origin, script):
    """RFC 9213: with targeted_field set, CDN-Cache-Control decides instead of Cache-Control."""
    script.routes["/cdn"] = Route(fields=[("Cache-Control", "no-store"), ("CDN-Cache-Control", "max-age=60")])
    plain = start_cache()
    fetch(plain, origin.url("/cdn"))
    fetch(plain, origin.url("/cdn"))
    assert script.count("/cdn") == 2
    targeted = start_cache(targeted_field="CDN-Cache-Control")
    fetch(targeted, origin.url("/cdn"))
    hit = fetch(targeted, origin.url("/cdn"))
    assert "hit" in hit.cache_status()
    assert script.count("/cdn") == 3


def test_cache_status_on_every_handled_response(cache, origin, script):
    """RFC 9211: misses, uncacheable responses, HEAD and hits all carry Cache-Status."""
    script.routes["/cs"] = Route(fields=fresh())
    script.routes["/nocs"] = Route(fields=[("Cache-Control", "no-store")])
    assert "fwd=uri-miss; fwd-status=200; stored" in fetch(cache, origin.url("/cs")).cache_status()
    assert "fwd=uri-miss; fwd-status=200" in fetch(cache, origin.url("/nocs")).cache_status()
    assert "fwd=uri-miss" in fetch(cache, origin.url("/nothing"), method="HEAD").cache_status()
    assert "hit" in fetch(cache, origin.url("/cs")).cache_status()
    assert "cache-status" not in {n.lower() for n, _ in fetch(cache, origin.url("/cs"), method="POST").fields}


# -- collapsed forwarding -------------------------------------------------------------------

def concurrent_fetches(cache, url: str, count: int) -> tuple[list, list[threading.Thread]]:
    replies: list = []

    def run():
        replies.append(fetch(cache, url, timeout=30))
    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    return replies, threads


def first_then_others(cache, script, target: str, url: str, count: int) -> tuple[list, list, list]:
    """
    One request for *url*, then, once the origin has it (its route holds
    the body behind a gate), *count* more at once.

    :returns: the first's replies, the others' replies (filled as they
        end) and every thread.
    """
    first, first_threads = concurrent_fetches(cache, url, 1)
    wait_until(lambda: script.count(target) == 1, what="the first request")
    others, other_threads = concurrent_fetches(cache, url, count)
    return first, others, first_threads + other_threads


def test_concurrent_misses_make_one_upstream_request(cache, origin, script):
    """Collapsed forwarding: five clients wait for the one request in flight, then share its response."""
    gate = threading.Event()
    script.routes["/slow"] = Route(fields=fresh(), body=b"shared", gate=gate)
    leader, others, threads = first_then_others(cache, script, "/slow", origin.url("/slow"), 4)
    time.sleep(0.5)
    gate.set()
    for thread in threads:
        thread.join(30)
    assert [r.body for r in leader + others] == [b"shared"] * 5
    assert script.count("/slow") == 1


def test_waiters_are_released_when_the_response_is_uncacheable(cache, origin, script):
    """Collapsed forwarding never waits on an uncacheable response: the others go upstream at once."""
    gate = threading.Event()
    script.routes["/private"] = Route(fields=[("Cache-Control", "no-store")], body=b"mine", gate=gate)
    leader, others, threads = first_then_others(cache, script, "/private", origin.url("/private"), 3)
    # The first body is still held at the origin: the others must not wait for it.
    wait_until(lambda: script.count("/private") == 4, what="the others to reach the origin")
    gate.set()
    for thread in threads:
        thread.join(30)
    assert [r.body for r in leader + others] == [b"mine"] * 4


def test_collapsed_wait_is_bounded(start_cache, origin, script):
    """Past collapse_timeout a waiting request is forwarded on its own."""
    cache = start_cache(collapse_timeout=0.3)
    gate = threading.Event()
    script.routes["/stuck"] = Route(fields=fresh(), body=b"late", gate=gate)
    leader, others, threads = first_then_others(cache, script, "/stuck", origin.url("/stuck"), 2)
    wait_until(lambda: script.count("/stuck") == 3, what="the waiters to give up waiting")
    gate.set()
    for thread in threads:
        thread.join(30)
    assert [r.body for r in leader + others] == [b"late"] * 3


# -- HEAD and ranges -------------------------------------------------------------------------

def test_head_is_answered_from_a_stored_get(cache, origin, script):
    """RFC 9110 §9.3.2: the stored GET response's head answers HEAD."""
    script.routes["/hd"] = Route(fields=fresh(), body=b"0123456789")
    fetch(cache, origin.url("/hd"))
    head = fetch(cache, origin.url("/hd"), method="HEAD")
    assert head.status == 200 and head.body == b""
    assert head.header("content-length") == "10"
    assert "hit" in head.cache_status()
    assert script.count("/hd") == 1


@pytest.mark.parametrize("range_value, status, body, content_range", [
    ("bytes=2-5", 206, b"2345", "bytes 2-5/10"),
    ("bytes=7-", 206, b"789", "bytes 7-9/10"),
    ("bytes=-3", 206, b"789", "bytes 7-9/10"),
    ("bytes=8-100", 206, b"89", "bytes 8-9/10"),
    ("bytes=10-", 416, b"", "bytes */10"),
    ("bytes=0-1,4-5", 200, b"0123456789", None),
    ("lines=1-2", 200, b"0123456789", None),
])
def test_range_served_from_a_stored_response(cache, origin, script, range_value, status, body, content_range):
    """RFC 9110 §14: one byte range from the stored body; multiple or other units get the whole 200."""
    script.routes["/rg"] = Route(fields=fresh(60, ("ETag", '"r"')), body=b"0123456789")
    fetch(cache, origin.url("/rg"))
    reply = fetch(cache, origin.url("/rg"), {"Range": range_value})
    assert (reply.status, reply.body, reply.header("content-range")) == (status, body, content_range)
    assert script.count("/rg") == 1


def test_if_range_mismatch_gets_the_whole_response(cache, origin, script):
    """RFC 9110 §13.1.5: If-Range that does not match means the whole 200; a match means 206."""
    script.routes["/ir"] = Route(fields=fresh(60, ("ETag", '"r"')), body=b"0123456789")
    fetch(cache, origin.url("/ir"))
    assert fetch(cache, origin.url("/ir"), {"Range": "bytes=0-1", "If-Range": '"other"'}).status == 200
    assert fetch(cache, origin.url("/ir"), {"Range": "bytes=0-1", "If-Range": '"r"'}).body == b"01"


def test_range_on_a_miss_passes_through(cache, origin, script):
    """A Range request that misses is forwarded as is, and its 206 is not stored."""
    script.routes["/rm"] = lambda received: Route(
        206, fresh(60, ("Content-Range", "bytes 0-1/10")), b"01") if received.header("range") else Route(
        fields=fresh(), body=b"0123456789")
    assert fetch(cache, origin.url("/rm"), {"Range": "bytes=0-1"}).status == 206
    assert script.requests("/rm")[0].header("range") == "bytes=0-1"
    assert fetch(cache, origin.url("/rm")).body == b"0123456789"
    assert script.count("/rm") == 2


# -- configuration -------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"store": "tape"}, "store: 'tape' is not one of memory, disk, redis"),
    ({"max_bytes": 0}, "max_bytes must be an integer of bytes >= 1"),
    ({"heuristic_fraction": 2}, "heuristic_fraction must be between 0 and 1"),
    ({"store": "disk"}, "path must name the cache directory"),
    ({"color": "red"}, "unknown option 'color'"),
    ({"targeted_field": "a b"}, "targeted_field must be a field name"),
])
def test_bad_options_stop_the_start(start_cache, options, message):
    """A wrong option stops the proxy at start with the filter's name and the option."""
    with pytest.raises(RuntimeError) as failure:
        start_cache(**options)
    assert "(cache)" in str(failure.value) and message in str(failure.value)


def test_counters_are_logged(start_cache, origin, script):
    """Lookups by result code and the store's counters reach the log every stats_interval seconds."""
    cache = start_cache(stats_interval=0.2, max_bytes=300_000)
    for target in ("/one", "/two", "/three"):
        script.routes[target] = Route(fields=fresh(), body=body_bytes(120_000))
    for target in ("/one", "/one", "/one", "/two", "/three"):
        fetch(cache, origin.url(target))
    line = cache.wait_for_line(r"cache: 5 lookups")
    assert "40.0% answered from the cache (TCP_HIT=2 TCP_MISS=3)" in line
    assert "entries=2" in line and "evictions=1" in line and "stored=3" in line
