"""
``metrics``: counts every finished exchange, for Prometheus to scrape::

    [[filter]]
    use = "metrics"
    listen = "tcp:9464:interface=127.0.0.1"   # the default: loopback only

The filter implements only ``exchange_done``: per exchange it bumps a few
prometheus-client counters and observes one histogram (no Deferred, no
allocation once every label pair has been seen).  It never listens itself.
Which process serves ``GET /metrics`` on ``listen`` is decided by
:mod:`proxyframe.service`, which finds this filter in the chain it built:

- ``workers = 1``: the one process, from this filter's own registry
  (:meth:`Metrics.site`);
- ``workers = N``: the supervisor, which accepts no proxy connection.  It
  gives every worker a private directory in ``PROMETHEUS_MULTIPROC_DIR``
  (in the environment from exec on, so before prometheus-client is imported
  there), where prometheus-client's multiprocess mode keeps each worker's
  values in its own memory-mapped file; the supervisor serves the sum of
  those files (:meth:`Metrics.site` with *multiprocess_dir*).  A worker that
  dies leaves its file, so its counts stay in the totals.

Building the filter (``build``) therefore never opens a port: the
supervisor builds the chain only to check the config, each worker builds
its own, and neither must bind the metrics port.

prometheus-client is imported only when the filter is built, so a proxy
without it pays nothing.  Written only against the public contract, as any
third party would.
"""

from __future__ import annotations

from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from proxyframe.config import ConfigError
from proxyframe.filters import Filter, check_options
from proxyframe.interfaces import IFilterFactory

__all__ = ["DEFAULT_LISTEN", "DURATION_BUCKETS", "METHODS", "Metrics", "MetricsFactory"]

_log = Logger(namespace="proxyframe.metrics")

_OPTIONS = ("listen",)

#: Where ``/metrics`` is served without a ``listen`` option: loopback only,
#: 9464 being the port Prometheus's registry of default ports gives
#: exporters of this kind.
DEFAULT_LISTEN = "tcp:9464:interface=127.0.0.1"

#: The methods that get their own ``method`` label value (RFC 9110 §9.3,
#: PATCH from RFC 5789); any other method counts as ``"other"``, so that a
#: client sending made-up methods cannot make the label set grow.
METHODS = {m: m.decode("ascii") for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT",
                                         b"OPTIONS", b"TRACE", b"PATCH")}
#: The ``method`` label of an unknown method, and of a request head that
#: could not be parsed (then ``exchange.request`` is ``None``).
OTHER_METHOD = "other"
#: The ``code`` label of an exchange that ended without a response (the
#: client left first).
NO_RESPONSE = "none"
#: The most ``error`` label values: error types come from the proxy's own
#: short list, but a filter may set ``exchange.error`` too; past this many,
#: new ones count as ``"other"``.
MAX_ERROR_TYPES = 64
#: The most ``result`` label values of cache lookups: the cache filter's
#: are Squid's result codes (``TCP_HIT``, ``TCP_MISS``, ...), a handful;
#: past this many, new ones count as ``"other"``.
MAX_CACHE_RESULTS = 32

#: Upper bounds (seconds) of the duration histogram's buckets: from a cache
#: hit (about a millisecond) to a slow origin (up to a minute, the default
#: ``timeouts.response``).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    float("inf"))


