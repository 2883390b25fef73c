"""
A CONNECT tunnel (RFC 9110 §9.3.6): after the 2xx, the proxy relays bytes
both ways unchanged until both sides are done.

Each transport is registered as the other's streaming producer, so a side
that reads slowly pauses the side that writes.  An end-of-stream from one
side is passed on as a half-close (``shutdown(SHUT_WR)``) to the other, and
the tunnel closes once both directions have ended or either connection is
lost.  :func:`open_tunnel` prefers :class:`~proxyframe.protocol.splice.SpliceTunnel`
(the same relay inside the kernel) where it can be used.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from proxyframe.protocol.sending import write
from proxyframe.protocol.splice import SpliceTunnel, splice_available

__all__ = ["Tunnel", "TunnelUpstream", "open_tunnel"]


def open_tunnel(client, upstream, on_closed: Callable, early: bytes, splice: bool) -> Tunnel | SpliceTunnel:
    """
    Start relaying between two connected transports.

    :param client: the client's transport, the 2xx already written to it.
    :param upstream: the upstream's transport.
    :param on_closed: called once, with the tunnel, when it is over.
    :param early: bytes the client sent after the CONNECT head, before the
        2xx: they go upstream first.
    :param splice: relay with ``splice(2)`` where :func:`splice_available`
        allows (the ``splice`` setting); otherwise, or when no pipe
        can be made (``EMFILE``), through Python with :class:`Tunnel`.
    :returns: the tunnel; its ``bytes_up`` count includes *early*.
    """
    if early:
        write(upstream, early)
    if splice and splice_available(client, upstream):
        try:
            return SpliceTunnel(client, upstream, on_closed, bytes_up=len(early))
        except OSError:
            pass
    relay = Tunnel(client, upstream, on_closed)
    relay.bytes_up = len(early)
    client.resumeProducing()
    return relay


class Tunnel:
    """
    The splice between a client transport and an upstream transport.

    :ivar bytes_up: bytes relayed client → upstream (``int``).
    :ivar bytes_down: bytes relayed upstream → client (``int``).
    """

    def __init__(self, client, upstream, on_closed: Callable[[Tunnel], object]) -> None:
        """
        :param client: the client's transport.
        :param upstream: the upstream's transport.
        :param on_closed: called once, with this tunnel, when it is over.
        """
        self.client = client
        self.upstream = upstream
        self.bytes_up = 0
        self.bytes_down = 0
        self._on_closed: Callable[[Tunnel], object] | None = on_closed
        self._client_eof = False
        self._upstream_eof = False
        client.registerProducer(upstream, True)
        upstream.registerProducer(client, True)

    def from_client(self, data: bytes) -> None:
        self.bytes_up += len(data)
        write(self.upstream, data)

    def from_upstream(self, data: bytes) -> None:
        self.bytes_down += len(data)
        write(self.client, data)

    def client_eof(self) -> None:
        """The client will send no more: pass the end on upstream."""
        self._client_eof = True
        self.upstream.unregisterProducer()
        self.upstream.loseWriteConnection()
        self._maybe_done()

    def upstream_eof(self) -> None:
        """The upstream will send no more: pass the end on to the client."""
        self._upstream_eof = True
        self.client.unregisterProducer()
        self.client.loseWriteConnection()
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._client_eof and self._upstream_eof:
            self.close()

    def close(self) -> None:
        """
        End the tunnel: both connections are closed after what was already
        written to them is flushed.
        """
        if self._on_closed is None:
            return
        on_closed, self._on_closed = self._on_closed, None
        for transport in (self.client, self.upstream):
            transport.unregisterProducer()
            transport.loseConnection()
        on_closed(self)

    def abort(self) -> None:
        """End the tunnel at once (shutdown grace expired)."""
        self.client.abortConnection()
        self.upstream.abortConnection()
        self.close()


@implementer(IHalfCloseableProtocol)
class TunnelUpstream(Protocol):
    """
    The upstream end of a tunnel.  Until :attr:`tunnel` is set, nothing
    should arrive (the origin has not been told anything yet).
    """

    tunnel: Tunnel | None = None

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        self.tunnel.from_upstream(data)

    def readConnectionLost(self) -> None:
        if self.tunnel is not None:
            self.tunnel.upstream_eof()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason) -> None:
        if self.tunnel is not None:
            self.tunnel.close()
