"""
The ``twistd proxyframe`` command: its options and ``makeService``.

``--config FILE`` reads a TOML file (see :mod:`proxyframe.config`);
``--listen ENDPOINT`` (repeatable) replaces the configured listeners with
Twisted server endpoint strings; ``--list-filters`` prints the filter
plugins found and where each comes from, then exits.  A bad config, or a
filter that is not found or refuses its options, is reported as a usage
error naming the file and key, never with a traceback.
"""

from __future__ import annotations

import os
import sys

from twisted.application.service import Service
from twisted.internet.defer import DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from proxyframe.chain import Chain, build_chain, find_filter_factories, plugin_origin
from proxyframe.config import Config, ConfigError, load_config
from proxyframe.protocol.server import ProxyFactory

__all__ = ["Options", "ProxyService", "makeService"]


class Options(usage.Options):
    """Command-line options of ``twistd proxyframe``."""

    synopsis = "[--config FILE] [--listen ENDPOINT ...] [--list-filters]"
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: built-in safe defaults)"],
    ]
    optFlags = [
        ["list-filters", None, "print the filter plugins found (with the config's plugin_paths) and exit"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """
        Listen on this Twisted server endpoint, e.g.
        tcp:8080:interface=127.0.0.1 (repeatable; replaces the config's
        listen list)
        """
        self["listen"].append(endpoint)

    def postOptions(self) -> None:
        try:
            config = load_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self["listen"]:
            config = config.replace(listen=tuple(self["listen"]))
        from twisted.internet import reactor
        try:
            if self["list-filters"]:
                self._list_filters(config)
            self["proxy_chain"] = build_chain(config, reactor)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        self["proxy_config"] = config

    @staticmethod
    def _list_filters(config: Config) -> None:
        problems: list[str] = []
        for name, factory in sorted(find_filter_factories(config, problems).items()):
            description = getattr(factory, "description", "")
            print(f"{name:16} {description}\n{'':16} from {plugin_origin(factory)}")
        for line in problems:
            print(line)
        sys.exit(0)


class ProxyService(Service):
    """
    Listens on every configured endpoint with one :class:`ProxyFactory`.

    Stopping it (SIGTERM, SIGINT) stops accepting at once, lets exchanges
    in progress finish for up to ``timeouts.shutdown_grace`` seconds, then
    aborts what is left.  A listener that cannot be opened stops the
    process with exit status 1 and a one-line reason.
    """

    _log = Logger()

    def __init__(self, config: Config, reactor=None, chain: Chain | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.config = config
        self.reactor = reactor
        self.factory = ProxyFactory(config, reactor, chain)
        self._ports: list = []

    def startService(self) -> None:
        super().startService()
        for description in self.config.listen:
            try:
                endpoint = serverFromString(self.reactor, description)
            except (ValueError, TypeError, KeyError) as e:
                self._cannot_listen(description, f"not a valid endpoint: {e}")
                return
            d = endpoint.listen(self.factory)
            d.addCallbacks(self._listening, lambda f, desc=description: self._cannot_listen(desc, f.getErrorMessage()))

    def _listening(self, port) -> None:
        self._ports.append(port)
        address = port.getHost()
        self.factory.listening_on(address)
        self._log.info("proxyframe listening on {host}:{port}", host=address.host, port=address.port)

    def _cannot_listen(self, description: str, why: str) -> None:
        self._log.error("proxyframe cannot listen on {endpoint}: {why}", endpoint=description, why=why)
        self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def stopService(self):
        super().stopService()
        ports, self._ports = self._ports, []
        d = DeferredList([port.stopListening() for port in ports])
        d.addCallback(lambda _: self.factory.shutdown(self.config.timeouts.shutdown_grace))
        return d


def makeService(options: Options) -> ProxyService:
    """The twistd entry point: a :class:`ProxyService` from the options."""
    return ProxyService(options["proxy_config"], chain=options["proxy_chain"])
