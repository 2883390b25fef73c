"""
The upstream side: one :class:`UpstreamConnection` per TCP connection to an
origin server, and the :class:`UpstreamPool` that keeps idle ones for reuse
(persistent connections, RFC 9112 §9.3).

A connection serves one exchange at a time.  It parses the response with
the shared framing core (:mod:`proxyframe.http1`) and hands the head, body
pieces and end to its *handler* (the client-side protocol), which writes
them to the client.  It is the client transport's streaming producer while
a response body flows, so a slow client pauses the origin.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Protocol as TypingProtocol

from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from proxyframe.errorpage import ProxyError
from proxyframe.exchange import Headers, Response
from proxyframe.http1 import (
    BodyReader,
    ContentLengthReader,
    ProtocolError,
    parse_response_head,
    response_body_reader,
)
from proxyframe.protocol.sending import write, write_sequence
from proxyframe.protocol.splice import SpliceBody

if TYPE_CHECKING:
    from proxyframe.config import Config

__all__ = ["UpstreamConnection", "UpstreamPool", "ResponseHandler", "connect_error"]

#: Bodies of known length with at least this many bytes left after the
#: head's read go through the kernel (SpliceBody), when the handler allows.
SPLICE_MIN_BODY = 256 * 1024

#: (host, port) of an origin server; the scheme is always http for now.
OriginKey = tuple[str, int]


class ResponseHandler(TypingProtocol):
    """What an :class:`UpstreamConnection` reports to (the client side)."""

    def interim_response(self, response: Response) -> None: ...
    def response_head(self, response: Response, reader: BodyReader | None) -> None: ...
    def response_data(self, data: bytes) -> None: ...
    def response_complete(self, trailers: Headers | None) -> None: ...
    def flush(self) -> None: ...
    def upstream_failed(self, error: ProxyError, conn: UpstreamConnection) -> None: ...
    def splice_sink(self): ...
    def splice_ended(self, moved: int) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def stopProducing(self) -> None: ...


def connect_error(failure_value: BaseException, host: str) -> ProxyError:
    """
    Map a failed connection attempt to the status and RFC 9209 error type
    the client gets: 502 ``dns_error`` when the name does not resolve, 502
    ``connection_refused``, 504 ``connection_timeout``, 502
    ``destination_unavailable`` otherwise (RFC 9110 §15.6.3, §15.6.5).
    """
    if isinstance(failure_value, ierror.DNSLookupError):
        return ProxyError(502, "dns_error", "The host name could not be resolved", host)
    if isinstance(failure_value, ierror.ConnectionRefusedError):
        return ProxyError(502, "connection_refused", "The upstream server refused the connection", host)
    if isinstance(failure_value, ierror.TimeoutError):
        return ProxyError(504, "connection_timeout", "Connecting to the upstream server timed out", host)
    return ProxyError(502, "destination_unavailable",
                      f"Cannot connect to the upstream server: {failure_value}", host)


_IDLE, _HEAD, _BODY, _DONE = range(4)


@implementer(IPushProducer)
class UpstreamConnection(Protocol):
    """
    One connection to an origin server.

    :ivar key: the origin's ``(host, port)``.
    :ivar reused: ``True`` once it served an exchange before the current
        one (a failure before any response byte may then be retried).
    :ivar got_response_bytes: whether the current exchange saw any byte
        from the origin.
    :ivar peer_host: the address connected to (``str``).
    """

    def __init__(self, pool: UpstreamPool, key: OriginKey) -> None:
        self.pool = pool
        self.key = key
        self.reused = False
        self.got_response_bytes = False
        self.handler: ResponseHandler | None = None
        self._state = _IDLE
        self._method = b""
        self._head = bytearray()
        self._reader: BodyReader | None = None
        self._keep_alive = True
        self._timer = None
        self._paused = False
        self._splice: SpliceBody | None = None
        self.request_body_done = True

    # -- exchange lifecycle ---------------------------------------------

    def start(self, handler: ResponseHandler, method: bytes, head: bytes, has_body: bool) -> None:
        """
        Send a request head and wait for the response.

        :param handler: receives the response; registered as this
            transport's streaming producer so the request body pauses when
            the origin reads slowly.
        :param has_body: a request body follows through :meth:`write`;
            the connection is only reused once :meth:`request_complete`
            was called.
        """
        self.handler = handler
        self._method = method
        self._state = _HEAD
        self.got_response_bytes = False
        self.request_body_done = not has_body
        self.transport.registerProducer(handler, True)
        write(self.transport, head)
        # One timer for the connection's life, pushed back for each exchange.
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(self.pool.response_timeout)
        else:
            self._timer = self.pool.reactor.callLater(self.pool.response_timeout, self._timed_out)

    def write(self, data: bytes) -> None:
        """
        Send request body bytes (already framed for this hop).  While the
        body flows, the response timeout counts from the last write.
        """
        write(self.transport, data)
        if self._timer is not None:
            self._timer.reset(self.pool.response_timeout)

    def write_sequence(self, data: list[bytes]) -> None:
        """Send request body pieces without joining them (see :meth:`write`)."""
        write_sequence(self.transport, data)
        if self._timer is not None:
            self._timer.reset(self.pool.response_timeout)

    def request_complete(self) -> None:
        """The request body has been sent in full."""
        self.request_body_done = True

    def abort(self) -> None:
        """
        Give up the current exchange (the client went away): the
        connection is closed, as its response can no longer be framed.
        """
        self._cancel_splice()
        self._state = _DONE
        self._detach()
        self.transport.abortConnection()

    def drop_response(self) -> None:
        """
        The handler will not use the response whose head it was just given
        (a filter replaced it).  A response without a body is complete
        already, so the connection goes back to the pool; one with a body
        is cut (:meth:`abort`), as reading it to the end could take long.
        """
        if self._state == _HEAD and self._reader is None:
            self._detach()
        else:
            self.abort()

    def _detach(self) -> ResponseHandler | None:
        # The response timer stays armed: it is a no-op without a handler,
        # and the next exchange pushes it back instead of making a new one.
        handler = self.handler
        self.handler = None
        if handler is not None:
            self.transport.unregisterProducer()
        return handler

    def _fail(self, error: ProxyError) -> None:
        self._state = _DONE
        handler = self._detach()
        self.transport.abortConnection()
        if handler is not None:
            handler.upstream_failed(error, self)

    def _complete(self, rest: bytes) -> None:
        reader = self._reader
        trailers = reader.trailers if reader is not None and reader.chunked else None
        self._reader = None
        handler = self._detach()
        # Bytes after the end of a response we did not ask for, or a request
        # body the origin did not wait for: the connection's framing is no
        # longer certain, so it is not reused.
        if self._keep_alive and not rest and self.request_body_done:
            self._state = _IDLE
            if self._paused:
                self._paused = False
                self.transport.resumeProducing()
            self.pool.release(self)
        else:
            self._state = _DONE
            self.transport.loseConnection()
        if handler is not None:
            handler.response_complete(trailers)

    def _timed_out(self) -> None:
        self._timer = None
        if self.handler is None:
            return
        host = f"{self.key[0]}:{self.key[1]}"
        if self._state == _HEAD:
            self._fail(ProxyError(504, "http_response_timeout",
                                  "The upstream server did not answer in time", host))
        else:
            self._fail(ProxyError(504, "connection_read_timeout",
                                  "The upstream server stopped sending the response", host))

    # -- Twisted protocol -----------------------------------------------

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.peer_host = self.transport.getPeer().host

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state == _BODY:
            if self._timer is not None:
                self._timer.reset(self.pool.response_timeout)
            try:
                rest = self._reader.read(data, self.handler.response_data)
            except ProtocolError as e:
                self._fail(self._bad_response(e.detail))
                return
            if rest is not None:
                self._complete(rest)
        elif state == _HEAD:
            self.got_response_bytes = True
            self._receive_head(data)
        elif state == _IDLE:
            # An idle origin has nothing to say; whatever it is, the
            # connection cannot be trusted any more.
            self._state = _DONE
            self.pool.discard(self)
            self.transport.abortConnection()

    def _bad_response(self, detail: str) -> ProxyError:
        return ProxyError(502, "http_protocol_error", f"The upstream server sent an invalid response: {detail}",
                          f"{self.key[0]}:{self.key[1]}")

    def _receive_head(self, data: bytes) -> None:
        buf = self._head
        if buf:
            # The head came in pieces; usually it comes whole, and then the
            # read is sliced as it is, without copies through the buffer.
            buf += data
            data = bytes(buf)
            buf.clear()
        while self._state == _HEAD:
            end = data.find(b"\r\n\r\n")
            if (end if end >= 0 else len(data)) > self.pool.max_head_bytes:
                self._fail(ProxyError(502, "http_response_header_section_size",
                                      "The upstream's response head is too large",
                                      f"{self.key[0]}:{self.key[1]}"))
                return
            if end < 0:
                buf += data
                return
            head, data = data[:end], data[end + 4:]
            try:
                response = parse_response_head(head, self.pool.max_fields)
                reader = response_body_reader(self._method, response)
            except ProtocolError as e:
                self._fail(self._bad_response(e.detail))
                return
            status = response.status
            if status < 200:
                if status == 101:
                    # We never forward Upgrade, so a switch is a protocol error.
                    self._fail(self._bad_response("unexpected 101 Switching Protocols"))
                    return
                self.handler.interim_response(response)
                continue
            # RFC 9112 §9.3: HTTP/1.1 persists unless "close"; an HTTP/1.0
            # origin is not kept (its keep-alive is not worth the risk).
            conn = response.headers.get(b"connection")
            self._keep_alive = response.version == b"1.1" and not (
                conn is not None and b"close" in conn.lower())
            self._reader = reader
            self.handler.response_head(response, reader)
            if self._state != _HEAD:
                return
            if reader is None:
                self._complete(data)
                return
            self._state = _BODY
            if data:
                self.dataReceived(data)
            if self.handler is not None:
                self.handler.flush()
                self._maybe_splice()

    # -- the body in the kernel -------------------------------------------

    def _maybe_splice(self) -> None:
        """
        Move the rest of a long body of known length with ``splice(2)``
        (:class:`~proxyframe.protocol.splice.SpliceBody`) when the handler
        offers its client transport for it (it checks the conditions).
        """
        reader = self._reader
        if (self._state != _BODY or self._paused or type(reader) is not ContentLengthReader
                or reader.remaining < SPLICE_MIN_BODY):
            return
        client = self.handler.splice_sink()
        if client is None:
            return
        try:
            self._splice = SpliceBody(self.transport, client, reader.remaining, self.pool.response_timeout,
                                      self._splice_done, self._splice_failed)
        except OSError:
            self.handler.splice_ended(0)
            return
        # The splice keeps its own timer while it runs.
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _cancel_splice(self) -> None:
        """Stop a running splice before anything touches the transports (they share its descriptors)."""
        splice, self._splice = self._splice, None
        if splice is not None:
            splice.cancel()
            if self.handler is not None:
                self.handler.splice_ended(splice.moved)

    def _splice_done(self, body: SpliceBody) -> None:
        self._splice = None
        self._reader.remaining = 0
        self.transport.startReading()
        self.handler.splice_ended(body.moved)
        self._complete(b"")

    def _splice_failed(self, body: SpliceBody, what: str) -> None:
        # Each failure ends as it would have without the splice.
        self._splice = None
        self.handler.splice_ended(body.moved)
        if what == "timeout":
            self._timed_out()
        elif what == "client":
            # The client's connection is lost: its connectionLost ends the
            # exchange and aborts this connection.
            body.client.abortConnection()
        else:
            # connectionLost sees a body cut short (502).
            self.transport.abortConnection()

    def connectionLost(self, reason) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.pool.discard(self)
        state = self._state
        self._state = _DONE
        if self.handler is None:
            return
        if state == _BODY and self._reader.ends_at_eof:
            self._complete(b"")
            return
        handler = self._detach()
        host = f"{self.key[0]}:{self.key[1]}"
        if state == _HEAD and not self.got_response_bytes:
            error = ProxyError(502, "connection_terminated",
                               "The upstream server closed the connection without a response", host)
        else:
            error = ProxyError(502, "http_response_incomplete",
                               "The upstream server closed the connection before the response was complete", host)
        handler.upstream_failed(error, self)

    # -- IPushProducer, for the client transport ------------------------

    def pauseProducing(self) -> None:
        if not self._paused:
            self._paused = True
            self.transport.pauseProducing()
            # A client that reads slowly is not an origin that is slow.
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
                self._timer = None

    def resumeProducing(self) -> None:
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
            if self.handler is not None and self._timer is None:
                self._timer = self.pool.reactor.callLater(self.pool.response_timeout, self._timed_out)

    def stopProducing(self) -> None:
        self._cancel_splice()
        self.transport.abortConnection()


def _timed_out(result: object, timeout: float) -> Failure:
    """For addTimeout: a cancelled connection attempt is a timeout."""
    return Failure(ierror.TimeoutError(f"no connection within {timeout} seconds"))


class _OneConnection(Factory):
    """Builds the one given protocol (quietly: no log line per connection)."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr) -> Protocol:
        return self._protocol


