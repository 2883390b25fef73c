"""
``cache``: a shared HTTP cache (RFC 9111) in memory, on disk or in Redis::

    [[filter]]
    use = "cache"
    store = "memory"                 # "memory" (default), "disk", "redis"
    max_bytes = 268435456            # memory and disk: total bytes kept
    max_object_bytes = 8388608       # larger responses pass through unstored

Put it after the filters that decide who may use the proxy (``acl``,
``auth``), so that a hit is only served to a client they let through.

For a GET or HEAD the filter looks the target URI up (and, when stored
responses vary, the variant the request selects, §4.1).  A fresh stored
response answers at once (with ``Age``; ``304`` for a client's matching
precondition; ``206`` for a single byte range); a stale one is revalidated
with ``If-None-Match``/``If-Modified-Since``, served while revalidating in
the background within ``stale-while-revalidate``, or in place of an error
within ``stale-if-error`` (RFC 5861).  Concurrent misses for one key send
one request upstream; the others wait for its response (collapsed
forwarding).  A storable response is stored while it streams to the
client; one larger than ``max_object_bytes`` is only passed through.
Unsafe methods invalidate (§4.4).  Every response the cache handled
carries ``Cache-Status`` (RFC 9211) and leaves Squid's result code (e.g.
``TCP_HIT``) in ``exchange.notes["cache_status"]`` for the access log.

Nothing here assumes a forward proxy: keys and revalidation use the
request's target fields, whatever way the request reached the proxy.
The options are in ``docs/filters/cache.rst``.

Written only against the public contract, as any third party would.
"""

from __future__ import annotations

from collections import Counter
from email.utils import formatdate

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers as AgentHeaders
from zope.interface import implementer

from proxyframe.config import ConfigError
from proxyframe.exchange import Headers, Response
from proxyframe.filters import Filter, check_options, number_option
from proxyframe.interfaces import IFilterFactory
from proxyframe.plugins.pf_cache_rules import (
    HOP_BY_HOP,
    LOOKUP_METHODS,
    NOT_MODIFIED_FIELDS,
    SAFE_METHODS,
    USE,
    USE_AND_REVALIDATE,
    Entry,
    VaryIndex,
    byte_range,
    cache_control,
    cache_key,
    field_names,
    freshness_lifetime,
    has_conditionals,
    if_range_matches,
    initial_age,
    invalidated_keys,
    keep_for,
    no_cache_requested,
    not_modified,
    response_policy,
    reuse,
    stale_if_error,
    storable,
    stored_fields,
    updated_fields,
    validators,
    variant_key,
    vary_names,
)
from proxyframe.plugins.pf_cache_store import MemoryStore

__all__ = ()

_log = Logger(namespace="proxyframe.cache")

_OPTIONS = ("store", "max_bytes", "max_object_bytes", "heuristic_fraction", "heuristic_max", "keep_stale",
            "collapse_timeout", "targeted_field", "status_name", "stats_interval", "path", "redis_url",
            "redis_prefix", "redis_timeout")
_STORES = ("memory", "disk", "redis")
#: The key in ``exchange.notes`` for this filter's per-exchange state.
_NOTE = "cache"
#: The note of an unsafe request, whose non-error response invalidates.
_INVALIDATES = "invalidates"
#: Statuses in place of which a stale response may be served (RFC 5861 §4).
_ERROR_STATUSES = frozenset({500, 502, 503, 504})
#: Preconditions only the origin server can evaluate (RFC 9110 §13.1.1, §13.1.4).
_ORIGIN_PRECONDITIONS = frozenset({b"if-match", b"if-unmodified-since"})
#: The client's own preconditions the cache evaluates (RFC 9110 §13.2.2).
_ANSWERED_PRECONDITIONS = frozenset({b"if-none-match", b"if-modified-since"})
#: Request fields a cache revalidation sends in its own way, or not at all.
_NOT_FOR_VALIDATION = HOP_BY_HOP | {b"if-none-match", b"if-modified-since", b"range", b"if-range",
                                    b"proxy-authorization", b"host", b"content-length"}


