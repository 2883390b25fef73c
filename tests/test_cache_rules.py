"""
The cache's decisions as pure functions (``pf_cache_rules``): header fields
and times in, decisions out; no sockets, no reactor.  What they mean on the
wire is tested in ``test_cache.py``.
"""

from __future__ import annotations

from email.utils import formatdate

import pytest

from proxyframe.exchange import Headers, Request
from proxyframe.plugins.pf_cache_rules import (
    USE,
    USE_AND_REVALIDATE,
    VALIDATE,
    Entry,
    byte_range,
    cache_key,
    freshness_lifetime,
    if_range_matches,
    initial_age,
    invalidated_keys,
    keep_for,
    not_modified,
    parse_directives,
    response_policy,
    reuse,
    stale_if_error,
    storable,
    stored_fields,
    updated_fields,
    variant_key,
    vary_names,
)

NOW = 1_800_000_000.0


def h(*pairs: tuple[str, str]) -> Headers:
    return Headers((n.encode(), v.encode()) for n, v in pairs)


def date(offset: float) -> str:
    return formatdate(NOW + offset, usegmt=True)


def entry(lifetime: float, directives: str = "", age: float = 0.0, fields=()) -> Entry:
    return Entry(200, b"OK", [(n.encode(), v.encode()) for n, v in fields], b"body", NOW, NOW, age, lifetime,
                 parse_directives(directives.encode())[0])


# -- directives -----------------------------------------------------------------

def test_directives_parse_tokens_and_quoted_strings():
    """RFC 9111 §5.2: names lowercased, quoted values unquoted, the first of a repeated directive counts."""
    directives, complete = parse_directives(b'Max-Age=60, no-cache="Set-Cookie, X-A", private, max-age=5')
    assert complete
    assert directives == {b"max-age": b"60", b"no-cache": b"Set-Cookie, X-A", b"private": None}


def test_directives_stop_at_a_fault():
    """A malformed list yields the directives before the fault and says it is incomplete."""
    directives, complete = parse_directives(b"max-age=60, =bad, public")
    assert directives == {b"max-age": b"60"} and not complete


def test_targeted_field_replaces_cache_control_and_expires():
    """RFC 9213 §2.1: a valid, non-empty targeted field wins; Expires no longer counts."""
    headers = h(("Cache-Control", "no-store"), ("CDN-Cache-Control", "max-age=30"), ("Expires", date(60)))
    assert response_policy(headers, b"cdn-cache-control") == ({b"max-age": b"30"}, False)
    assert response_policy(headers, None) == ({b"no-store": None}, True)
    invalid = h(("Cache-Control", "max-age=5"), ("CDN-Cache-Control", "max-age=30, ,"))
    assert response_policy(invalid, b"cdn-cache-control") == ({b"max-age": b"5"}, True)


# -- keys -----------------------------------------------------------------------

def request(target: bytes, host: str = "Example.COM", port: int = 80, path: bytes = b"/a?b=1") -> Request:
    r = Request(b"GET", target, b"1.1", Headers())
    r.scheme, r.host, r.port, r.path = b"http", host.lower(), port, path
    return r


def test_cache_key_is_the_normalized_target_uri():
    """RFC 9111 §2: scheme, lowercased host, port only when not the default, path and query."""
    assert cache_key(request(b"")) == "http://example.com/a?b=1"
    assert cache_key(request(b"", port=8080)) == "http://example.com:8080/a?b=1"
    assert cache_key(request(b"", host="::1", port=8080)) == "http://[::1]:8080/a?b=1"


def test_variant_key_normalizes_and_tells_absent_from_empty():
    """RFC 9111 §4.1: whitespace after commas does not matter; an absent field differs from an empty one."""
    names = vary_names(h(("Vary", "Accept-Encoding, accept-language"), ("Vary", "Accept-Encoding")))
    assert names == (b"accept-encoding", b"accept-language")
    a = variant_key("k", names, h(("Accept-Encoding", "gzip,  br"), ("Accept-Language", "en")))
    b = variant_key("k", names, h(("accept-encoding", "gzip, br"), ("accept-language", "en")))
    assert a == b
    assert variant_key("k", names, h(("Accept-Language", "en"))) != \
        variant_key("k", names, h(("Accept-Encoding", ""), ("Accept-Language", "en")))
    assert vary_names(h(("Vary", "Accept, *"))) is None


# -- storing ------------------------------------------------------------------------

