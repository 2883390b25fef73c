#!/usr/bin/env python3
"""
The least a Twisted relay can cost: a floor for benchmarks/run.py.

Each client connection gets its own connection to one fixed origin, and
bytes are copied both ways unchanged: no HTTP parsing, no header rewriting,
no pool, no filters, no timers, no logging.  What it costs per exchange
(one read and one write on each side, the reactor's dispatch, the kernel's
loopback TCP) is what any proxy written on Twisted pays before doing
anything; ``run.py`` measures it beside Squid and proxyframe in the same
run, so that the gap between proxyframe and Squid can be split into what
Twisted and CPython cost and what proxyframe's own work costs.

It is not a proxy: it forwards absolute-form requests to the origin as they
are (nginx accepts them), and it serves one client per origin connection.

    python benchmarks/twisted_relay.py LISTEN_PORT ORIGIN_PORT

It listens on 127.0.0.1 and runs on ``proxyframe.reactor.ProxyReactor``,
the reactor ``twistd proxyframe`` installs, so that the comparison is fair.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxyframe.reactor import ProxyReactor  # noqa: E402

from twisted.internet.main import installReactor  # noqa: E402

installReactor(ProxyReactor())

from twisted.internet import reactor  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402

HOST = "127.0.0.1"


class OriginSide(Protocol):
    """The origin connection of one client: copies what the origin sends."""

    client: ClientSide

    def dataReceived(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connectionLost(self, reason) -> None:
        self.client.transport.loseConnection()


class ClientSide(Protocol):
    """One client: reading waits until its origin connection is up."""

    origin: OriginSide | None = None

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        endpoint = TCP4ClientEndpoint(reactor, HOST, self.factory.origin_port)
        endpoint.connect(Factory.forProtocol(OriginSide)).addCallbacks(
            self._connected, lambda _: self.transport.loseConnection())

    def _connected(self, origin: OriginSide) -> None:
        self.origin = origin
        origin.client = self
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        self.origin.transport.write(data)

    def connectionLost(self, reason) -> None:
        if self.origin is not None:
            self.origin.transport.loseConnection()


def main() -> None:
    listen_port, origin_port = int(sys.argv[1]), int(sys.argv[2])
    factory = Factory.forProtocol(ClientSide)
    factory.origin_port = origin_port
    reactor.listenTCP(listen_port, factory, interface=HOST)
    reactor.run()


if __name__ == "__main__":
    main()
