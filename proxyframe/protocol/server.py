"""
The client side: :class:`ProxyServer`, one per client connection, and the
:class:`ProxyFactory` that holds the configuration, the upstream pool and
the set of live connections.

A connection handles one exchange at a time; pipelined requests wait in a
bounded buffer (past :data:`PIPELINE_BUFFER` bytes the socket stops being
read), so responses go out in request order (RFC 9112 §9.3.2).  Request
bodies stream upstream as they arrive, response bodies stream to the
client; each side pauses the other when its send buffer is full.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from proxyframe.chain import Chain, build_chain, run_hooks
from proxyframe.config import Config
from proxyframe.errorpage import ProxyError, error_response
from proxyframe.exchange import Exchange, Headers, Request, Response
from proxyframe.forwarding import (
    HOP_BY_HOP,
    connection_tokens,
    parse_absolute_form,
    parse_authority_form,
    request_head_for_upstream,
    response_head_for_client,
)
from proxyframe.http1 import (
    LAST_CHUNK,
    BodyReader,
    ProtocolError,
    encode_chunk,
    parse_request_head,
    request_body_reader,
)
from proxyframe.protocol.sending import write, write_sequence
from proxyframe.protocol.splice import SpliceTunnel, splice_available
from proxyframe.protocol.tunnel import Tunnel, TunnelUpstream, open_tunnel
from proxyframe.protocol.upstream import UpstreamConnection, UpstreamPool, connect_error

__all__ = ["ProxyFactory", "ProxyServer", "PIPELINE_BUFFER"]

_log = Logger()

#: Bytes of pipelined requests held while a response is in progress before
#: the client socket stops being read (Twisted's HTTPChannel uses 16 KiB).
PIPELINE_BUFFER = 65536
#: After an error that leaves unread input, how long (seconds) the
#: connection keeps reading and discarding before it is closed, so that the
#: client sees the error page instead of a reset (a "lingering close").
LINGER = 2.0

# Connection states.
_HEAD, _BODY, _WAIT, _TUNNEL, _CLOSED = range(5)
# Reasons to stop reading the client socket, as bits: reading resumes only
# when none is left.
_PAUSE_UPSTREAM, _PAUSE_PIPELINE, _PAUSE_CONNECTING, _PAUSE_FILTERS, _PAUSE_SPLICE = 1, 2, 4, 8, 16
# Methods that may be retried on a fresh connection when a reused one was
# closed before any response byte (RFC 9110 §9.2.2).
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_CONNECTION_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


@implementer(IHalfCloseableProtocol, IPushProducer)
class ProxyServer(Protocol):
    """
    One client connection.  Parses requests, forwards them through the
    factory's :class:`UpstreamPool` or opens a CONNECT tunnel, and writes
    the responses back in order.

    Errors the proxy makes itself (see :mod:`proxyframe.errorpage`): 400
    bad framing or target, 403 CONNECT to a port not allowed or a
    forwarding loop, 408 head too slow, 414 request line too long, 431 head
    too large, 501 unknown transfer coding, 502/504 upstream failures, 505
    HTTP version.  After a framing error the connection is closed.
    """

    def __init__(self, factory: ProxyFactory) -> None:
        self.factory = factory
        self._reactor = factory.reactor
        self._state = _HEAD
        self._buf = bytearray()
        self._scanned = 0
        self._pause_bits = 0
        self._timer = None
        # Closes the connection when no request came for timeouts.client_idle
        # seconds: armed once, pushed back after each exchange (a reset,
        # not a new timer), and a no-op when it fires while one is running.
        self._idle_timer = None
        self._client = ""
        self._client_host = ""
        self._chain: Chain = factory.chain
        self.exchange: Exchange | None = None
        # While filters decide on a response head: the body pieces and the
        # end that arrived meanwhile, else None.
        self._held: list | None = None
        self._held_reader: BodyReader | None = None
        self._rest = b""
        self._producer: UpstreamConnection | None = None
        self._upstream: UpstreamConnection | None = None
        self._tunnel: Tunnel | SpliceTunnel | None = None
        self._reader: BodyReader | None = None
        self._early = b""
        self._head_bytes = b""
        # A response head not yet written: it goes out with the first body
        # bytes, or at the end of the upstream read that brought it.
        self._head_out = b""
        # A whole response's body while the response phase runs on it.
        self._local_body = b""
        self._keep_alive = True
        self._response_started = False
        self._phase_pending = False
        self._chunk_out = False
        self._close_delimited_out = False
        self._retried = False
        self._stopping = False
        self._read_eof = False
        self._line_end = -1

    # -- connection ------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self._client_host = peer.host
        self._client = f"{peer.host}:{peer.port}"
        self.factory.connection_made(self, self.transport.getHost())
        self.transport.setTcpNoDelay(True)
        self._arm_idle_timer()

    def connectionLost(self, reason) -> None:
        state = self._state
        self._state = _CLOSED
        self._cancel_timers()
        if self._upstream is not None:
            upstream, self._upstream = self._upstream, None
            upstream.abort()
        if self._tunnel is not None:
            self._tunnel.close()
        elif self.exchange is not None and state != _TUNNEL:
            self.exchange.error = self.exchange.error or "client_closed"
            self._finish_exchange()
        self.factory.connection_lost(self)

    def readConnectionLost(self) -> None:
        """The client half-closed: finish what is in progress, then close."""
        self._read_eof = True
        if self._state == _TUNNEL:
            self._tunnel.client_eof()
        elif self._state == _WAIT:
            self._keep_alive = False
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """
        Our half-close after the last response is done (everything was
        flushed).  Close once the client has closed too, or after LINGER
        seconds of reading and dropping what it still sends.
        """
        if self._state == _TUNNEL:
            return
        if self._read_eof:
            self.transport.loseConnection()
        else:
            self._set_timer(LINGER, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state == _TUNNEL:
            self._tunnel.from_client(data)
        elif state == _BODY:
            self._receive_body(data)
        elif state == _HEAD:
            self._receive_head(data)
        elif state == _WAIT:
            self._buf += data
            if len(self._buf) > PIPELINE_BUFFER:
                self._pause(_PAUSE_PIPELINE)

    # -- reading the request head ---------------------------------------

    def _receive_head(self, data: bytes) -> None:
        buf = self._buf
        if not buf:
            # Fast path: a whole head in one read.
            if data[:2] == b"\r\n":
                # RFC 9112 §2.2: ignore empty lines before a request-line.
                data = data.lstrip(b"\r\n")
                if not data:
                    return
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                self._head_complete(data[:end], data[end + 4:])
                return
            buf += data
            self._scanned = 0
            self._line_end = -1
            self._set_timer(self.factory.config.timeouts.header, self._header_timeout)
        else:
            buf += data
            if buf[:2] == b"\r\n":
                buf[:] = buf.lstrip(b"\r\n")
            end = buf.find(b"\r\n\r\n", max(0, self._scanned - 3))
            if end >= 0:
                head, rest = bytes(buf[:end]), bytes(buf[end + 4:])
                buf.clear()
                self._head_complete(head, rest)
                return
        limits = self.factory.config.limits
        if self._line_end < 0:
            # Resume the search where the last one stopped (no rescans).
            self._line_end = buf.find(b"\r\n", max(0, self._scanned - 1))
            if (self._line_end < 0 and len(buf) > limits.max_request_line) \
                    or self._line_end > limits.max_request_line:
                self._reject(ProtocolError(414, "the request line is too long"))
                return
        self._scanned = len(buf)
        if len(buf) > limits.max_header_bytes:
            self._reject(ProtocolError(431, "the request head is too large"))

    def _new_exchange(self) -> Exchange:
        exchange = self.exchange = Exchange(self._client, self._client_host, None, self._reactor.seconds())
        return exchange

    def _head_complete(self, head: bytes, rest: bytes) -> None:
        self._cancel_timer()
        exchange = self._new_exchange()
        limits = self.factory.config.limits
        try:
            if len(head) > limits.max_header_bytes:
                raise ProtocolError(431, "the request head is too large")
            line_end = head.find(b"\r\n")
            if line_end > limits.max_request_line or (line_end < 0 and len(head) > limits.max_request_line):
                raise ProtocolError(414, "the request line is too long")
            request = exchange.request = parse_request_head(head, limits.max_header_fields)
            if request.method == b"CONNECT":
                parse_authority_form(request)
            else:
                parse_absolute_form(request)
                self._reader = request_body_reader(request)
        except ProtocolError as e:
            self._reject(e)
            return
        self._keep_alive = self._persistent(request)
        chain = self._chain
        hooks = chain.connect_hooks if request.method == b"CONNECT" else chain.request_hooks
        exchange.passed = chain.size
        if not hooks:
            self._dispatch(request, rest)
            return
        # The request phase: filters may answer, or take their time (then
        # nothing more is read from the client until they are done).
        self._state = _WAIT
        self._rest = rest
        self._phase_pending = True
        run_hooks(hooks, exchange, self._request_phase_done, self._filter_failed, request_phase=True)
        if self._phase_pending:
            self._pause(_PAUSE_FILTERS)

    def _persistent(self, request: Request) -> bool:
        """Whether the client wants the connection kept (RFC 9112 §9.3)."""
        if self._stopping:
            return False
        tokens = connection_tokens(request.headers)
        if request.version == b"1.1":
            return b"close" not in tokens
        proxy_tokens = connection_tokens(Headers([(b"Connection", request.headers.get(b"proxy-connection", b""))]))
        return b"keep-alive" in tokens or b"keep-alive" in proxy_tokens

    def _dispatch(self, request: Request, rest: bytes) -> None:
        if request.method == b"CONNECT":
            self._open_tunnel(request, rest)
        else:
            self._forward(request, rest)

    def _request_phase_done(self, response: Response | None) -> None:
        self._phase_pending = False
        if self._state == _CLOSED:
            return
        self._resume(_PAUSE_FILTERS)
        rest, self._rest = self._rest, b""
        request = self.exchange.request
        if response is None:
            self._dispatch(request, rest)
            return
        # A filter answered: the request body, if any, will not be read.
        if self._reader is not None or request.method == b"CONNECT":
            self._keep_alive = False
        else:
            self._buf += rest
        self._respond_local(response, b"" if response.body is None else response.body)

    def _filter_failed(self, name: str, failure: Failure) -> None:
        """
        A hook raised (or returned something it must not): log it with the
        filter's name and fail this exchange only, with 500.
        """
        _log.failure("filter {filter} failed", failure, filter=name)
        self._phase_pending = False
        self._held = None
        if self._state == _CLOSED:
            return
        if self._upstream is not None:
            upstream, self._upstream = self._upstream, None
            upstream.abort()
        self._resume(_PAUSE_FILTERS)
        self._take_back_head()
        if self._response_started:
            self.exchange.error = "proxy_internal_error"
            self._state = _CLOSED
            self._finish_exchange()
            self.exchange = None
            self.transport.abortConnection()
            return
        self._keep_alive = False
        self._respond_error(ProxyError(500, "proxy_internal_error", f"The filter {name} failed"), filtered=True)

    def _reject(self, error: ProtocolError) -> None:
        """Answer a request whose framing or size is bad, then close."""
        if self.exchange is None:
            self._new_exchange()
        self._buf.clear()
        self._keep_alive = False
        self._respond_error(ProxyError(error.status, "http_request_error", error.detail))

    # -- forwarding a request --------------------------------------------

    def _forward(self, request: Request, rest: bytes) -> None:
        headers = request.headers
        tokens = connection_tokens(headers)
        reader = self._reader
        if reader is None:
            self._state = _WAIT
            self._buf += rest
        else:
            self._state = _BODY
            self._early = rest
        if request.method in (b"TRACE", b"OPTIONS") and b"max-forwards" in headers:
            if self._max_forwards(request):
                return
        framing = [(b"Transfer-Encoding", b"chunked")] if reader is not None and reader.chunked else []
        self._head_bytes = request_head_for_upstream(request, tokens, self.factory.via, framing)
        self._retried = False
        conn = self.factory.pool.take((request.host, request.port))
        if conn is not None:
            self._attach(conn)
        else:
            self._connect_upstream(request)

    def _max_forwards(self, request: Request) -> bool:
        """
        RFC 9110 §7.6.2: answer TRACE or OPTIONS here when Max-Forwards is
        0, else decrement it.  :returns: whether the proxy answered.
        """
        value = request.headers.get(b"max-forwards")
        if not value.isdigit():
            self._keep_alive = False
            self._respond_error(ProxyError(400, "http_request_error", "Max-Forwards must be a number"))
            return True
        hops = int(value)
        if hops > 0:
            request.headers.set(b"Max-Forwards", b"%d" % (hops - 1))
            return False
        if request.method == b"TRACE":
            # RFC 9110 §9.3.8: echo the request as received, less the
            # fields that carry credentials.
            echoed = Headers(request.headers)
            echoed.remove(b"Proxy-Authorization", b"Authorization", b"Cookie")
            body = b"%s %s HTTP/%s\r\n%s\r\n" % (request.method, request.target, request.version, echoed.encode())
            content_type = b"message/http"
        else:
            body = b""
            content_type = b"text/plain"
        headers = Headers([(b"Content-Type", content_type), (b"Content-Length", b"%d" % len(body))])
        if request.method == b"OPTIONS":
            headers.add(b"Allow", b"GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH, CONNECT")
        self._respond_local(Response(200, b"OK", headers), body)
        return True

    def _connect_upstream(self, request: Request) -> None:
        # Nothing more is read from the client until the upstream is there
        # to take it: a request body must not pile up in memory.
        self._pause(_PAUSE_CONNECTING)
        d = self.factory.pool.connect((request.host, request.port))
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, conn: UpstreamConnection) -> None:
        if self._state == _CLOSED:
            self.factory.pool.release(conn)
            return
        self._resume(_PAUSE_CONNECTING)
        if self.factory.is_loop(conn.transport):
            conn.transport.loseConnection()
            self._respond_error(self._loop_error())
            return
        self._attach(conn)

    def _connect_failed(self, failure) -> None:
        if self._state == _CLOSED:
            return
        self._resume(_PAUSE_CONNECTING)
        request = self.exchange.request
        self._respond_error(connect_error(failure.value, f"{request.host}:{request.port}"))

    def _loop_error(self) -> ProxyError:
        request = self.exchange.request
        return ProxyError(403, "proxy_loop_detected",
                          "The request is addressed to this proxy itself (a forwarding loop)",
                          f"{request.host}:{request.port}")

    def _attach(self, conn: UpstreamConnection) -> None:
        self._upstream = conn
        self.exchange.upstream_address = conn.peer_host
        request = self.exchange.request
        conn.start(self, request.method, self._head_bytes, self._reader is not None)
        if self._state == _BODY and self._early:
            early, self._early = self._early, b""
            self._receive_body(early)

    # -- request body ------------------------------------------------------

    def _receive_body(self, data: bytes) -> None:
        upstream = self._upstream
        if upstream is None:
            # Still connecting (reading is paused): keep what came with the head.
            self._early += data
            return
        reader = self._reader
        try:
            if reader.chunked:
                rest = reader.read(data, self._send_chunk)
            else:
                rest = reader.read(data, upstream.write)
            self.exchange.bytes_received += len(data) - (len(rest) if rest else 0)
        except ProtocolError as e:
            self._upstream = None
            upstream.abort()
            if self._response_started:
                # A status is on the wire already; an error page cannot
                # follow it, only a cut connection.
                self.exchange.error = "http_request_error"
                self.transport.abortConnection()
            else:
                self._reject(e)
            return
        if rest is None:
            return
        if reader.chunked:
            trailers = reader.trailers
            if trailers is not None and len(trailers):
                trailers.discard(HOP_BY_HOP)
                upstream.write(b"0\r\n" + trailers.encode() + b"\r\n")
            else:
                upstream.write(LAST_CHUNK)
        upstream.request_complete()
        self._reader = None
        self._state = _WAIT
        self._buf += rest

    def _send_chunk(self, data: bytes) -> None:
        self._upstream.write_sequence(encode_chunk(data))

    # -- responses (called by UpstreamConnection) -------------------------

    def interim_response(self, response: Response) -> None:
        """Relay a 1xx to HTTP/1.1 clients (RFC 9110 §15.2)."""
        if self.exchange.request.version == b"1.1":
            write(self.transport, response_head_for_client(response, self.factory.via, []))

    def response_head(self, response: Response, reader: BodyReader | None) -> None:
        exchange = self.exchange
        exchange.response = response
        if not self._chain.response_hooks:
            self._send_head(response, reader)
            return
        # Filters see the head first; what the origin sends meanwhile is
        # held (and the origin paused) until they are done.
        self._held = []
        self._held_reader = reader
        self._phase_pending = True
        run_hooks(self._chain.response_hooks_for(exchange), exchange, self._response_phase_done,
                  self._filter_failed)
        if self._phase_pending and self._upstream is not None:
            self._upstream.pauseProducing()

    def _response_phase_done(self, replacement: Response | None) -> None:
        self._phase_pending = False
        held, self._held = self._held, None
        if self._state == _CLOSED or held is None:
            return
        conn = self._upstream
        if replacement is not None:
            # The origin's response is dropped for the filter's.
            if conn is not None:
                self._upstream = None
                conn.drop_response()
            if self._state == _BODY:
                self._keep_alive = False
            self._respond_local(replacement, b"" if replacement.body is None else replacement.body, filtered=True)
            return
        self._send_head(self.exchange.response, self._held_reader)
        for item in held:
            if isinstance(item, bytes):
                self.response_data(item)
            else:
                self.response_complete(item[0])
                return
        self.flush()
        if conn is not None and conn.handler is self:
            conn.resumeProducing()

    def _send_head(self, response: Response, reader: BodyReader | None) -> None:
        self._response_started = True
        framing: list[tuple[bytes, bytes]] = []
        has_body = reader is not None
        self._chunk_out = self._close_delimited_out = False
        # A filter that changed the body's length removed Content-Length:
        # then the body is framed here, as for a chunked origin response.
        if has_body and (reader.chunked or reader.ends_at_eof or b"content-length" not in response.headers):
            if self.exchange.request.version == b"1.1":
                self._chunk_out = True
                framing.append((b"Transfer-Encoding", b"chunked"))
            else:
                self._close_delimited_out = True
                self._keep_alive = False
        if not self._keep_alive:
            framing.append((b"Connection", b"close"))
        elif self.exchange.request.version == b"1.0":
            framing.append((b"Connection", b"keep-alive"))
        self._head_out = response_head_for_client(response, self.factory.via, framing)
        if has_body and self._upstream is not None:
            self._producer = self._upstream
            self.transport.registerProducer(self._producer, True)

    def response_data(self, data: bytes) -> None:
        if self._held is not None:
            self._held.append(data)
            return
        for _, name, hook in self._chain.body_hooks:
            try:
                data = hook(self.exchange, data)
            except Exception:
                self._filter_failed(name, Failure())
                return
            if not data:
                return
        self.exchange.bytes_sent += len(data)
        head, self._head_out = self._head_out, b""
        if self._chunk_out:
            pieces = encode_chunk(data)
            if head:
                pieces.insert(0, head)
            write_sequence(self.transport, pieces)
        elif head:
            write_sequence(self.transport, [head, data])
        else:
            write(self.transport, data)

    def splice_sink(self):
        """
        The upstream offers to move the rest of a body of known length
        inside the kernel: allow it (returning the client transport, whose
        reading is paused meanwhile) when the ``splice`` setting is on, the
        request is complete, the head is written, the body goes out as it
        comes (no filter sees it, no chunked framing) and both connections
        are plain TCP with nothing queued; else ``None``.
        """
        if (self._state != _WAIT or self._head_out or self._held is not None or self._chain.body_hooks
                or self._chunk_out or self._close_delimited_out or not self.factory.config.splice
                or self._upstream is None or not splice_available(self.transport, self._upstream.transport)):
            return None
        self._pause(_PAUSE_SPLICE)
        return self.transport

    def splice_ended(self, moved: int) -> None:
        """The kernel moved *moved* body bytes to the client; the transport is ours again."""
        if self.exchange is not None:
            self.exchange.bytes_sent += moved
        self._resume(_PAUSE_SPLICE)

    def _take_back_head(self) -> None:
        """
        The exchange fails: a response head not yet written is dropped, so
        that the client can still get an error page instead of a cut
        connection.
        """
        if self._head_out:
            self._head_out = b""
            self._response_started = False
            self._unregister_producer()

    def flush(self) -> None:
        """
        The upstream read that brought a response head is processed: write
        the head if no body bytes took it along (one write per read, not
        one per piece).
        """
        head, self._head_out = self._head_out, b""
        if head:
            write(self.transport, head)

    def response_complete(self, trailers: Headers | None) -> None:
        if self._held is not None:
            # The connection goes back to the pool now; the end waits.
            self._upstream = None
            self._held.append((trailers,))
            return
        # The upstream connection is back in the pool already: unregister it
        # before the last write, which could otherwise pause it there (the
        # next exchange on it would then never read its response).
        self._unregister_producer()
        end = b""
        if self._chunk_out:
            if trailers is not None and len(trailers):
                trailers.discard(HOP_BY_HOP)
                end = b"0\r\n" + trailers.encode() + b"\r\n"
            else:
                end = LAST_CHUNK
        head, self._head_out = self._head_out, b""
        if head or end:
            write(self.transport, head + end)
        self._upstream = None
        if self._state == _BODY:
            # The origin answered before the whole request body came; where
            # the next request would start is not worth finding out.
            self._keep_alive = False
        self._end_exchange()

    def upstream_failed(self, error: ProxyError, conn: UpstreamConnection) -> None:
        self._upstream = None
        self._take_back_head()
        if self._response_started:
            # The status is on the wire already.  With a Content-Length or
            # chunked body, a close short of the end tells the client it is
            # incomplete, so deliver what was relayed, then close; a
            # close-delimited body would look complete, so reset instead.
            self.exchange.error = error.error_type
            self._unregister_producer()
            self._state = _CLOSED
            self._finish_exchange()
            self.exchange = None
            if self._close_delimited_out:
                self.transport.abortConnection()
            else:
                self.transport.loseConnection()
            return
        if (conn.reused and not conn.got_response_bytes and not self._retried
                and self._reader is None and self.exchange.request.method in _IDEMPOTENT):
            # The origin closed an idle connection as we reused it: the
            # request was not processed, so it is safe to send again once.
            self._retried = True
            self._connect_upstream(self.exchange.request)
            return
        if self._state == _BODY:
            self._keep_alive = False
        self._respond_error(error)

    # -- responses made here ------------------------------------------------

    def _respond_error(self, error: ProxyError, filtered: bool = False) -> None:
        exchange = self.exchange
        exchange.error = error.error_type
        request = exchange.request
        accept = request.headers.get(b"accept") if request is not None else None
        response = error_response(error, accept, self.factory.via)
        self._respond_local(response, response.body, filtered)

    def _respond_local(self, response: Response, body: bytes, filtered: bool = False) -> None:
        """
        Send a whole response made by the proxy or a filter, and end the
        exchange.  Filters whose request hook ran see it first, unless
        *filtered* (it comes from them already).
        """
        exchange = self.exchange
        exchange.response = response
        if self._state == _BODY:
            # The rest of the request body will not be read.
            self._keep_alive = False
        hooks = () if filtered or not self._chain.response_hooks else self._chain.response_hooks_for(exchange)
        if hooks:
            self._phase_pending = True
            # The body waits here rather than in a closure made per response.
            self._local_body = body
            run_hooks(hooks, exchange, self._local_phase_done, self._filter_failed)
            if self._phase_pending:
                self._pause(_PAUSE_FILTERS)
            return
        self._write_local(response, body)

    def _local_phase_done(self, replacement: Response | None) -> None:
        self._phase_pending = False
        body, self._local_body = self._local_body, b""
        if self._state == _CLOSED:
            return
        self._resume(_PAUSE_FILTERS)
        if replacement is not None:
            self.exchange.response = replacement
            body = b"" if replacement.body is None else replacement.body
        self._write_local(self.exchange.response, body)

    def _write_local(self, response: Response, body: bytes) -> None:
        exchange = self.exchange
        request = exchange.request
        if request is not None and request.method == b"HEAD":
            body = b""
        framing = [] if self._keep_alive else [(b"Connection", b"close")]
        write(self.transport, response_head_for_client(response, None, framing) + body)
        exchange.bytes_sent = len(body)
        self._end_exchange()

    # -- end of an exchange -------------------------------------------------

    def _end_exchange(self) -> None:
        self._finish_exchange()
        self.exchange = None
        self._response_started = False
        if self._state == _CLOSED:
            return
        if not self._keep_alive:
            self._close_after_response()
            return
        self._state = _HEAD
        self._next_request()

    def _next_request(self) -> None:
        self._resume(_PAUSE_PIPELINE)
        if self._buf:
            pending = bytes(self._buf)
            self._buf.clear()
            # A call per pipelined request; bounded by PIPELINE_BUFFER.
            self._reactor.callLater(0, self._pipelined, pending)
        else:
            self._arm_idle_timer()

    def _pipelined(self, pending: bytes) -> None:
        if self._state == _HEAD:
            self._receive_head(pending)
        elif self._state != _CLOSED:
            self._buf[:0] = pending

    def _close_after_response(self) -> None:
        self._state = _CLOSED
        self._cancel_timers()
        if self._upstream is not None:
            upstream, self._upstream = self._upstream, None
            upstream.abort()
        # Half-close and keep reading (and dropping) a little while, so that
        # unread request bytes do not turn our close into a reset that could
        # destroy the response before the client reads it: see
        # writeConnectionLost.
        self._resume(_PAUSE_UPSTREAM | _PAUSE_PIPELINE | _PAUSE_CONNECTING)
        self.transport.loseWriteConnection()

    def _finish_exchange(self) -> None:
        """The exchange is over: tell the filters (the access log is one)."""
        exchange = self.exchange
        if exchange is None:
            return
        exchange.ended = self._reactor.seconds()
        if self._chain.done_hooks:
            self._chain.exchange_done(exchange)

    def _unregister_producer(self) -> None:
        if self._producer is not None:
            self._producer = None
            self.transport.unregisterProducer()

    # -- CONNECT ----------------------------------------------------------

    def _open_tunnel(self, request: Request, rest: bytes) -> None:
        self._keep_alive = False
        if request.port not in self.factory.config.connect_ports:
            self._respond_error(ProxyError(
                403, "http_request_denied",
                f"CONNECT is not allowed to port {request.port}", f"{request.host}:{request.port}"))
            return
        self._state = _WAIT
        self._early = rest
        self._pause(_PAUSE_CONNECTING)
        d = self.factory.pool.connect((request.host, request.port), TunnelUpstream())
        d.addCallbacks(self._tunnel_connected, self._connect_failed)

    def _tunnel_connected(self, upstream: TunnelUpstream) -> None:
        if self._state == _CLOSED:
            upstream.transport.loseConnection()
            return
        if self.factory.is_loop(upstream.transport):
            upstream.transport.loseConnection()
            self._resume(_PAUSE_CONNECTING)
            self._respond_error(self._loop_error())
            return
        exchange = self.exchange
        exchange.upstream_address = upstream.transport.getPeer().host
        exchange.response = Response(200, b"Connection established", Headers())
        write(self.transport, _CONNECTION_ESTABLISHED)
        self._state = _TUNNEL
        self._pause_bits = 0
        early, self._early, self._buf = self._early + bytes(self._buf), b"", bytearray()
        self._tunnel = upstream.tunnel = open_tunnel(
            self.transport, upstream.transport, self._tunnel_closed, early, self.factory.config.splice)

    def _tunnel_closed(self, tunnel: Tunnel | SpliceTunnel) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.bytes_sent = tunnel.bytes_down
            exchange.bytes_received = tunnel.bytes_up
            self._finish_exchange()
            self.exchange = None

    # -- timers, flow control, shutdown -------------------------------------

    def _set_timer(self, seconds: float, action) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._reactor.callLater(seconds, action)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _cancel_timers(self) -> None:
        """The connection is closing: no timer of it may fire any more."""
        self._cancel_timer()
        if self._idle_timer is not None:
            if self._idle_timer.active():
                self._idle_timer.cancel()
            self._idle_timer = None

    def _arm_idle_timer(self) -> None:
        timer = self._idle_timer
        if timer is not None and timer.active():
            timer.reset(self.factory.config.timeouts.client_idle)
        else:
            self._idle_timer = self._reactor.callLater(self.factory.config.timeouts.client_idle, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self._idle_timer = None
        if self.exchange is None and self._state == _HEAD and not self._buf:
            self.transport.loseConnection()

    def _header_timeout(self) -> None:
        """RFC 9110 §15.5.9: the head did not arrive in time."""
        self._timer = None
        self._new_exchange()
        self._buf.clear()
        self._keep_alive = False
        self._respond_error(ProxyError(408, "http_request_error", "The request head did not arrive in time"))

    def _pause(self, bit: int) -> None:
        if not self._pause_bits:
            self.transport.pauseProducing()
        self._pause_bits |= bit

    def _resume(self, bits: int) -> None:
        if self._pause_bits & bits:
            self._pause_bits &= ~bits
            if not self._pause_bits:
                self.transport.resumeProducing()

    def pauseProducing(self) -> None:
        """The upstream's send buffer is full: stop reading the client."""
        self._pause(_PAUSE_UPSTREAM)

    def resumeProducing(self) -> None:
        self._resume(_PAUSE_UPSTREAM)

    def stopProducing(self) -> None:
        pass

    def shutdown(self) -> None:
        """
        Stop after the exchange in progress: an idle connection closes now,
        a busy one after its response (``Connection: close``).
        """
        self._stopping = True
        self._keep_alive = False
        if self._state == _HEAD and not self._buf:
            self.transport.loseConnection()

    def abort(self) -> None:
        """Close at once (the shutdown grace period is over)."""
        if self._tunnel is not None:
            self._tunnel.abort()
        if self._upstream is not None:
            # First: a body it is splicing shares this transport's descriptor.
            upstream, self._upstream = self._upstream, None
            upstream.abort()
        self.transport.abortConnection()


