#!/usr/bin/env python3
"""
CPU cost of proxyframe's own code per keep-alive exchange, without sockets.

A :class:`~proxyframe.protocol.server.ProxyServer` and a pooled
:class:`~proxyframe.protocol.upstream.UpstreamConnection` are joined to
in-memory transports (``twisted.internet.testing.StringTransport``); each
round feeds one absolute-form GET to the client side and one small response
to the upstream side, and checks what came out.  What this measures is the
Python work of relaying (parsing, header rewriting, the filter chain,
bookkeeping); what it leaves out is the kernel and the reactor's dispatch,
which ``benchmarks/run.py`` includes.

    python benchmarks/hotpath.py                    # µs per exchange, default chain
    python benchmarks/hotpath.py --filters none     # no filters
    python benchmarks/hotpath.py --filters cache    # acl, accesslog, cache (hits)
    python benchmarks/hotpath.py --profile          # and the functions that cost most

Run from the repository root with proxyframe's dependencies importable.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.testing import MemoryReactorClock, StringTransport  # noqa: E402

from proxyframe.chain import build_chain  # noqa: E402
from proxyframe.config import Config, FilterEntry, config_from_dict  # noqa: E402
from proxyframe.protocol.server import ProxyFactory  # noqa: E402
from proxyframe.protocol.upstream import UpstreamConnection  # noqa: E402

ORIGIN = ("127.0.0.1", 9)
REQUEST = (b"GET http://127.0.0.1:9/small HTTP/1.1\r\nHost: 127.0.0.1:9\r\n"
           b"User-Agent: wrk\r\nAccept: */*\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 30 Nov 2026 09:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 1024\r\nConnection: keep-alive\r\n"
            b"Cache-Control: %s\r\n\r\n" + b"x" * 1024)
CHAINS = {
    "none": [],
    "default": None,
    "cache": [{"use": "acl", "default": "deny",
               "rules": [{"action": "allow", "clients": ["127.0.0.0/8"]}]},
              {"use": "accesslog", "path": os.devnull}, {"use": "cache"}],
}


class _Handle:
    """What ``is_loop`` reads from a connected socket."""

    def getpeername(self):
        return ORIGIN

    def getsockname(self):
        return ("127.0.0.1", 40000)


class _Transport(StringTransport):
    """A TCP transport in memory: what the protocols call on a real one."""

    def getHandle(self):
        return _Handle()

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


def setup(filters: str):
    entries = CHAINS[filters]
    if entries is None:
        config = Config()
    else:
        config = config_from_dict({"filter": entries})
    reactor = MemoryReactorClock()
    if filters == "default":
        # The default chain, with the access log kept off the terminal.
        config = config.replace(filters=(config.filters[0], FilterEntry("accesslog", {"path": os.devnull})))
    factory = ProxyFactory(config, reactor, build_chain(config, reactor))
    client = _Transport(peerAddress=_address("127.0.0.1", 50000), hostAddress=_address("127.0.0.1", 8080))
    server = factory.buildProtocol(None)
    server.makeConnection(client)
    upstream = UpstreamConnection(factory.pool, ORIGIN)
    upstream.makeConnection(_Transport(peerAddress=_address(*ORIGIN)))
    factory.pool.release(upstream)
    return server, client, upstream


def _address(host: str, port: int):
    from twisted.internet.address import IPv4Address

    return IPv4Address("TCP", host, port)


def run(server, client, upstream, rounds: int, response: bytes) -> None:
    for _ in range(rounds):
        server.dataReceived(REQUEST)
        if upstream.transport.value():
            upstream.transport.clear()
            upstream.dataReceived(response)
        out = client.value()
        if not out.endswith(b"x" * 1024):
            raise SystemExit(f"unexpected response: {out[:300]!r}")
        client.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--filters", choices=sorted(CHAINS), default="default")
    parser.add_argument("--rounds", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5, help="measurements; the best is reported")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    response = RESPONSE % (b"max-age=3600" if args.filters == "cache" else b"no-store")
    server, client, upstream = setup(args.filters)
    run(server, client, upstream, 200, response)
    best = min(_timed(server, client, upstream, args.rounds, response) for _ in range(args.repeat))
    print(f"{args.filters}: {best * 1e6 / args.rounds:.1f} µs of CPU per exchange (best of {args.repeat})")
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(run, server, client, upstream, args.rounds, response)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)


def _timed(server, client, upstream, rounds: int, response: bytes) -> float:
    start = time.process_time()
    run(server, client, upstream, rounds, response)
    return time.process_time() - start


if __name__ == "__main__":
    main()
