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
    python benchmarks/hotpath.py --filters filters  # acl, auth (Basic, cached), accesslog
    python benchmarks/hotpath.py --profile          # and the functions that cost most

Run from the repository root with proxyframe's dependencies importable.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import os
import pstats
import queue
import sys
import tempfile
import time

import bcrypt

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.testing import MemoryReactorClock, StringTransport  # noqa: E402
from twisted.python.threadpool import ThreadPool  # noqa: E402

from proxyframe.chain import build_chain  # noqa: E402
from proxyframe.config import Config, FilterEntry, config_from_dict  # noqa: E402
from proxyframe.protocol.server import ProxyFactory  # noqa: E402
from proxyframe.protocol.upstream import UpstreamConnection  # noqa: E402

ORIGIN = ("127.0.0.1", 9)
REQUEST = (b"GET http://127.0.0.1:9/small HTTP/1.1\r\nHost: 127.0.0.1:9\r\n"
           b"User-Agent: wrk\r\nAccept: */*\r\n\r\n")
# The "filters" chain's user (as in benchmarks/run.py's proxyframe-filters).
AUTH_USER, AUTH_PASSWORD = b"bench", b"bench-password"
AUTH_REQUEST = REQUEST[:-2] + b"Proxy-Authorization: Basic %s\r\n\r\n" % base64.b64encode(
    AUTH_USER + b":" + AUTH_PASSWORD)
ACL = {"use": "acl", "default": "deny", "rules": [{"action": "allow", "clients": ["127.0.0.0/8"]}]}
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 30 Nov 2026 09:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 1024\r\nConnection: keep-alive\r\n"
            b"Cache-Control: %s\r\n\r\n" + b"x" * 1024)
CHAINS = {
    "none": [],
    "default": None,
    "cache": [ACL, {"use": "accesslog", "path": os.devnull}, {"use": "cache"}],
    # auth's htpasswd_file is written by setup(); cache_ttl is the default.
    "filters": [ACL, {"use": "auth", "realm": "bench"}, {"use": "accesslog", "path": os.devnull}],
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


class _Reactor(MemoryReactorClock):
    """
    A memory reactor with a real thread pool, for the auth filter's
    password check: results come back through :meth:`callFromThread` into
    a queue that :meth:`run_from_threads` runs on the calling thread.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pool = ThreadPool(1, 1, "hotpath")
        self._from_threads: queue.SimpleQueue = queue.SimpleQueue()

    def getThreadPool(self) -> ThreadPool:
        if not self._pool.started:
            self._pool.start()
        return self._pool

    def callFromThread(self, f, *args, **kwargs) -> None:
        self._from_threads.put((f, args, kwargs))

    def run_from_threads(self, timeout: float) -> None:
        """Wait for one call from a thread (up to *timeout* seconds) and run it."""
        f, args, kwargs = self._from_threads.get(timeout=timeout)
        f(*args, **kwargs)

    def stop_threads(self) -> None:
        if self._pool.started:
            self._pool.stop()


def setup(filters: str, tmp: str):
    """
    :param tmp: a directory for files the chain needs (the htpasswd file).
    :returns: ``(server, client, upstream, request, reactor)``: the client
        side, its transport, the pooled upstream connection, the request to
        send (with ``Proxy-Authorization`` when the chain has ``auth``, whose
        first check has then completed), and the reactor.
    """
    entries = CHAINS[filters]
    request = REQUEST
    if entries is None:
        config = Config()
    else:
        if any(entry["use"] == "auth" for entry in entries):
            entries = [dict(entry, htpasswd_file=_htpasswd(tmp)) if entry["use"] == "auth" else entry
                       for entry in entries]
            request = AUTH_REQUEST
        config = config_from_dict({"filter": entries})
    reactor = _Reactor()
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
    if request is AUTH_REQUEST:
        _first_exchange(reactor, server, client, upstream)
    return server, client, upstream, request, reactor


def _htpasswd(tmp: str) -> str:
    """An htpasswd file with the one user (bcrypt, cost 10, as ``benchmarks/run.py`` writes it)."""
    path = os.path.join(tmp, "users.htpasswd")
    with open(path, "wb") as f:
        f.write(AUTH_USER + b":" + bcrypt.hashpw(AUTH_PASSWORD, bcrypt.gensalt(rounds=10)) + b"\n")
    return path


def _first_exchange(reactor: _Reactor, server, client, upstream) -> None:
    """
    The first request with the credentials: the auth filter checks the
    password (bcrypt) in a thread and caches the success; the measured
    exchanges that follow are cache hits, as on a proxy under load.
    """
    server.dataReceived(AUTH_REQUEST)
    if upstream.transport.value():
        raise SystemExit("the first request was forwarded before its credentials were checked")
    reactor.run_from_threads(timeout=30)
    if not upstream.transport.value():
        raise SystemExit(f"the first request was not forwarded: {client.value()[:300]!r}")
    upstream.transport.clear()
    upstream.dataReceived(RESPONSE % b"no-store")
    if not client.value().endswith(b"x" * 1024):
        raise SystemExit(f"unexpected response: {client.value()[:300]!r}")
    client.clear()


def _address(host: str, port: int):
    from twisted.internet.address import IPv4Address

    return IPv4Address("TCP", host, port)


def run(server, client, upstream, rounds: int, response: bytes, request: bytes = REQUEST) -> None:
    for _ in range(rounds):
        server.dataReceived(request)
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
    with tempfile.TemporaryDirectory(prefix="hotpath.") as tmp:
        server, client, upstream, request, reactor = setup(args.filters, tmp)
        try:
            exchange = (server, client, upstream, args.rounds, response, request)
            run(server, client, upstream, 200, response, request)
            best = min(_timed(*exchange) for _ in range(args.repeat))
            print(f"{args.filters}: {best * 1e6 / args.rounds:.1f} µs of CPU per exchange (best of {args.repeat})")
            if args.profile:
                profile = cProfile.Profile()
                profile.runcall(run, *exchange)
                pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        finally:
            reactor.stop_threads()


def _timed(server, client, upstream, rounds: int, response: bytes, request: bytes) -> float:
    start = time.process_time()
    run(server, client, upstream, rounds, response, request)
    return time.process_time() - start


if __name__ == "__main__":
    main()