class ProxyFactory(Factory):
    """
    The proxy, ready to listen: ``endpoint.listen(ProxyFactory(config))``.

    :ivar config: the :class:`~proxyframe.config.Config`.
    :ivar pool: the shared :class:`UpstreamPool`.
    :ivar reactor: the reactor used for every timer and connection.
    """

    noisy = False

    def __init__(self, config: Config | None = None, reactor=None, chain: Chain | None = None) -> None:
        """
        :param config: the configuration; ``None`` for the safe default.
        :param reactor: the reactor; ``None`` for the global one (tests pass
            their own).
        :param chain: the filter chain, if already built from *config*;
            else it is built here.
        :raises proxyframe.config.ConfigError: a configured filter is not
            found or refuses its options.
        """
        if reactor is None:
            from twisted.internet import reactor
        self.config = config if config is not None else Config()
        self.reactor = reactor
        self.chain = chain if chain is not None else build_chain(self.config, reactor)
        self.via = self.config.via.encode("ascii")
        self.pool = UpstreamPool(reactor, self.config)
        self.connections: set[ProxyServer] = set()
        self._listening: set[tuple[str, int]] = set()
        self._listening_ports: set[int] = set()
        self._drained: Deferred | None = None
        self._stopping = False

    def buildProtocol(self, addr) -> ProxyServer | None:
        if self._stopping:
            return None
        return ProxyServer(self)

    def connection_made(self, proto: ProxyServer, local) -> None:
        """Track a new client connection and the address it reached us on."""
        self.connections.add(proto)
        self._listening.add((local.host, local.port))
        self._listening_ports.add(local.port)

    def connection_lost(self, proto: ProxyServer) -> None:
        self.connections.discard(proto)
        if self._drained is not None and not self.connections:
            d, self._drained = self._drained, None
            d.callback(None)

    def listening_on(self, address) -> None:
        """Record a listening address (for loop detection before any client)."""
        self._listening.add((address.host, address.port))
        self._listening_ports.add(address.port)

    def is_loop(self, upstream_transport) -> bool:
        """
        Whether a new upstream connection leads back to this proxy: its
        peer is one of our listening addresses, or has one of our listening
        ports on the very address the connection left from (this machine,
        when we listen on a wildcard address).
        """
        # The socket's own view: getPeer() gives the address dialled, and
        # dialling 0.0.0.0 reaches this machine.
        sock = upstream_transport.getHandle()
        peer_host, peer_port = sock.getpeername()[:2]
        if (peer_host, peer_port) in self._listening:
            return True
        return peer_port in self._listening_ports and peer_host == sock.getsockname()[0]

    def shutdown(self, grace: float) -> Deferred:
        """
        Stop taking connections, let exchanges in progress finish for up to
        *grace* seconds, then abort what is left.

        :returns: a ``Deferred`` firing when every client connection is gone.
        """
        self._stopping = True
        self.pool.close_idle()
        for proto in list(self.connections):
            proto.shutdown()
        if not self.connections:
            return succeed(None)
        self._drained = Deferred()
        timer = self.reactor.callLater(grace, self._abort_all)
        self._drained.addBoth(lambda r: timer.cancel() if timer.active() else None)
        return self._drained

    def _abort_all(self) -> None:
        for proto in list(self.connections):
            proto.abort()

