"""
The ``twistd proxyframe`` command: its options and ``makeService``.

``--config FILE`` reads a TOML file (see :mod:`proxyframe.config`);
``--listen ENDPOINT`` (repeatable) replaces the configured listeners with
Twisted server endpoint strings; ``--list-filters`` prints the filter
plugins found and where each comes from, then exits.  A bad config, or a
filter that is not found or refuses its options, is reported as a usage
error naming the file and key, never with a traceback.

``makeService`` returns a :class:`ProxyService` (one process serving) for
``workers = 1``, and otherwise a :class:`WorkersService`: a supervisor that
opens the listening sockets and runs that many worker processes on them
(:mod:`proxyframe.workers`, :mod:`proxyframe.worker`).  With workers, each
process has its own memory: its own memory cache store, cache and access
log counters, and upstream pool; the Redis cache store is the one they
share.  The options still build the filter chain once in this process, so
that a bad filter option is a usage error before anything starts; the
supervisor does not run exchanges through that chain.

Metrics: when the chain has a ``metrics`` filter
(:mod:`proxyframe.plugins.pf_metrics`), the process that opens the proxy's
listening sockets also serves ``/metrics`` on the filter's ``listen``
option: the one process with ``workers = 1``, from that filter's own
counts; the supervisor with ``workers = N``, which makes a private
directory (mode 0700, removed at stop) for prometheus-client's
multiprocess mode, passes it to every worker in ``PROMETHEUS_MULTIPROC_DIR``
and serves the sum of what they write there.  The choice is made here, not
in the filter's ``build``, because every process builds the chain (the
supervisor to check the config, each worker to serve) and only one of them
may bind the port; the workers never do.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import threading

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.protocol import ServerFactory
from twisted.internet.tcp import Port
from twisted.logger import Logger
from twisted.python import usage

from proxyframe.chain import Chain, build_chain, find_filter_factories, plugin_origin
from proxyframe.config import Config, ConfigError, load_config
from proxyframe.protocol.server import ProxyFactory
from proxyframe.reactor import install_unless_chosen
from proxyframe.workers import Workers

__all__ = ["Options", "ProxyService", "WorkersService", "makeService", "metrics_filter", "worker_count"]

#: The name of the first-party metrics filter (``[[filter]] use = "metrics"``).
METRICS_FILTER = "metrics"
#: The environment variable prometheus-client reads, when it is imported, to
#: keep its values in per-process files in that directory.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def metrics_filter(chain: Chain | None):
    """
    :returns: the chain's ``metrics`` filter (a
        :class:`proxyframe.plugins.pf_metrics.Metrics`: its ``listen``
        option and a ``site()`` serving ``/metrics``), or ``None`` when the
        config has none.  Found by name among the ``exchange_done`` hooks,
        the only hook it implements.
    """
    if chain is None:
        return None
    for _, name, hook in chain.done_hooks:
        if name == METRICS_FILTER:
            return getattr(hook, "__self__", None)
    return None


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
        install_unless_chosen()
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


class _ListeningService(Service):
    """
    Opens every configured endpoint with :attr:`factory`.  A listener that
    cannot be opened stops the process with exit status 1 and a one-line
    reason, so a proxy never runs on only some of its listeners.
    """

    _log = Logger()

    def __init__(self, config: Config, reactor, factory) -> None:
        self.config = config
        self.reactor = reactor
        self.factory = factory
        self._ports: list = []
        self._failed = False
        #: The chain's ``metrics`` filter, when this process serves /metrics.
        self.metrics = None
        self._metrics_port = None

    def startService(self) -> None:
        super().startService()
        listening = []
        for description in self.config.listen:
            try:
                endpoint = serverFromString(self.reactor, description)
            except (ValueError, TypeError, KeyError) as e:
                self._cannot_listen(description, f"not a valid endpoint: {e}")
                return
            why = self._unusable(endpoint)
            if why is not None:
                self._cannot_listen(description, why)
                return
            d = self._open(endpoint)
            d.addCallbacks(self._listening, lambda f, desc=description: self._cannot_listen(desc, f.getErrorMessage()))
            listening.append(d)
        if self.metrics is not None:
            d = self._serve_metrics()
            if d is None:
                return
            listening.append(d)
        gatherResults(listening).addCallback(lambda _: None if self._failed else self._all_listening())

    def _metrics_site(self):
        """:returns: the ``Site`` that serves ``/metrics`` from this process."""
        return self.metrics.site(self.reactor)

    def _serve_metrics(self) -> Deferred | None:
        """
        Listen on the metrics filter's ``listen`` endpoint (checked when
        the filter was built) and log the address, once, as ``proxyframe
        metrics at http://HOST:PORT/metrics``.

        :returns: a ``Deferred`` firing when it listens (or has failed, which
            stops the process like any listener), or ``None`` when the
            endpoint cannot even be made.
        """
        description = self.metrics.listen
        what = f"{description} (metrics)"
        try:
            endpoint = serverFromString(self.reactor, description)
        except (ValueError, TypeError, KeyError) as e:
            self._cannot_listen(what, f"not a valid endpoint: {e}")
            return None
        try:
            site = self._metrics_site()
        except Exception as e:  # the directory vanished, say: a reason, not a traceback
            self._cannot_listen(what, str(e))
            return None
        d = endpoint.listen(site)
        d.addCallbacks(self._metrics_listening, lambda f: self._cannot_listen(what, f.getErrorMessage()))
        return d

    def _metrics_listening(self, port) -> None:
        self._metrics_port = port
        address = port.getHost()
        host = getattr(address, "host", None)
        if host is None:  # a UNIX socket
            self._log.info("proxyframe metrics at {path} (GET /metrics)", path=getattr(address, "name", address))
            return
        host = f"[{host}]" if ":" in host else host
        self._log.info("proxyframe metrics at http://{host}:{port}/metrics", host=host, port=address.port)

    def _unusable(self, endpoint) -> str | None:
        """:returns: why *endpoint* cannot be used here, or ``None``."""
        return None

    def _open(self, endpoint) -> Deferred:
        """Listen on *endpoint*: :returns: a ``Deferred`` firing with the listening port."""
        return endpoint.listen(self.factory)

    def _listening(self, port) -> None:
        self._ports.append(port)
        address = port.getHost()
        self._log.info("proxyframe listening on {host}:{port}", host=address.host, port=address.port)

    def _all_listening(self) -> None:
        """Called once every endpoint listens."""

    def _cannot_listen(self, description: str, why: str) -> None:
        self._failed = True
        self._log.error("proxyframe cannot listen on {endpoint}: {why}", endpoint=description, why=why)
        self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def _stop_listening(self) -> Deferred:
        ports, self._ports = self._ports, []
        if self._metrics_port is not None:
            ports.append(self._metrics_port)
            self._metrics_port = None
        return DeferredList([maybeDeferred(port.stopListening) for port in ports])


class ProxyService(_ListeningService):
    """
    Listens on every configured endpoint with one :class:`ProxyFactory`
    (``workers = 1``).

    Stopping it (SIGTERM, SIGINT) stops accepting at once, lets exchanges
    in progress finish for up to ``timeouts.shutdown_grace`` seconds, then
    aborts what is left.  A listener that cannot be opened stops the
    process with exit status 1 and a one-line reason.

    With a ``metrics`` filter in the chain, it also serves ``/metrics``
    (that filter's counts) on the filter's ``listen`` endpoint.
    """

    def __init__(self, config: Config, reactor=None, chain: Chain | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        super().__init__(config, reactor, ProxyFactory(config, reactor, chain))
        self.metrics = metrics_filter(self.factory.chain)

    def _listening(self, port) -> None:
        self.factory.listening_on(port.getHost())
        super()._listening(port)

    def stopService(self):
        super().stopService()
        d = self._stop_listening()
        d.addCallback(lambda _: self.factory.shutdown(self.config.timeouts.shutdown_grace))
        return d


class _SharedSockets(ServerFactory):
    """
    The factory of the supervisor's listening ports, which never accept: the
    workers do.
    """

    noisy = False

    def logPrefix(self) -> str:
        return "proxyframe (sockets for the workers)"


class _ReusePort(Port):
    """
    A TCP port with ``SO_REUSEPORT``: several such ports bound to one
    address form a group among which the kernel spreads new connections
    evenly.  With one shared socket instead, the worker that happens to
    wake first accepts a whole burst of connections (Twisted accepts up to
    100 per wake-up), and keep-alive clients then stay on it.
    """

    def createInternetSocket(self):
        sock = super().createInternetSocket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return sock


class WorkersService(_ListeningService):
    """
    The supervisor of ``workers = N`` (N > 1): for every configured
    endpoint it opens N ``SO_REUSEPORT`` sockets on its address, never
    accepts on them itself, and runs N worker processes
    (:class:`proxyframe.workers.Workers`), each accepting on its own.

    Only ``tcp:`` and ``tcp6:`` endpoints can be shared; any other stops the
    process at start like a listener that cannot be opened.  SIGHUP is
    passed on to every worker (after any handler that was there before,
    such as the access log's in this process).  Stopping it (SIGTERM,
    SIGINT) closes its sockets and stops the workers gracefully; the
    ``Deferred`` it returns fires when every worker has exited.

    With a ``metrics`` filter in *chain*, it serves ``/metrics`` itself,
    summed over every worker that ran (prometheus-client's multiprocess
    mode): at start it makes a private directory (:attr:`metrics_dir`, mode
    0700), gives it to the workers in ``PROMETHEUS_MULTIPROC_DIR``, calls
    ``mark_process_dead`` for each worker that exits, and removes the
    directory once the workers have stopped.  The workers' files outlive
    them, so a dead worker's counts stay in the sums.

    :param count: the number of workers (``int``, more than 1).
    :param chain: the chain the options built to check the config; only
        its ``metrics`` filter is used (:func:`metrics_filter`).
    """

    def __init__(self, config: Config, count: int, reactor=None, chain: Chain | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        super().__init__(config, reactor, _SharedSockets())
        self.metrics = metrics_filter(chain)
        #: The multiprocess directory while running, else ``None``.
        self.metrics_dir: str | None = None
        self.count = count
        # Now, before twistd changes directory (--rundir): the workers start later.
        self._config_path = os.path.abspath(config.source) if config.source is not None else None
        self.workers: Workers | None = None
        # Per endpoint, in config order: one port per worker.
        self._groups: list[list[Port]] = []
        self._previous_sighup = None

    def startService(self) -> None:
        if self.metrics is not None:
            # Here, not in __init__: after twistd has switched user (--uid), so
            # that the workers can write into it.
            try:
                self.metrics_dir = tempfile.mkdtemp(prefix="proxyframe-metrics-")
            except OSError as e:
                Service.startService(self)
                self._cannot_listen(f"{self.metrics.listen} (metrics)",
                                    f"cannot make a directory for the workers' metrics: {e}")
                return
        super().startService()

    def _metrics_site(self):
        return self.metrics.site(self.reactor, self.metrics_dir)

    def _worker_exited(self, pid: int) -> None:
        """A worker exited: drop its live-gauge files (its counter files stay, and keep counting)."""
        if self.metrics_dir is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.metrics_dir)

    def _remove_metrics_dir(self, result=None):
        path, self.metrics_dir = self.metrics_dir, None
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
        return result

    def _unusable(self, endpoint) -> str | None:
        if isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
            return None
        return (f"workers = {self.count} can share only tcp: and tcp6: endpoints "
                "(set workers = 1 to use this one)")

    def _open(self, endpoint) -> Deferred:
        """
        One ``SO_REUSEPORT`` socket per worker on *endpoint*'s address (the
        first decides the port when the endpoint says 0); none of them is
        read here.  :returns: a ``Deferred`` firing with the list of ports.
        """
        def open_all() -> list[Port]:
            ports: list[Port] = []
            number = endpoint._port
            try:
                for _ in range(self.count):
                    port = _ReusePort(number, self.factory, endpoint._backlog, endpoint._interface, self.reactor)
                    port.startListening()
                    port.stopReading()  # at once, before the reactor could accept on it
                    # Closing the port must only close this process's
                    # descriptor: a shutdown() would stop the worker
                    # accepting too.  Twisted skips it for the ports it
                    # adopts, the way the workers get theirs.
                    port._shouldShutdown = False
                    ports.append(port)
                    number = port.getHost().port
            except Exception:
                for port in ports:
                    port.stopListening()
                raise
            return ports
        return maybeDeferred(open_all)

    def _listening(self, ports) -> None:
        self._groups.append(ports)
        self._ports.extend(ports[1:])
        super()._listening(ports[0])

    def _all_listening(self) -> None:
        # Worker i gets socket i of every endpoint.
        sockets = [[group[i].fileno() for group in self._groups] for i in range(self.count)]
        env, exited = None, None
        if self.metrics_dir is not None:
            env, exited = {MULTIPROC_ENV: self.metrics_dir}, self._worker_exited
        self.workers = Workers(self.count, sockets, self._config_path, self.config.timeouts.shutdown_grace,
                               self.reactor, env=env, exited=exited)
        self.workers.start()
        if threading.current_thread() is threading.main_thread():
            self._previous_sighup = signal.getsignal(signal.SIGHUP)
            signal.signal(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self, signum: int, frame) -> None:
        # Between two bytecodes of the main thread: only schedule.
        self.reactor.callFromThread(self._forward_sighup)
        if callable(self._previous_sighup):
            self._previous_sighup(signum, frame)

    def _forward_sighup(self) -> None:
        self._log.info("SIGHUP: passing it on to the workers (pids {pids})",
                       pids=", ".join(map(str, self.workers.pids)))
        self.workers.signal_all("HUP")

    def stopService(self):
        super().stopService()
        if signal.getsignal(signal.SIGHUP) == self._on_sighup:
            signal.signal(signal.SIGHUP, self._previous_sighup)
        stopped = [self._stop_listening()]
        if self.workers is not None:
            stopped.append(self.workers.stop())
        return DeferredList(stopped).addBoth(self._remove_metrics_dir)


def worker_count(config: Config) -> int:
    """
    :returns: how many processes serve with *config*: ``config.workers``,
        or for 0 the number of cores (:func:`os.cpu_count`, 1 when unknown).
    """
    return config.workers or os.cpu_count() or 1


def makeService(options: Options) -> ProxyService | WorkersService:
    """
    The twistd entry point: a :class:`ProxyService` for one process, or a
    :class:`WorkersService` for several (``workers``, :func:`worker_count`).
    The supervisor runs no exchange through the chain the options built
    (each worker builds its own); building it checked the filters' options,
    and its ``metrics`` filter, if any, says where the supervisor serves
    the workers' summed metrics.
    """
    config = options["proxy_config"]
    count = worker_count(config)
    if count > 1:
        return WorkersService(config, count, chain=options["proxy_chain"])
    return ProxyService(config, chain=options["proxy_chain"])