class _State:
    """What the cache knows of one GET or HEAD exchange."""

    __slots__ = ("key", "variant", "request_cc", "no_cache", "request_time", "entry", "validating",
                 "client_preconditions", "answered", "leader", "waited", "fields", "directives", "use_expires",
                 "collect", "size", "forwarded", "squid_code")

    def __init__(self, key: str, request_cc: dict, no_cache: bool, request_time: float) -> None:
        self.key = key
        # The variant's key when stored responses vary, else the primary key.
        self.variant = key
        self.request_cc = request_cc
        self.no_cache = no_cache
        self.request_time = request_time
        # A stored response that may not be used as is (stale, or the
        # request wants validation): kept for a 304 or stale-if-error.
        self.entry: Entry | None = None
        self.validating = False
        # The client's If-None-Match/If-Modified-Since, replaced by the
        # cache's own validators while validating.
        self.client_preconditions: Headers | None = None
        self.answered = False
        self.leader = False
        self.waited = False
        # Set when the response is being stored: its fields and policy.
        self.fields: list[tuple[bytes, bytes]] | None = None
        self.directives: dict = {}
        self.use_expires = True
        self.collect: list[bytes] | None = None
        self.size = 0
        self.forwarded = b"miss"
        self.squid_code = "TCP_MISS"