@pytest.mark.parametrize("status, request_fields, response_fields, expected", [
    (200, (), (("Cache-Control", "max-age=1"),), True),
    (200, (), (("Last-Modified", "x"),), True),
    (404, (), (), True),
    (302, (), (), False),
    (302, (), (("Cache-Control", "max-age=60"),), True),
    (206, (), (("Cache-Control", "max-age=60"),), False),
    (304, (), (("Cache-Control", "max-age=60"),), False),
    (200, (("Cache-Control", "no-store"),), (("Cache-Control", "max-age=60"),), False),
    (200, (), (("Cache-Control", "max-age=60, no-store"),), False),
    (200, (), (("Cache-Control", "private, max-age=60"),), False),
    (200, (), (("Cache-Control", 'private="X-A", max-age=60'),), True),
    (200, (("Authorization", "x"),), (("Cache-Control", "max-age=60"),), False),
    (200, (("Authorization", "x"),), (("Cache-Control", "s-maxage=60"),), True),
    (200, (("Authorization", "x"),), (("Cache-Control", "must-revalidate"),), True),
    (599, (), (("Cache-Control", "max-age=60, must-understand"),), False),
    (200, (), (("Cache-Control", "max-age=60"), ("Vary", "*")), False),
    (200, (), (("Set-Cookie", "a=1"),), False),
    (200, (), (("Set-Cookie", "a=1"), ("Cache-Control", "max-age=60")), True),
])
def test_storable(status, request_fields, response_fields, expected):
    """RFC 9111 §3, §3.5 and the cookie rule: which complete GET responses a shared cache may store."""
    request_headers, response_headers = h(*request_fields), h(*response_fields)
    directives, use_expires = response_policy(response_headers, None)
    request_cc = parse_directives(request_headers.get(b"cache-control"))[0]
    assert storable(status, request_headers, request_cc, response_headers, directives, use_expires) is expected


def test_stored_fields_drop_hop_by_hop_connection_named_and_private_named():
    """RFC 9111 §3.1, §5.2.2.7: connection-level fields and those a qualified private names are not stored."""
    headers = h(("Connection", "X-Hop"), ("X-Hop", "1"), ("Keep-Alive", "t"), ("X-User", "u"), ("ETag", '"e"'))
    directives = {b"private": b"X-User"}
    assert stored_fields(headers, directives) == [(b"ETag", b'"e"')]


def test_304_updates_stored_fields_except_framing():
    """RFC 9111 §3.2: a 304's fields replace the stored ones of the same name; Content-Length stays."""
    stored = [(b"ETag", b'"1"'), (b"Content-Length", b"4"), (b"X-A", b"old"), (b"X-A", b"older")]
    fresh = h(("X-A", "new"), ("Content-Length", "0"), ("Cache-Control", "max-age=9"))
    assert updated_fields(stored, fresh) == [(b"ETag", b'"1"'), (b"Content-Length", b"4"), (b"X-A", b"new"),
                                             (b"Cache-Control", b"max-age=9")]


# -- freshness ------------------------------------------------------------------------

def lifetime(status: int, *fields: tuple[str, str], fraction: float = 0.1, cap: float = 1e9) -> float:
    headers = h(*fields)
    directives, use_expires = response_policy(headers, None)
    return freshness_lifetime(status, headers, directives, use_expires, NOW, fraction, cap)


def test_freshness_lifetime_order():
    """RFC 9111 §4.2.1: s-maxage, then max-age, then Expires - Date; an invalid Expires is already expired."""
    assert lifetime(200, ("Cache-Control", "max-age=10, s-maxage=20")) == 20
    assert lifetime(200, ("Cache-Control", "max-age=10"), ("Expires", date(100)), ("Date", date(0))) == 10
    assert lifetime(200, ("Expires", date(100)), ("Date", date(40))) == 60
    assert lifetime(200, ("Expires", "0"), ("Last-Modified", date(-1000))) == 0
    assert lifetime(200, ("Cache-Control", "max-age=99999999999")) == 2 ** 31


def test_heuristic_freshness():
    """RFC 9111 §4.2.2: a fraction of the time since Last-Modified, for heuristically cacheable statuses."""
    assert lifetime(200, ("Last-Modified", date(-1000)), ("Date", date(0))) == pytest.approx(100)
    assert lifetime(200, ("Last-Modified", date(-1000)), ("Date", date(0)), cap=30) == 30
    assert lifetime(302, ("Last-Modified", date(-1000)), ("Date", date(0))) == 0
    assert lifetime(302, ("Last-Modified", date(-1000)), ("Date", date(0)),
                    ("Cache-Control", "public")) == pytest.approx(100)


def test_initial_age():
    """RFC 9111 §4.2.3: the larger of the apparent age and Age plus the response delay."""
    assert initial_age(h(("Date", date(-30))), NOW - 1, NOW) == pytest.approx(30)
    assert initial_age(h(("Age", "50"), ("Date", date(0))), NOW - 2, NOW) == pytest.approx(52)
    assert initial_age(h(), NOW, NOW) == 0