class Metrics(Filter):
    """
    Counts each exchange when it is over, in its own
    ``prometheus_client.CollectorRegistry`` (:attr:`registry`; no global
    state, so several chains in one process do not collide).

    :ivar listen: where ``/metrics`` is to be served (a Twisted server
        endpoint string, already checked).
    :ivar registry: the registry holding this filter's metrics.
    """

    def __init__(self, listen: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.listen = listen
        self.registry = registry = CollectorRegistry()
        self._requests = Counter("proxyframe_requests", "Exchanges finished, by request method and status code",
                                 ("method", "code"), registry=registry)
        self._errors = Counter("proxyframe_errors", "Exchanges the proxy failed, by RFC 9209 error type "
                               "(client_closed: the client left first)", ("error",), registry=registry)
        self._response_bytes = Counter("proxyframe_response_body_bytes",
                                       "Response body bytes sent to clients (tunnels not included)",
                                       registry=registry).inc
        self._request_bytes = Counter("proxyframe_request_body_bytes",
                                      "Request body bytes received from clients (tunnels not included)",
                                      registry=registry).inc
        self._tunnels = Counter("proxyframe_tunnels", "CONNECT tunnels established, counted when they close",
                                registry=registry).inc
        self._tunnel_sent = Counter("proxyframe_tunnel_sent_bytes", "Bytes relayed to clients through tunnels",
                                    registry=registry).inc
        self._tunnel_received = Counter("proxyframe_tunnel_received_bytes",
                                        "Bytes relayed from clients through tunnels", registry=registry).inc
        self._cache_lookups = Counter("proxyframe_cache_lookups",
                                      "Exchanges a cache filter looked up, by its Squid result code "
                                      "(exchange.notes['cache_status'], e.g. TCP_HIT)", ("result",),
                                      registry=registry)
        self._duration = Histogram("proxyframe_request_duration_seconds",
                                   "Seconds from the request head to the exchange's end (tunnels not included)",
                                   buckets=DURATION_BUCKETS, registry=registry).observe
        # (method label, status or None) -> the child's inc; error -> inc;
        # cache result -> inc.  Bounded: 10 method labels times 900
        # three-digit codes (RFC 9110 §15), MAX_ERROR_TYPES and
        # MAX_CACHE_RESULTS.
        self._request_incs: dict = {}
        self._error_incs: dict = {}
        self._cache_incs: dict = {}

    def exchange_done(self, exchange) -> None:
        """
        Count *exchange*: one request by method and code, its body bytes
        (or its tunnel's bytes), its error type if any, the cache filter's
        result for it if any (``exchange.notes["cache_status"]``), and its duration
        (``ended - started``; tunnels, which may last hours, are left out
        of the histogram).
        """
        request = exchange.request
        response = exchange.response
        method = OTHER_METHOD if request is None else METHODS.get(request.method, OTHER_METHOD)
        status = None if response is None else response.status
        inc = self._request_incs.get((method, status))
        if inc is None:
            if status is None:
                inc = self._request_incs[(method, status)] = self._requests.labels(method, NO_RESPONSE).inc
            elif 100 <= status <= 999:
                inc = self._request_incs[(method, status)] = self._requests.labels(method, str(status)).inc
            else:  # a filter's odd status: counted, not cached
                inc = self._requests.labels(method, OTHER_METHOD).inc
        inc()
        error = exchange.error
        if error is not None:
            _bounded_inc(self._error_incs, self._errors, error, MAX_ERROR_TYPES)
        result = exchange.notes.get("cache_status")
        if result is not None:
            _bounded_inc(self._cache_incs, self._cache_lookups, str(result), MAX_CACHE_RESULTS)
        if method == "CONNECT" and status is not None and 200 <= status < 300:
            self._tunnels()
            if exchange.bytes_sent:
                self._tunnel_sent(exchange.bytes_sent)
            if exchange.bytes_received:
                self._tunnel_received(exchange.bytes_received)
            return
        if exchange.bytes_sent:
            self._response_bytes(exchange.bytes_sent)
        if exchange.bytes_received:
            self._request_bytes(exchange.bytes_received)
        ended = exchange.ended
        self._duration(ended - exchange.started if ended is not None and ended > exchange.started else 0.0)

    def site(self, reactor, multiprocess_dir: str | None = None) -> Site:
        """
        The HTTP site that serves ``/metrics`` (``twisted.web``).

        :param reactor: the reactor (its thread pool reads the workers' files).
        :param multiprocess_dir: ``None`` to serve this filter's
            :attr:`registry` (``workers = 1``); else the
            ``PROMETHEUS_MULTIPROC_DIR`` the workers write to, whose files
            are summed by a ``MultiProcessCollector``.  Reading them is
            disk work, so it is done in the reactor's thread pool, never on
            the reactor thread.
        :returns: a ``Site`` to listen with.
        """
        if multiprocess_dir is None:
            return _MetricsSite(_MetricsPage(self.registry, None))
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=multiprocess_dir)
        return _MetricsSite(_MetricsPage(registry, reactor))