class Cache(Filter):
    """
    The ``cache`` filter: answers from, and stores into, an
    :class:`~proxyframe.plugins.pf_cache_store.ICacheStore`.

    :param store: the backend.
    :param reactor: for the clock, timers and background revalidation.
    :param name: the cache's name in ``Cache-Status`` (RFC 9211 §2).
    :param max_object_bytes: responses with longer bodies are not stored.
    :param heuristic_fraction: the share of the time since
        ``Last-Modified`` used as a heuristic freshness lifetime (§4.2.2).
    :param heuristic_max: the longest heuristic lifetime, seconds.
    :param keep_stale: seconds a stale response with a validator is kept
        for revalidation.
    :param collapse_timeout: seconds a request waits for a concurrent
        miss on its key before it is forwarded itself.
    :param targeted_field: the lowercased RFC 9213 targeted field (e.g.
        ``b"cdn-cache-control"``) that overrides ``Cache-Control``, or
        ``None``.
    :param timeouts: the proxy's :class:`~proxyframe.config.Timeouts`
        (``connect`` and ``response`` bound background revalidations).
    :param via: the proxy's pseudonym in ``Via`` (RFC 9110 §7.6.3).
    :param stats_interval: seconds between two lines of counters in the
        log (:meth:`log_stats`); 0 for none.
    """

    def __init__(self, store, reactor, name: bytes, max_object_bytes: int, heuristic_fraction: float,
                 heuristic_max: float, keep_stale: float, collapse_timeout: float,
                 targeted_field: bytes | None, timeouts, via: bytes, stats_interval: float = 0.0) -> None:
        self.store = store
        self._reactor = reactor
        self._clock = reactor.seconds
        self._name = name
        self._max_object = max_object_bytes
        self._heuristic = (heuristic_fraction, heuristic_max)
        self._keep_stale = keep_stale
        self._collapse_timeout = collapse_timeout
        self._targeted = targeted_field
        self._timeouts = timeouts
        self._via = via
        # Primary key -> requests waiting for the miss in flight on it.
        self._in_flight: dict[str, list[Deferred]] = {}
        # Keys being revalidated in the background (stale-while-revalidate).
        self._refreshing: set[str] = set()
        self._agent: Agent | None = None
        #: Exchanges looked up, by Squid result code (``TCP_HIT``, ``TCP_MISS``, ...).
        self.counts: Counter[str] = Counter()
        self._logged_counts: Counter[str] = Counter()
        if stats_interval > 0:
            self._stats = LoopingCall(self.log_stats)
            self._stats.clock = reactor
            self._stats.start(stats_interval, now=False)

    def log_stats(self) -> None:
        """
        Log one line with the lookups by result code since the start and
        the store's counters (entries, bytes, evictions, errors), when
        anything changed since the last line.
        """
        if self.counts == self._logged_counts:
            return
        self._logged_counts = Counter(self.counts)
        lookups = sum(self.counts.values())
        hits = sum(n for code, n in self.counts.items() if "HIT" in code or code == "TCP_REFRESH_UNMODIFIED")
        _log.info("cache: {lookups} lookups, {hit_ratio:.1%} answered from the cache ({codes}); store: {store}",
                  lookups=lookups, hit_ratio=hits / lookups,
                  codes=" ".join(f"{code}={n}" for code, n in sorted(self.counts.items())),
                  store=" ".join(f"{name}={n}" for name, n in sorted(self.store.stats().items())))

    # -- request phase ---------------------------------------------------------------

    def request_received(self, exchange):
        request = exchange.request
        method = request.method
        if method not in LOOKUP_METHODS:
            if method not in SAFE_METHODS:
                exchange.notes[_NOTE] = _INVALIDATES
            return None
        request_cc = cache_control(request.headers)
        state = _State(cache_key(request), request_cc, no_cache_requested(request.headers, request_cc),
                       self._clock())
        exchange.notes[_NOTE] = state
        return self._look_up(exchange, state)

    def _look_up(self, exchange, state: _State):
        found = self.store.get(state.key)
        if isinstance(found, Deferred):
            return found.addCallback(self._found, exchange, state)
        return self._found(found, exchange, state)

    def _found(self, found, exchange, state: _State):
        if isinstance(found, VaryIndex):
            state.variant = variant_key(state.key, found.vary, exchange.request.headers)
            found = self.store.get(state.variant)
            if isinstance(found, Deferred):
                return found.addCallback(self._found_entry, exchange, state)
        return self._found_entry(found, exchange, state)

    def _found_entry(self, entry: Entry | None, exchange, state: _State):
        request = exchange.request
        only_if_cached = b"only-if-cached" in state.request_cc
        if entry is None:
            state.forwarded = b"vary-miss" if state.variant != state.key else b"uri-miss"
            if only_if_cached:
                return self._gateway_timeout(exchange, state)
            return self._miss(exchange, state)
        age = entry.age(self._clock())
        decision = reuse(state.request_cc, state.no_cache, entry, age)
        if request.headers.has_any(_ORIGIN_PRECONDITIONS):
            # Preconditions for the origin server to judge.
            decision, state.forwarded = None, b"request"
        if decision == USE:
            state.squid_code = "TCP_HIT"
            return self._answer(exchange, state, entry, age)
        if decision == USE_AND_REVALIDATE:
            self._refresh(exchange, state, entry)
            state.squid_code = "TCP_STALE_HIT"
            return self._answer(exchange, state, entry, age, b"; fwd=stale")
        if only_if_cached:
            return self._gateway_timeout(exchange, state)
        state.entry = entry
        if decision is not None:
            state.forwarded = b"stale" if age >= entry.lifetime or b"no-cache" in entry.directives else b"request"
        if request.method == b"GET" and b"range" not in request.headers:
            found_validators = validators(entry)
            if found_validators:
                headers = request.headers
                state.client_preconditions = Headers(
                    (n, v) for n, v in headers if n.lower() in (b"if-none-match", b"if-modified-since"))
                headers.remove(b"If-None-Match", b"If-Modified-Since")
                for name, value in found_validators:
                    headers.add(name, value)
                state.validating = True
        return None

    def _miss(self, exchange, state: _State):
        """
        Forward a miss; only one request per key at a time for plain GETs
        that could store a response, the others wait for it (collapsed
        forwarding) for at most ``collapse_timeout`` seconds.
        """
        request = exchange.request
        if (state.waited or request.method != b"GET" or b"range" in request.headers
                or has_conditionals(request.headers) or b"no-store" in state.request_cc):
            return None
        waiting = self._in_flight.get(state.key)
        if waiting is None:
            self._in_flight[state.key] = []
            state.leader = True
            return None
        state.waited = True
        d = Deferred()
        waiting.append(d)
        d.addTimeout(self._collapse_timeout, self._reactor, onTimeoutCancel=lambda result, timeout: None)
        d.addCallback(lambda _: self._look_up(exchange, state))
        return d

    def _release(self, state: _State) -> None:
        """The leader of a miss is done: the requests that waited look again."""
        if state.leader:
            state.leader = False
            for d in self._in_flight.pop(state.key, ()):
                if not d.called:
                    d.callback(None)

    def _gateway_timeout(self, exchange, state: _State) -> Response:
        """RFC 9111 §5.2.1.7: ``only-if-cached`` and nothing usable is stored."""
        state.answered = True
        response = Response.make(504, "504 Gateway Timeout: the response is not in the cache "
                                      "(the request said only-if-cached)\n")
        response.headers.add(b"Cache-Status", self._status(state, b"fwd=" + state.forwarded))
        return response

    # -- answering from a stored response --------------------------------------------

    def _answer(self, exchange, state: _State, entry: Entry, age: float, forwarded: bytes = b"",
                validated: bool = False) -> Response:
        """
        The response made from *entry* for this request: 304 when the
        client's own preconditions match (RFC 9110 §13.2.2), 206 or 416 for
        a single byte range of a 200 (§14), else the stored response.
        ``Age`` (RFC 9111 §5.1) and ``Cache-Status`` are added, and fields a
        qualified ``no-cache`` names are left out (§5.2.2.4).
        """
        state.answered = True
        request = exchange.request
        fields = entry.headers
        hidden = field_names(entry.directives.get(b"no-cache"))
        if hidden and not validated:
            fields = [(n, v) for n, v in fields if n.lower() not in hidden]
        preconditions = state.client_preconditions if state.client_preconditions is not None else request.headers
        status, reason, body = entry.status, entry.reason, entry.body
        if preconditions.has_any(_ANSWERED_PRECONDITIONS) and 200 <= entry.status < 300 \
                and not_modified(preconditions, entry.fields()):
            fields = [(n, v) for n, v in fields if n.lower() in NOT_MODIFIED_FIELDS]
            status, reason, body = 304, b"Not Modified", b""
            if state.squid_code == "TCP_HIT":
                state.squid_code = "TCP_INM_HIT" if b"if-none-match" in preconditions else "TCP_IMS_HIT"
        elif entry.status == 200 and b"range" in request.headers:
            fields, status, reason, body = self._range(request.headers, entry, fields)
        ttl = int(entry.lifetime - age)
        # Stored fields carry no Age (RFC 9111 §5.1: it is the age now).
        fields = fields + [(b"Age", b"%d" % age),
                           (b"Cache-Status", self._status(state, b"hit; ttl=%d%s" % (ttl, forwarded)))]
        return Response(status, reason, Headers(fields), body=body)

    @staticmethod
    def _range(request_headers: Headers, entry: Entry, fields: list) -> tuple:
        """A 206 or 416 for a single byte range, else the whole 200 (RFC 9110 §14.2, §15.3.7)."""
        whole = fields, 200, entry.reason, entry.body
        if_range = request_headers.get(b"if-range")
        if if_range is not None and not if_range_matches(if_range, entry.fields()):
            return whole
        length = len(entry.body)
        wanted = byte_range(request_headers.get(b"range"), length)
        if wanted is None:
            return whole
        others = [(n, v) for n, v in fields if n.lower() != b"content-length"]
        if wanted is False:
            return others + [(b"Content-Range", b"bytes */%d" % length), (b"Content-Length", b"0")], \
                416, b"Range Not Satisfiable", b""
        first, last = wanted
        return others + [(b"Content-Range", b"bytes %d-%d/%d" % (first, last, length)),
                         (b"Content-Length", b"%d" % (last - first + 1))], \
            206, b"Partial Content", entry.body[first:last + 1]

    def _status(self, state: _State, params: bytes) -> bytes:
        """A ``Cache-Status`` member (RFC 9211 §2): this cache's name, *params*, and the key."""
        key = state.variant.split("\n", 1)[0].encode("latin-1").replace(b"\\", b"\\\\").replace(b'"', b'\\"')
        return b'%s; %s; key="%s"' % (self._name, params, key)

    # -- response phase ----------------------------------------------------------------

    def response_received(self, exchange):
        state = exchange.notes.get(_NOTE)
        if state is None:
            return None
        response = exchange.response
        if state is _INVALIDATES:
            if response.status < 400:
                for key in invalidated_keys(exchange.request, response.headers):
                    self.store.delete(key)
            return None
        if state.answered:
            # The response this cache made (or one it let through unchanged).
            exchange.notes["cache_status"] = state.squid_code
            return None
        from_upstream = response.body is None
        entry = state.entry
        if entry is not None:
            if from_upstream and state.validating and response.status == 304:
                return self._revalidated(exchange, state, entry, response)
            if response.status in _ERROR_STATUSES and stale_if_error(state.request_cc, entry,
                                                                     entry.age(self._clock())):
                state.squid_code = "TCP_REFRESH_FAIL_OLD"
                answer = self._answer(exchange, state, entry, entry.age(self._clock()),
                                      b"; fwd=stale; fwd-status=%d" % response.status)
                exchange.notes["cache_status"] = state.squid_code
                return answer
            if state.validating:
                state.squid_code = "TCP_REFRESH_MODIFIED"
        params = b"fwd=%s; fwd-status=%d" % (state.forwarded, response.status)
        if from_upstream and exchange.request.method == b"GET" and self._start_storing(exchange, state):
            # Said only when the length is known to fit (RFC 9211 §2.6):
            # a body of unknown length may yet turn out too large.
            if b"content-length" in response.headers:
                params += b"; stored"
        else:
            self._release(state)
        response.headers.add(b"Cache-Status", self._status(state, params))
        exchange.notes["cache_status"] = state.squid_code
        return None

    def _start_storing(self, exchange, state: _State) -> bool:
        """Whether the response will be stored; if so, collect its body from now on."""
        response = exchange.response
        headers = response.headers
        directives, use_expires = response_policy(headers, self._targeted)
        if not storable(response.status, exchange.request.headers, state.request_cc, headers, directives,
                        use_expires):
            if b"no-store" in directives and response.status < 400:
                # A new representation that must not be stored: the old
                # one is outdated (an error leaves it, for stale-if-error).
                self.store.delete(state.variant)
            return False
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self._max_object:
            return False
        # Hits carry the Via this proxy added when it forwarded the response.
        state.fields = stored_fields(headers, directives) + [(b"Via", response.version + b" " + self._via)]
        state.directives, state.use_expires = directives, use_expires
        state.collect = []
        return True

    def response_body(self, exchange, data: bytes) -> bytes:
        state = exchange.notes.get(_NOTE)
        if state is not None and state is not _INVALIDATES and state.collect is not None:
            state.size += len(data)
            if state.size > self._max_object:
                state.collect = None
                self._release(state)
            else:
                state.collect.append(data)
        return data

    def _revalidated(self, exchange, state: _State, entry: Entry, response: Response) -> Response:
        """
        The origin said the stored response is still good (304): update the
        stored fields from it (RFC 9111 §3.2, §4.3.4), store that, and
        answer from it.
        """
        state.squid_code = "TCP_REFRESH_UNMODIFIED"
        updated = self._updated_entry(entry, response.headers, state.request_time)
        self._keep(state.key, updated, exchange.request.headers)
        answer = self._answer(exchange, state, updated, updated.age(self._clock()),
                              b"; fwd=%s; fwd-status=304" % state.forwarded, validated=True)
        exchange.notes["cache_status"] = state.squid_code
        return answer

    def _updated_entry(self, entry: Entry, fresh: Headers, request_time: float) -> Entry:
        fields = updated_fields(entry.headers, fresh)
        return self._entry(entry.status, entry.reason, fields, entry.body, request_time, entry.vary)

    def _entry(self, status: int, reason: bytes, fields: list[tuple[bytes, bytes]], body: bytes,
               request_time: float, vary: tuple[bytes, ...]) -> Entry:
        """A stored response, with its age and freshness worked out now (RFC 9111 §4.2)."""
        now = self._clock()
        headers = Headers(fields)
        if b"date" not in headers:
            # RFC 9110 §6.6.1: a cache records when a response without Date arrived.
            headers.add(b"Date", formatdate(now, usegmt=True).encode("ascii"))
        directives, use_expires = response_policy(headers, self._targeted)
        lifetime = freshness_lifetime(status, headers, directives, use_expires, now, *self._heuristic)
        kept = [(n, v) for n, v in headers if n.lower() != b"age"]
        return Entry(status, reason, kept, body, request_time, now, initial_age(headers, request_time, now),
                     lifetime, directives, vary)

    def exchange_done(self, exchange) -> None:
        state = exchange.notes.get(_NOTE)
        if state is None or state is _INVALIDATES:
            return
        self.counts[state.squid_code] += 1
        collect = state.collect
        if collect is None or exchange.error is not None:
            self._release(state)
            return
        state.collect = None
        body = b"".join(collect)
        fields = [(n, v) for n, v in state.fields if n.lower() != b"content-length"]
        declared = exchange.response.headers.get(b"content-length")
        if declared is not None and declared != b"%d" % len(body):
            self._release(state)
            return
        fields.append((b"Content-Length", b"%d" % len(body)))
        vary = vary_names(Headers(fields)) or ()
        entry = self._entry(exchange.response.status, exchange.response.reason, fields, body,
                            state.request_time, vary)
        done = self._keep(state.key, entry, exchange.request.headers)
        if isinstance(done, Deferred):
            done.addBoth(lambda _: self._release(state))
        else:
            self._release(state)

    def _keep(self, key: str, entry: Entry, request_headers: Headers):
        """
        Store *entry* under the primary *key*, or, when it varies, under
        the key of the variant *request_headers* select, with the index of
        the varying fields under *key* (RFC 9111 §4.1).

        :returns: ``None``, or a Deferred firing when the entry is stored.
        """
        ttl = keep_for(entry, self._keep_stale)
        if ttl <= 0:
            return None
        if entry.vary:
            self.store.put(key, VaryIndex(entry.vary), ttl + self._keep_stale)
            return self.store.put(variant_key(key, entry.vary, request_headers), entry, ttl)
        return self.store.put(key, entry, ttl)

    # -- stale-while-revalidate ---------------------------------------------------------

    def _refresh(self, exchange, state: _State, entry: Entry) -> None:
        """
        Revalidate *entry* in the background (RFC 5861 §3), once per key at
        a time, with the request's end-to-end fields and the entry's
        validators, straight to the request's target.
        """
        if state.variant in self._refreshing:
            return
        request = exchange.request
        if self._agent is None:
            pool = HTTPConnectionPool(self._reactor, persistent=True)
            pool.maxPersistentPerHost = 4
            self._agent = Agent(self._reactor, connectTimeout=self._timeouts.connect, pool=pool)
        headers = AgentHeaders()
        for name, value in request.headers:
            if name.lower() not in _NOT_FOR_VALIDATION:
                headers.addRawHeader(name, value)
        for name, value in validators(entry):
            headers.addRawHeader(name, value)
        headers.addRawHeader(b"Via", b"1.1 " + self._via)
        url = b"%s://%s%s" % (request.scheme or b"http", request.authority, request.path)
        self._refreshing.add(state.variant)
        request_time = self._clock()
        d = self._agent.request(b"GET", url, headers)
        d.addTimeout(self._timeouts.response, self._reactor)
        d.addCallback(self._refreshed, state, entry, request_time, request.headers)
        d.addErrback(lambda failure: _log.info("background revalidation of {key} failed: {why}",
                                               key=state.variant, why=failure.getErrorMessage()))
        d.addBoth(lambda _: self._refreshing.discard(state.variant))

    def _refreshed(self, agent_response, state: _State, entry: Entry, request_time: float,
                   request_headers: Headers):
        fields = [(name, value) for name, values in agent_response.headers.getAllRawHeaders() for value in values]
        headers = Headers(fields)
        if agent_response.code == 304:
            agent_response.deliverBody(_Discard())
            self._keep(state.key, self._updated_entry(entry, headers, request_time), request_headers)
            return None
        directives, use_expires = response_policy(headers, self._targeted)
        if agent_response.code != 200 or not storable(200, request_headers, state.request_cc, headers,
                                                      directives, use_expires):
            agent_response.deliverBody(_Discard())
            if b"no-store" in directives and agent_response.code < 400:
                self.store.delete(state.variant)
            return None
        body = Deferred()
        agent_response.deliverBody(_BoundedBody(body, self._max_object))
        fields = stored_fields(headers, directives)

        def store(data: bytes | None) -> None:
            if data is None:
                return
            kept = [(n, v) for n, v in fields if n.lower() != b"content-length"]
            kept.append((b"Content-Length", b"%d" % len(data)))
            vary = vary_names(Headers(kept)) or ()
            self._keep(state.key, self._entry(200, agent_response.phrase, kept, data, request_time, vary),
                       request_headers)
        return body.addCallback(store)


