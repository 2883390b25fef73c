"""
One worker process of ``workers = N``, started by the supervisor
(:mod:`proxyframe.workers`) as::

    python -m proxyframe.worker --number N --sockets 3,4 [--config FILE]

It reads the config (the built-in defaults without ``--config``), builds
the filter chain and a :class:`~proxyframe.protocol.server.ProxyFactory`,
and accepts on the listening sockets it inherited (file descriptors
``--sockets``); it never binds one itself, so ``listen`` in the config is
not used.  It logs each event to standard error as one line,
``LEVEL [namespace#level] text`` (:func:`format_event`), for the
supervisor to read.

It stops gracefully (stops accepting, then ``ProxyFactory.shutdown`` with
``timeouts.shutdown_grace``) on SIGTERM or SIGINT, and when its standard
input, a pipe from the supervisor, reaches end-of-file: the supervisor is
gone.  SIGHUP is ignored unless a filter handles it (the access log reopens
its file).  The exit status is 0 after a stop, 1 when the config or a
filter cannot be used.

Like every worker, it has its own memory: its own cache store (unless the
store is Redis or disk), counters and upstream pool.  The ``metrics``
filter's counts are the exception: the supervisor starts the worker with
``PROMETHEUS_MULTIPROC_DIR`` in its environment, so prometheus-client,
imported when the chain is built, keeps them in a file of that directory
which the supervisor sums and serves.  The worker never opens the metrics
port.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.main import CONNECTION_DONE
from twisted.logger import FileLogObserver, Logger, eventAsText, globalLogBeginner
from twisted.python.failure import Failure
from zope.interface import implementer

from proxyframe.config import ConfigError, load_config
from proxyframe.protocol.server import ProxyFactory
from proxyframe.reactor import install_unless_chosen

__all__ = ["format_event", "main"]

_log = Logger(namespace="proxyframe.worker")


def format_event(event: dict) -> str | None:
    """
    One log event as one line for the supervisor: the level's name, a
    space, then the event as twistd shows it without a timestamp
    (``[namespace#level] text``, and a traceback if there is one), with
    ``\\`` written ``\\\\`` and each newline ``\\n``.

    :returns: the line, ending in a newline; ``None`` for an event with no
        text.
    """
    text = eventAsText(event, includeTimestamp=False)
    if not text:
        return None
    level = event.get("log_level")
    name = level.name if level is not None else "info"
    return name + " " + text.replace("\\", "\\\\").replace("\n", "\\n") + "\n"


@implementer(IReadDescriptor)
class _SupervisorPipe:
    """
    Our end of a pipe the supervisor never writes to: readable only at
    end-of-file, when the supervisor has exited.
    """

    def __init__(self, fd: int, gone) -> None:
        self._fd = fd
        self._gone = gone

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "supervisor pipe"

    def doRead(self):
        if os.read(self._fd, 4096):
            return None
        return CONNECTION_DONE

    def connectionLost(self, reason: Failure) -> None:
        self._gone()


class Worker:
    """
    The worker's lifetime: serving on the inherited sockets, then stopping.

    :param number: the worker's number (for its log lines).
    :param factory: the :class:`ProxyFactory` to serve with.
    :param sockets: inherited listening socket file descriptors; each is
        adopted by the reactor and then closed here.
    :param reactor: the reactor.
    """

    def __init__(self, number: int, factory: ProxyFactory, sockets: list[int], reactor) -> None:
        self.number = number
        self.factory = factory
        self.reactor = reactor
        self.ports = []
        for fd in sockets:
            with socket.socket(fileno=fd) as inherited:  # closes fd: the reactor has its own copy
                port = reactor.adoptStreamPort(fd, inherited.family, factory)
            factory.listening_on(port.getHost())
            self.ports.append(port)
        self._stopping = False
        reactor.addSystemEventTrigger("before", "shutdown", self._shutdown)
        reactor.addReader(_SupervisorPipe(0, self._supervisor_gone))
        reactor.callWhenRunning(self._started)

    def _started(self) -> None:
        # After the reactor's own handlers, which stop it a second time on a
        # second signal (ReactorNotRunning): with Ctrl-C in a terminal both
        # the worker and the supervisor (who then sends SIGTERM) get SIGINT.
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        _log.info("worker {number} (pid {pid}) serving", number=self.number, pid=os.getpid())

    def _on_signal(self, signum: int, frame) -> None:
        # Between two bytecodes of the main thread: only schedule.
        self.reactor.callFromThread(self.stop, signal.Signals(signum).name)

    def _supervisor_gone(self) -> None:
        self.stop("the supervisor is gone")

    def stop(self, why: str) -> None:
        """Stop the reactor (once; later calls do nothing), which stops gracefully."""
        if not self._stopping:
            self._stopping = True
            _log.info("worker {number} stopping: {why}", number=self.number, why=why)
            self.reactor.stop()

    def _shutdown(self) -> Deferred:
        """The "before shutdown" trigger: stop accepting, then let exchanges finish."""
        self._stopping = True
        d = DeferredList([maybeDeferred(port.stopListening) for port in self.ports])
        d.addCallback(lambda _: self.factory.shutdown(self.factory.config.timeouts.shutdown_grace))
        return d


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m proxyframe.worker",
                                     description="One worker of proxyframe's workers = N (started by twistd).")
    parser.add_argument("--number", type=int, required=True, help="this worker's number, for its log lines")
    parser.add_argument("--sockets", required=True,
                        help="inherited listening socket file descriptors, comma-separated")
    parser.add_argument("--config", help="TOML configuration file (default: built-in safe defaults)")
    args = parser.parse_args(argv)
    args.sockets = [int(fd) for fd in args.sockets.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    """
    Run one worker until it is stopped (see the module docstring).

    :param argv: the arguments, without the program name; ``None`` for
        ``sys.argv[1:]``.
    :raises SystemExit: 1 when the config or a filter cannot be used (the
        reason is logged), 2 for bad arguments.
    """
    args = _arguments(sys.argv[1:] if argv is None else argv)
    # Before any filter chains onto it: a SIGHUP the supervisor passes on
    # must not kill a worker that has no file to reopen.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    globalLogBeginner.beginLoggingTo([FileLogObserver(sys.stderr, format_event)])
    install_unless_chosen()
    from twisted.internet import reactor
    try:
        factory = ProxyFactory(load_config(args.config), reactor)
    except ConfigError as e:
        _log.critical("worker {number} cannot start: {why}", number=args.number, why=e)
        sys.exit(1)
    Worker(args.number, factory, args.sockets, reactor)
    reactor.run()


if __name__ == "__main__":
    main()