@pytest.mark.parametrize("request_cc, no_cache, directives, age, expected", [
    ("", False, "", 10, USE),
    ("", False, "", 70, VALIDATE),
    ("", True, "", 10, VALIDATE),
    ("", False, "no-cache", 10, VALIDATE),
    ("", False, 'no-cache="X-A"', 10, USE),
    ("max-age=5", False, "", 10, VALIDATE),
    ("min-fresh=55", False, "", 10, VALIDATE),
    ("max-stale", False, "", 1000, USE),
    ("max-stale=20", False, "", 70, USE),
    ("max-stale=5", False, "", 70, VALIDATE),
    ("max-stale", False, "must-revalidate", 70, VALIDATE),
    ("max-stale", False, "proxy-revalidate", 70, VALIDATE),
    ("", False, "stale-while-revalidate=30", 80, USE_AND_REVALIDATE),
    ("", False, "stale-while-revalidate=30", 100, VALIDATE),
    ("", False, "stale-while-revalidate=30, must-revalidate", 80, VALIDATE),
])
def test_reuse(request_cc, no_cache, directives, age, expected):
    """RFC 9111 §4, §4.2.4, §5.2; RFC 5861 §3: whether a stored response (lifetime 60 s) may answer."""
    request = parse_directives(request_cc.encode())[0]
    assert reuse(request, no_cache, entry(60, directives), age) == expected


def test_stale_if_error_windows():
    """RFC 5861 §4: the response's or the request's window; never with must-revalidate."""
    assert stale_if_error({}, entry(60, "stale-if-error=30"), 80)
    assert not stale_if_error({}, entry(60, "stale-if-error=30"), 100)
    assert stale_if_error({b"stale-if-error": b"100"}, entry(60), 100)
    assert not stale_if_error({}, entry(60), 61)
    assert not stale_if_error({}, entry(60, "stale-if-error=30, must-revalidate"), 70)


def test_keep_for():
    """Remaining freshness, plus the longest stale window, plus keep_stale for a response with a validator."""
    assert keep_for(entry(60, age=10), 1000) == 50
    assert keep_for(entry(60, "stale-if-error=30", age=10), 1000) == 80
    assert keep_for(entry(60, age=10, fields=[("ETag", '"x"')]), 1000) == 1050


# -- conditionals and ranges ------------------------------------------------------------

@pytest.mark.parametrize("request_fields, expected", [
    ((("If-None-Match", '"a"'),), True),
    ((("If-None-Match", 'W/"a"'),), True),
    ((("If-None-Match", '"b", "a"'),), True),
    ((("If-None-Match", "*"),), True),
    ((("If-None-Match", '"b"'),), False),
    ((("If-None-Match", '"b"'), ("If-Modified-Since", date(0))), False),
    ((("If-Modified-Since", date(0)),), True),
    ((("If-Modified-Since", date(-200)),), False),
    ((("If-Modified-Since", "yesterday"),), False),
])
def test_not_modified(request_fields, expected):
    """RFC 9110 §13.2.2: If-None-Match by weak comparison first; If-Modified-Since only without it."""
    stored = h(("ETag", '"a"'), ("Last-Modified", date(-100)))
    assert not_modified(h(*request_fields), stored) is expected


@pytest.mark.parametrize("value, expected", [
    (b"bytes=0-0", (0, 0)),
    (b"bytes=2-5", (2, 5)),
    (b"bytes=5-", (5, 9)),
    (b"bytes=-3", (7, 9)),
    (b"bytes=-30", (0, 9)),
    (b"bytes=8-30", (8, 9)),
    (b"bytes=10-", False),
    (b"bytes=-0", False),
    (b"bytes=5-2", None),
    (b"bytes=1-2,4-5", None),
    (b"items=1-2", None),
    (b"bytes=-", None),
])
def test_byte_range(value, expected):
    """RFC 9110 §14.1.2: one satisfiable range of a 10-byte body, 416 (False), or ignored (None)."""
    assert byte_range(value, 10) == expected


def test_if_range():
    """RFC 9110 §13.1.5: a strong entity-tag match or the exact Last-Modified date."""
    stored = h(("ETag", '"a"'), ("Last-Modified", date(-100)))
    assert if_range_matches(b'"a"', stored)
    assert not if_range_matches(b'W/"a"', stored)
    assert not if_range_matches(b'"b"', stored)
    assert if_range_matches(date(-100).encode(), stored)
    assert not if_range_matches(date(-50).encode(), stored)


def test_invalidated_keys_same_origin_only():
    """RFC 9111 §4.4: the target, and Location/Content-Location of the same origin only."""
    r = request(b"", path=b"/form")
    headers = h(("Location", "/done?x=1"), ("Content-Location", "http://other.example/form"))
    assert invalidated_keys(r, headers) == ["http://example.com/form", "http://example.com/done?x=1"]
    headers = h(("Location", "HTTP://EXAMPLE.com:80/b#frag"), ("Content-Location", "http://example.com:81/c"))
    assert invalidated_keys(r, headers) == ["http://example.com/form", "http://example.com/b"]