class _Discard(Protocol):
    """Reads a body to its end and drops it (so the connection is reused)."""

    def connectionLost(self, reason) -> None:
        pass


class _BoundedBody(Protocol):
    """Collects a body of at most *limit* bytes; fires ``None`` for a longer or cut one."""

    def __init__(self, done: Deferred, limit: int) -> None:
        self._done = done
        self._limit = limit
        self._pieces: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            self._pieces = []
            self.transport.stopProducing()
        else:
            self._pieces.append(data)

    def connectionLost(self, reason) -> None:
        complete = reason.check(ResponseDone, PotentialDataLoss) and self._size <= self._limit
        self._done.callback(b"".join(self._pieces) if complete else None)


def _store(options: dict, context, kind: str, max_bytes: int):
    """The configured backend."""
    reactor = context.reactor
    if kind == "memory":
        return MemoryStore(max_bytes, reactor.seconds)
    if kind == "disk":
        from proxyframe.plugins.pf_cache_disk import DiskStore
        path = options.get("path")
        if not isinstance(path, str) or not path:
            raise ConfigError("path must name the cache directory (store = \"disk\")")
        return DiskStore(context.path(path), max_bytes, reactor)
    from proxyframe.plugins.pf_cache_redis import RedisStore
    url = options.get("redis_url", "redis://127.0.0.1:6379/0")
    prefix = options.get("redis_prefix", "proxyframe:cache:")
    for key, value in (("redis_url", url), ("redis_prefix", prefix)):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key} must be a non-empty string, not {value!r}")
    timeout = number_option(options, "redis_timeout", 0.5, minimum=0.001, unit="seconds")
    return RedisStore(url, prefix, timeout, reactor)


