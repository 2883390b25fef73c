"""
The decisions of a shared HTTP cache (RFC 9111), as pure functions of
header fields and times, and the values a cache store holds.

Nothing here does I/O or keeps state: the ``cache`` filter
(:mod:`proxyframe.plugins.pf_cache`) calls these, and every store backend
holds :class:`Entry` and :class:`VaryIndex` values.  Times are seconds
(``float``, the reactor's clock); header fields are
:class:`~proxyframe.exchange.Headers`.  A malformed directive counts as
absent, never as an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin, urlsplit

from proxyframe.exchange import Headers, Request

__all__ = ()

#: Methods a stored response may answer (RFC 9111 §4: HEAD from a stored
#: GET response, RFC 9110 §9.3.2).
LOOKUP_METHODS = frozenset({b"GET", b"HEAD"})
#: Safe methods (RFC 9110 §9.2.1); a response to any other method,
#: including unknown ones, invalidates (RFC 9111 §4.4).
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
#: Statuses that are heuristically cacheable (RFC 9110 §15.1); 206 is
#: left out because only complete responses are stored.
HEURISTIC_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
#: Statuses this cache understands (for ``must-understand``, RFC 9111 §5.2.2.3).
UNDERSTOOD_STATUSES = HEURISTIC_STATUSES | {302, 303, 307, 400, 403, 500, 502, 503, 504}
#: The largest delta-seconds value (RFC 9111 §1.2.2).
MAX_DELTA = 2 ** 31
#: Fields a cache does not store or update (RFC 9111 §3.1; RFC 9110 §7.6.1).
HOP_BY_HOP = frozenset({b"connection", b"proxy-connection", b"keep-alive", b"te", b"transfer-encoding",
                        b"upgrade", b"trailer", b"proxy-authenticate", b"proxy-authentication-info"})
#: Fields a 304 must not replace in a stored response (RFC 9111 §3.2).
_NOT_UPDATED = HOP_BY_HOP | {b"content-length", b"age", b"cache-status"}
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CONDITIONALS = (b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since", b"if-range")

# RFC 9110 §5.6.2 token and §5.6.4 quoted-string, in a cache directive (RFC 9111 §5.2).
_DIRECTIVE = re.compile(rb'\s*([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)\s*(?:=\s*([!#$%&\'*+\-.^_`|~0-9A-Za-z]+|"(?:[^"\\]|\\.)*"))?\s*(?:,|$)')


# -- the values a store holds ------------------------------------------------

@dataclass(eq=False, slots=True)
class Entry:
    """
    One stored response (RFC 9111 §3), with what was worked out when it
    was stored, so that a hit parses nothing.

    :ivar status: the status code.
    :ivar reason: the reason phrase.
    :ivar headers: the stored header fields (no hop-by-hop fields;
        ``Content-Length`` is the body's length).
    :ivar body: the whole body.
    :ivar request_time: when the request that got it was sent (§4.2.3),
        POSIX seconds.
    :ivar response_time: when the response was received (§4.2.3).
    :ivar initial_age: the corrected initial age, seconds (§4.2.3).
    :ivar lifetime: the freshness lifetime, seconds (§4.2.1).
    :ivar directives: the response's cache directives this cache obeys
        (from the targeted field, RFC 9213, else ``Cache-Control``), as
        :func:`cache_control` gives them.
    :ivar vary: the lowercased field names of its ``Vary`` (§4.1).
    """

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    request_time: float
    response_time: float
    initial_age: float
    lifetime: float
    directives: dict[bytes, bytes | None]
    vary: tuple[bytes, ...] = ()

    @property
    def size(self) -> int:
        """Bytes the entry holds (body and fields), for store limits."""
        return len(self.body) + sum(len(n) + len(v) + 4 for n, v in self.headers) + 256

    def age(self, now: float) -> float:
        """The current age at *now*, seconds (§4.2.3): initial age plus resident time."""
        return self.initial_age + max(0.0, now - self.response_time)

    def fields(self) -> Headers:
        """The stored fields as a fresh :class:`Headers` (the caller may change it)."""
        return Headers(self.headers)


@dataclass(eq=False, slots=True)
class VaryIndex:
    """
    What a store holds under a primary key whose responses vary: the field
    names that select the variant, each stored under :func:`variant_key`.
    """

    vary: tuple[bytes, ...] = ()

    @property
    def size(self) -> int:
        """Bytes the index holds, for store limits."""
        return 64 + sum(len(name) for name in self.vary)


# -- parsing ---------------------------------------------------------------------

def parse_directives(value: bytes | None) -> tuple[dict[bytes, bytes | None], bool]:
    """
    The directives of a ``Cache-Control``-style field value (RFC 9111
    §5.2; also the targeted fields of RFC 9213): lowercased names, values
    unquoted (``None`` for a directive without one).  When a directive
    repeats, the first one counts.

    :returns: the directives, and whether the whole value parsed (a value
        that does not yields only the directives before the fault).
    """
    directives: dict[bytes, bytes | None] = {}
    if not value:
        return directives, True
    pos = 0
    while pos < len(value):
        m = _DIRECTIVE.match(value, pos)
        if m is None or m.end() == pos:
            return directives, False
        name, arg = m[1].lower(), m[2]
        if arg is not None and arg[:1] == b'"':
            arg = re.sub(rb"\\(.)", rb"\1", arg[1:-1])
        directives.setdefault(name, arg)
        pos = m.end()
    return directives, True


def cache_control(headers: Headers) -> dict[bytes, bytes | None]:
    """The directives of a message's ``Cache-Control`` (see :func:`parse_directives`)."""
    return parse_directives(headers.get(b"cache-control"))[0]


def response_policy(headers: Headers, targeted: bytes | None) -> tuple[dict[bytes, bytes | None], bool]:
    """
    The response directives this cache obeys.  RFC 9213 §2.1: the first
    targeted field (*targeted*, e.g. ``CDN-Cache-Control``) with a valid,
    non-empty value replaces ``Cache-Control`` and ``Expires``.

    :returns: the directives, and whether ``Expires`` still counts.
    """
    if targeted is not None:
        directives, valid = parse_directives(headers.get(targeted))
        if valid and directives:
            return directives, False
    return cache_control(headers), True


def delta_seconds(value: bytes | None) -> int | None:
    """A delta-seconds value (RFC 9111 §1.2.2), capped at 2**31; ``None`` when absent or malformed."""
    if value is None or not value.isdigit():
        return None
    return min(int(value), MAX_DELTA)


def http_date(value: bytes | None) -> float | None:
    """An HTTP-date (RFC 9110 §5.6.7) as a POSIX time; ``None`` when absent or invalid."""
    if not value:
        return None
    try:
        return parsedate_to_datetime(value.decode("latin-1")).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def no_cache_requested(request_headers: Headers, directives: dict) -> bool:
    """
    Whether the request asks for validation: ``no-cache``, or ``Pragma:
    no-cache`` without ``Cache-Control`` (RFC 9111 §5.2.1.4, §5.4).
    """
    if b"no-cache" in directives:
        return True
    return b"cache-control" not in request_headers and b"no-cache" in (request_headers.get(b"pragma") or b"").lower()


def field_names(value: bytes | None) -> frozenset[bytes]:
    """The lowercased field names in a qualified ``no-cache`` or ``private`` (RFC 9111 §5.2.2.4, §5.2.2.7)."""
    if not value:
        return frozenset()
    return frozenset(n.strip().lower() for n in value.split(b",") if n.strip())


# -- keys (§2, §4.1) -------------------------------------------------------------

def cache_key(request: Request) -> str:
    """
    The primary cache key (RFC 9111 §2): the target URI, the same for GET
    and HEAD; the host lowercased, the default port left out.  Made from the
    request's target fields, so it works for any way the proxy was reached.
    """
    scheme = (request.scheme or b"http").decode("ascii").lower()
    return f"{scheme}://{request.authority.decode('ascii').lower()}{request.path.decode('latin-1')}"


def vary_names(response_headers: Headers) -> tuple[bytes, ...] | None:
    """The lowercased field names of ``Vary``, or ``None`` for ``Vary: *`` (never matches, §4.1)."""
    names: list[bytes] = []
    for value in response_headers.get_all(b"vary"):
        for name in value.split(b","):
            name = name.strip().lower()
            if name == b"*":
                return None
            if name and name not in names:
                names.append(name)
    return tuple(names)


def variant_key(primary: str, vary: tuple[bytes, ...], request_headers: Headers) -> str:
    """
    The key of the variant that *request_headers* select (§4.1): the
    primary key and each varying field's value, whitespace around commas
    normalized; an absent field differs from an empty one.
    """
    parts = [primary]
    for name in vary:
        values = request_headers.get_all(name)
        if not values:
            parts.append("\0")
        else:
            joined = b",".join(values)
            parts.append(b",".join(v.strip() for v in joined.split(b",")).decode("latin-1"))
    return "\n".join(parts)


# -- storing (§3) ------------------------------------------------------------------

def storable(status: int, request_headers: Headers, request_cc: dict, response_headers: Headers,
             directives: dict, use_expires: bool) -> bool:
    """
    Whether this shared cache may store a complete response to a GET (RFC
    9111 §3): a final status, not 206 or 304; ``must-understand`` only
    with a status this cache understands; no ``no-store`` in request or
    response; no unqualified ``private``; with ``Authorization`` only when
    ``public``, ``s-maxage`` or ``must-revalidate`` allow it (§3.5); not
    ``Vary: *``; and something that makes it reusable: ``public``,
    ``max-age``, ``s-maxage``, ``Expires``, or a heuristically cacheable
    status (RFC 9110 §15.1).  One rule of this cache's own: a response that
    sets a cookie is stored only with explicit freshness, never by
    heuristic, so that one user's cookie is not handed to another by guess.

    :param directives: the response's, from :func:`response_policy`.
    """
    if status < 200 or status in (206, 304):
        return False
    if b"no-store" in directives or b"no-store" in request_cc:
        return False
    if b"must-understand" in directives and status not in UNDERSTOOD_STATUSES:
        return False
    if b"private" in directives and directives[b"private"] is None:
        return False
    if b"authorization" in request_headers and not (
            b"public" in directives or b"must-revalidate" in directives or b"s-maxage" in directives):
        return False
    if vary_names(response_headers) is None:
        return False
    explicit = (delta_seconds(directives.get(b"max-age")) is not None
                or delta_seconds(directives.get(b"s-maxage")) is not None
                or (use_expires and b"expires" in response_headers))
    if explicit:
        return True
    if b"set-cookie" in response_headers:
        return False
    return b"public" in directives or status in HEURISTIC_STATUSES


def stored_fields(response_headers: Headers, directives: dict) -> list[tuple[bytes, bytes]]:
    """
    The fields to store (§3.1): all but hop-by-hop ones, those
    ``Connection`` names, and those a qualified ``private`` names
    (§5.2.2.7).
    """
    named = {t.strip().lower() for v in response_headers.get_all(b"connection") for t in v.split(b",")}
    drop = HOP_BY_HOP | named | field_names(directives.get(b"private"))
    return [(n, v) for n, v in response_headers if n.lower() not in drop]


def updated_fields(stored: list[tuple[bytes, bytes]], fresh: Headers) -> list[tuple[bytes, bytes]]:
    """
    The stored fields updated from a 304 (RFC 9111 §3.2, §4.3.4): each field
    of *fresh* replaces the stored ones of that name, except hop-by-hop
    fields, ``Content-Length`` and ``Age``.
    """
    named = {t.strip().lower() for v in fresh.get_all(b"connection") for t in v.split(b",")}
    new = [(n, v) for n, v in fresh if n.lower() not in _NOT_UPDATED and n.lower() not in named]
    replaced = {n.lower() for n, _ in new}
    return [(n, v) for n, v in stored if n.lower() not in replaced] + new


# -- freshness (§4.2) -----------------------------------------------------------------

def freshness_lifetime(status: int, headers: Headers, directives: dict, use_expires: bool, response_time: float,
                       heuristic_fraction: float, heuristic_max: float) -> float:
    """
    The freshness lifetime in seconds (RFC 9111 §4.2.1) for a shared
    cache: ``s-maxage``, else ``max-age``, else ``Expires`` minus ``Date``
    (an invalid ``Expires`` means already expired, §5.3); without any, a
    heuristic (§4.2.2) of *heuristic_fraction* of the time since
    ``Last-Modified``, at most *heuristic_max*, for a heuristically
    cacheable status or a ``public`` response; else 0.  ``Date`` defaults
    to *response_time* when absent or invalid.
    """
    s_maxage = delta_seconds(directives.get(b"s-maxage"))
    if s_maxage is not None:
        return float(s_maxage)
    max_age = delta_seconds(directives.get(b"max-age"))
    if max_age is not None:
        return float(max_age)
    date = http_date(headers.get(b"date")) or response_time
    if use_expires and b"expires" in headers:
        expires = http_date(headers.get(b"expires"))
        return 0.0 if expires is None else max(0.0, expires - date)
    last_modified = http_date(headers.get(b"last-modified"))
    if last_modified is not None and (status in HEURISTIC_STATUSES or b"public" in directives):
        return min(heuristic_max, max(0.0, (date - last_modified) * heuristic_fraction))
    return 0.0


def initial_age(headers: Headers, request_time: float, response_time: float) -> float:
    """
    The corrected initial age (RFC 9111 §4.2.3): the larger of the apparent
    age (``response_time - Date``, at least 0) and ``Age`` plus the response
    delay (``response_time - request_time``).
    """
    age_value = delta_seconds(headers.get(b"age")) or 0
    date = http_date(headers.get(b"date"))
    apparent_age = 0.0 if date is None else max(0.0, response_time - date)
    return max(apparent_age, age_value + max(0.0, response_time - request_time))


#: What :func:`reuse` decides.
USE, USE_AND_REVALIDATE, VALIDATE = "use", "use-and-revalidate", "validate"


def never_stale(directives: dict) -> bool:
    """
    Whether a stale copy may never be served without validation, whatever
    the request allows: ``must-revalidate``, and for a shared cache
    ``proxy-revalidate`` and ``s-maxage`` (RFC 9111 §4.2.4, §5.2.2.2,
    §5.2.2.8, §5.2.2.10).
    """
    return b"must-revalidate" in directives or b"proxy-revalidate" in directives or b"s-maxage" in directives


def reuse(request_cc: dict, request_no_cache: bool, entry: Entry, age: float) -> str:
    """
    Whether *entry*, at *age* seconds, may answer a request (RFC 9111 §4,
    §4.2.4, §5.2.1; RFC 5861 §3):

    - :data:`VALIDATE` when the request says ``no-cache`` or the response
      says unqualified ``no-cache``; when the request's ``max-age`` or
      ``min-fresh`` is not met; when it is stale and nothing allows that;
    - :data:`USE` when it is fresh, or stale within the request's
      ``max-stale``;
    - :data:`USE_AND_REVALIDATE` when it is stale within the response's
      ``stale-while-revalidate``: serve it, and revalidate in the
      background.
    """
    directives = entry.directives
    if request_no_cache or (b"no-cache" in directives and directives[b"no-cache"] is None):
        return VALIDATE
    max_age = delta_seconds(request_cc.get(b"max-age"))
    if max_age is not None and age > max_age:
        return VALIDATE
    min_fresh = delta_seconds(request_cc.get(b"min-fresh"))
    if min_fresh is not None and entry.lifetime - age < min_fresh:
        return VALIDATE
    if entry.lifetime > age:
        return USE
    if never_stale(directives):
        return VALIDATE
    staleness = age - entry.lifetime
    if b"max-stale" in request_cc:
        limit = request_cc[b"max-stale"]
        if limit is None:
            return USE
        max_stale = delta_seconds(limit)
        if max_stale is not None and staleness <= max_stale:
            return USE
    swr = delta_seconds(directives.get(b"stale-while-revalidate"))
    if swr is not None and staleness <= swr:
        return USE_AND_REVALIDATE
    return VALIDATE


def stale_if_error(request_cc: dict, entry: Entry, age: float) -> bool:
    """
    Whether *entry* may answer in place of an error (RFC 5861 §4): a
    ``stale-if-error`` window in the response or the request that its
    staleness is within, unless the response forbids stale use
    (:func:`never_stale`).
    """
    if never_stale(entry.directives):
        return False
    windows = [delta_seconds(d.get(b"stale-if-error")) for d in (entry.directives, request_cc)]
    limit = max((w for w in windows if w is not None), default=None)
    return limit is not None and age - entry.lifetime <= limit


def keep_for(entry: Entry, keep_stale: float) -> float:
    """
    How long a store should keep *entry*, seconds: its remaining freshness,
    plus the longest stale window its directives grant, plus *keep_stale*
    when it has a validator (a stale entry is still worth revalidating).
    """
    directives = entry.directives
    windows = [delta_seconds(directives.get(n)) or 0 for n in (b"stale-while-revalidate", b"stale-if-error")]
    has_validator = any(n.lower() in (b"etag", b"last-modified") for n, _ in entry.headers)
    return entry.lifetime - entry.initial_age + max(windows) + (keep_stale if has_validator else 0.0)


# -- validation (§4.3) and conditional requests (RFC 9110 §13) -------------------------

def has_conditionals(request_headers: Headers) -> bool:
    """Whether the client sent precondition fields (RFC 9110 §13.1)."""
    return any(name in request_headers for name in _CONDITIONALS)


def validators(entry: Entry) -> list[tuple[bytes, bytes]]:
    """
    The preconditions that revalidate *entry* (RFC 9111 §4.3.1):
    ``If-None-Match`` from ``ETag``, ``If-Modified-Since`` from
    ``Last-Modified``.
    """
    headers = entry.fields()
    out = []
    etag = headers.get(b"etag")
    if etag is not None:
        out.append((b"If-None-Match", etag))
    last_modified = headers.get(b"last-modified")
    if last_modified is not None:
        out.append((b"If-Modified-Since", last_modified))
    return out


def _opaque(tag: bytes) -> bytes:
    tag = tag.strip()
    return tag[2:] if tag[:2] == b"W/" else tag


def not_modified(request_headers: Headers, stored: Headers) -> bool:
    """
    Whether a GET or HEAD's own preconditions, evaluated against a stored
    response, call for 304 (RFC 9110 §13.2.2, RFC 9111 §4.3.2):
    ``If-None-Match`` by weak comparison (``*`` matches), and only without
    it ``If-Modified-Since`` against ``Last-Modified`` (or ``Date``).
    """
    inm = request_headers.get(b"if-none-match")
    if inm is not None:
        etag = stored.get(b"etag")
        if inm.strip() == b"*":
            return True
        return etag is not None and _opaque(etag) in {_opaque(t) for t in inm.split(b",")}
    since = http_date(request_headers.get(b"if-modified-since"))
    if since is None:
        return False
    modified = http_date(stored.get(b"last-modified")) or http_date(stored.get(b"date"))
    return modified is not None and modified <= since


#: Fields a 304 made from a stored response carries (RFC 9110 §15.4.5).
NOT_MODIFIED_FIELDS = frozenset({b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary",
                                 b"last-modified"})


# -- ranges (RFC 9110 §14) ----------------------------------------------------------------

_RANGE = re.compile(rb"\s*bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*")


def byte_range(value: bytes, length: int) -> tuple[int, int] | None | bool:
    """
    The one byte range a ``Range`` value asks of a body of *length* bytes
    (RFC 9110 §14.1.2).

    :returns: ``(first, last)`` inclusive; ``False`` when the range is
        valid but not satisfiable (416); ``None`` when the value is not a
        single valid byte range (the field is then ignored, §14.2, and the
        whole body served).
    """
    m = _RANGE.fullmatch(value)
    if m is None or not (m[1] or m[2]):
        return None
    if not m[1]:
        suffix = int(m[2])
        if suffix == 0:
            return False
        return max(0, length - suffix), length - 1
    first = int(m[1])
    last = int(m[2]) if m[2] else length - 1
    if last < first and m[2]:
        return None
    if first >= length:
        return False
    return first, min(last, length - 1)


def if_range_matches(value: bytes, stored: Headers) -> bool:
    """
    Whether an ``If-Range`` precondition holds for the stored response
    (RFC 9110 §13.1.5): an entity-tag by strong comparison, or a date equal
    to ``Last-Modified``.
    """
    value = value.strip()
    if value[:1] == b'"' or value[:2] == b"W/":
        etag = stored.get(b"etag")
        return value[:1] == b'"' and etag is not None and etag.strip() == value
    last_modified = stored.get(b"last-modified")
    return last_modified is not None and http_date(value) is not None and http_date(value) == http_date(last_modified)


# -- invalidation (§4.4) -----------------------------------------------------------

def invalidated_keys(request: Request, response_headers: Headers) -> list[str]:
    """
    The keys an unsafe request with a non-error response invalidates (RFC
    9111 §4.4): its target URI, and the ``Location`` and
    ``Content-Location`` URIs when they have the same origin.
    """
    target = cache_key(request)
    keys = [target]
    origin = urlsplit(target)[:2]
    for name in (b"location", b"content-location"):
        value = response_headers.get(name)
        if not value:
            continue
        parts = urlsplit(urljoin(target, value.decode("latin-1").strip()))
        try:
            port = parts.port
        except ValueError:
            continue
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host if port in (None, _DEFAULT_PORTS.get(parts.scheme)) else f"{host}:{port}"
        if (parts.scheme, netloc) == origin:
            keys.append(f"{parts.scheme}://{netloc}{parts.path or '/'}" + (f"?{parts.query}" if parts.query else ""))
    return keys