class UpstreamPool:
    """
    Persistent connections to origin servers, reused across clients.

    Idle connections are kept per origin (at most
    ``upstream.max_idle_per_origin``, most recently used first) and in all
    (at most ``upstream.max_idle``, the oldest closed first), and closed
    after ``timeouts.upstream_idle`` seconds.
    """

    def __init__(self, reactor, config: Config) -> None:
        self.reactor = reactor
        self.connect_timeout = config.timeouts.connect
        self.response_timeout = config.timeouts.response
        self.max_head_bytes = config.limits.max_header_bytes
        self.max_fields = config.limits.max_header_fields
        self._idle_timeout = config.timeouts.upstream_idle
        self._max_per_origin = config.upstream.max_idle_per_origin
        self._max_idle = config.upstream.max_idle
        self._idle: dict[OriginKey, list[UpstreamConnection]] = {}
        # Every idle connection, oldest first, with when it became idle
        # (reactor seconds); one timer closes those idle too long, rather
        # than a timer per release.
        self._since: OrderedDict[UpstreamConnection, float] = OrderedDict()
        self._sweeper = None

    def take(self, key: OriginKey) -> UpstreamConnection | None:
        """
        :returns: an idle connection to *key* (the most recently used), or
            ``None``; no Deferred, as this is the common keep-alive case.
        """
        conns = self._idle.get(key)
        while conns:
            conn = conns.pop()
            if not conns:
                del self._idle[key]
            del self._since[conn]
            # One closing but not yet reported lost is no use.
            if conn.transport.connected and not conn.transport.disconnecting:
                conn.reused = True
                return conn
        return None

    def connect(self, key: OriginKey, protocol: Protocol | None = None) -> Deferred:
        """
        Open a new connection to *key* (names resolved without blocking,
        IPv4 and IPv6, RFC 8305 connection racing by HostnameEndpoint),
        within ``timeouts.connect`` seconds.

        :param protocol: the protocol to connect; by default a new
            :class:`UpstreamConnection` (a CONNECT tunnel passes its own).
        :returns: a ``Deferred`` firing with the connected protocol, or
            failing with the connection error (see :func:`connect_error`).
        """
        if protocol is None:
            protocol = UpstreamConnection(self, key)
        endpoint = HostnameEndpoint(self.reactor, key[0], key[1], timeout=self.connect_timeout)
        # The endpoint's timeout bounds each attempt; this bounds the whole,
        # name resolution included.
        d = endpoint.connect(_OneConnection(protocol))
        return d.addTimeout(self.connect_timeout, self.reactor, onTimeoutCancel=_timed_out)

    def release(self, conn: UpstreamConnection) -> None:
        """
        Keep *conn* for reuse, or close it when the pool is full.
        """
        conns = self._idle.setdefault(conn.key, [])
        if len(conns) >= self._max_per_origin:
            conn.transport.loseConnection()
            return
        if len(self._since) >= self._max_idle:
            oldest = next(iter(self._since))
            self.discard(oldest)
            oldest.transport.loseConnection()
        conns.append(conn)
        self._since[conn] = self.reactor.seconds()
        if self._sweeper is None:
            self._sweeper = self.reactor.callLater(self._idle_timeout, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for ``timeouts.upstream_idle`` seconds; wait for the next one."""
        self._sweeper = None
        now = self.reactor.seconds()
        while self._since:
            conn, since = next(iter(self._since.items()))
            if now - since < self._idle_timeout:
                self._sweeper = self.reactor.callLater(since + self._idle_timeout - now, self._sweep)
                return
            self.discard(conn)
            conn.transport.loseConnection()

    def discard(self, conn: UpstreamConnection) -> None:
        """
        Forget *conn* if it is idle here (it closed or misbehaved).
        """
        if self._since.pop(conn, None) is None:
            return
        conns = self._idle.get(conn.key)
        if conns is not None and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._idle[conn.key]

    def close_idle(self) -> None:
        """Close every idle connection (at shutdown)."""
        for conn in list(self._since):
            self.discard(conn)
            conn.transport.loseConnection()
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