@implementer(IPlugin, IFilterFactory)
class CacheFactory:
    name = "cache"
    description = "A shared HTTP cache (RFC 9111) in memory, on disk or in Redis"

    def build(self, options: dict, context) -> Cache:
        check_options(options, _OPTIONS)
        kind = options.get("store", "memory")
        if kind not in _STORES:
            raise ConfigError(f"store: {kind!r} is not one of {', '.join(_STORES)}")
        max_bytes = number_option(options, "max_bytes", 256 * 1024 * 1024, minimum=1, integer=True, unit="bytes")
        max_object = number_option(options, "max_object_bytes", 8 * 1024 * 1024, minimum=1, integer=True,
                                   unit="bytes")
        fraction = number_option(options, "heuristic_fraction", 0.1)
        if fraction > 1:
            raise ConfigError(f"heuristic_fraction must be between 0 and 1, not {fraction!r}")
        heuristic_max = number_option(options, "heuristic_max", 86400.0, unit="seconds")
        keep_stale = number_option(options, "keep_stale", 86400.0, unit="seconds")
        collapse = number_option(options, "collapse_timeout", 10.0, unit="seconds")
        stats_interval = number_option(options, "stats_interval", 300.0, unit="seconds")
        targeted = options.get("targeted_field", "")
        name = options.get("status_name", context.config.via)
        for key, value in (("targeted_field", targeted), ("status_name", name)):
            if not isinstance(value, str) or not value.isascii() or any(c in value for c in ' ,;:"\\'):
                raise ConfigError(f"{key} must be a field name or token, not {value!r}")
        if not name:
            raise ConfigError("status_name must not be empty")
        store = _store(options, context, kind, max_bytes)
        return Cache(store, context.reactor, name.encode("ascii"), max_object, fraction, heuristic_max,
                     keep_stale, collapse, targeted.lower().encode("ascii") or None, context.config.timeouts,
                     context.config.via.encode("ascii"), stats_interval)


cache = CacheFactory()
