"""
Run proxyframe inside your own Twisted program.

    python embed.py [--listen ENDPOINT] [--config FILE]

It listens on one Twisted server endpoint (by default
tcp:8080:interface=127.0.0.1), prints "listening on HOST:PORT" once the
port is open, writes the access log to standard error, and on SIGTERM or
Ctrl-C (SIGINT) stops accepting, lets requests in progress finish, and
exits with status 0.
"""

from __future__ import annotations

import argparse
import sys

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.logger import globalLogBeginner, textFileLogObserver

from proxyframe import ConfigError, ProxyFactory, load_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="proxyframe embedded in a Twisted program")
    parser.add_argument("--listen", default="tcp:8080:interface=127.0.0.1", metavar="ENDPOINT",
                        help="Twisted server endpoint (default: %(default)s)")
    parser.add_argument("--config", metavar="FILE", help="proxyframe TOML configuration file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config)  # None: the built-in safe defaults
    except ConfigError as e:
        print(f"embed.py: {e}", file=sys.stderr)
        return 2

    # Send Twisted's log (and so the proxy's access log) to stderr; leave
    # print() alone so that our own output stays on stdout.
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)

    factory = ProxyFactory(config)
    try:
        endpoint = serverFromString(reactor, args.listen)
    except ValueError as e:
        print(f"embed.py: not a valid endpoint {args.listen!r}: {e}", file=sys.stderr)
        return 2
    status = 0

    def listening(port) -> None:
        address = port.getHost()
        # Lets the proxy refuse requests addressed to itself (a loop).
        factory.listening_on(address)
        print(f"listening on {address.host}:{address.port}", flush=True)
        # The reactor handles SIGTERM and SIGINT by shutting down; "before
        # shutdown" triggers may return a Deferred, which it waits for.
        reactor.addSystemEventTrigger("before", "shutdown", stop, port)

    def stop(port):
        d = port.stopListening()
        d.addCallback(lambda _: factory.shutdown(config.timeouts.shutdown_grace))
        return d

    def cannot_listen(failure) -> None:
        nonlocal status
        status = 1
        print(f"embed.py: cannot listen on {args.listen}: {failure.getErrorMessage()}", file=sys.stderr)
        reactor.stop()

    # Listen once the reactor runs, so that cannot_listen can stop it even
    # when the endpoint fails at once (port in use).
    reactor.callWhenRunning(lambda: endpoint.listen(factory).addCallbacks(listening, cannot_listen))
    reactor.run()
    return status


if __name__ == "__main__":
    sys.exit(main())