def _bounded_inc(incs: dict, counter, label: str, limit: int) -> None:
    """
    Count one for *label* of *counter* (a one-label ``Counter``), keeping
    each label's ``inc`` in *incs*; past *limit* labels, new ones count as
    ``"other"``, so that values a filter makes up cannot grow the series.
    """
    inc = incs.get(label)
    if inc is None:
        if len(incs) < limit:
            inc = incs[label] = counter.labels(label).inc
        else:
            inc = counter.labels(OTHER_METHOD).inc
    inc()


#: The media type of what ``generate_latest`` writes: the Prometheus text
#: format, version 0.0.4, which every Prometheus version scrapes.
_TEXT_FORMAT = b"text/plain; version=0.0.4; charset=utf-8"


class _MetricsPage(Resource):
    """
    ``GET /metrics`` (and ``HEAD``): the registry in Prometheus's text
    format.  Any other path gets 404; another method on ``/metrics`` gets
    405 with ``Allow`` (RFC 9110 §15.5.6).

    :param reactor: ``None`` to render on the reactor thread (memory only);
        otherwise rendering runs in this reactor's thread pool.
    """

    isLeaf = True

    def __init__(self, registry, reactor) -> None:
        super().__init__()
        self._registry = registry
        self._reactor = reactor

    def render(self, request):
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        if request.path != b"/metrics":
            request.setResponseCode(404)
            return b"Not found: the metrics are at /metrics\n"
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"Allow", b"GET, HEAD")
            return b"Method not allowed: use GET\n"
        from prometheus_client import generate_latest

        request.setHeader(b"Content-Type", _TEXT_FORMAT)
        if self._reactor is None:
            return generate_latest(self._registry)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), generate_latest, self._registry)
        d.addCallbacks(self._rendered, self._failed, callbackArgs=(request, gone), errbackArgs=(request, gone))
        return NOT_DONE_YET

    @staticmethod
    def _rendered(body: bytes, request, gone: list[bool]) -> None:
        if not gone:
            request.write(body)
            request.finish()

    @staticmethod
    def _failed(failure, request, gone: list[bool]) -> None:
        _log.failure("the metrics could not be collected", failure)
        if not gone:
            request.setResponseCode(500)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            request.write(b"The metrics could not be collected; see the proxy's log\n")
            request.finish()


class _MetricsSite(Site):
    """A ``Site`` that logs neither its start nor each scrape."""

    noisy = False
    displayTracebacks = False

    def logPrefix(self) -> str:
        return "proxyframe metrics"

    def log(self, request) -> None:
        pass


def _listen_option(options: dict, reactor) -> str:
    """
    :returns: the ``listen`` option, checked by parsing it as a server
        endpoint (nothing is opened).
    :raises ConfigError: it is not a string or not a valid endpoint.
    """
    listen = options.get("listen", DEFAULT_LISTEN)
    if not isinstance(listen, str) or not listen:
        raise ConfigError(f"listen must be a Twisted server endpoint string, not {listen!r}")
    try:
        serverFromString(reactor, listen)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"listen: {listen!r} is not a valid endpoint: {e}") from None
    return listen


@implementer(IPlugin, IFilterFactory)
class MetricsFactory:
    name = "metrics"
    description = "Count exchanges for Prometheus, served at /metrics (summed over all workers)"

    def build(self, options: dict, context) -> Metrics:
        check_options(options, _OPTIONS)
        listen = _listen_option(options, context.reactor)
        earlier = [entry.use for entry in context.config.filters[:context.position]]
        if self.name in earlier:
            raise ConfigError("only one metrics filter may be configured "
                              f"(another is filter[{earlier.index(self.name)}])")
        return Metrics(listen)


metrics = MetricsFactory()
