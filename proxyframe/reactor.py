"""
The reactor ``twistd proxyframe`` runs on: Twisted's epoll reactor, with
each ready descriptor dispatched directly.

Twisted's reactors wrap every read or write event in
``log.callWithLogger``, which sets up a logging context (the prefix that
the legacy ``twisted.python.log`` puts on lines logged while the event is
handled) and catches what escapes.  On a proxy that handles two or three
events per exchange, that wrapping costs about a tenth of the CPU.
proxyframe logs through ``twisted.logger``, which does not use that
context, and ``_doReadOrWrite`` already logs and disconnects on an error
from ``doRead``/``doWrite``; what could still escape is logged here.

``twistd proxyframe`` installs it unless a reactor was chosen already
(``twistd --reactor=...``, or a program that imported
``twisted.internet.reactor`` first).  A program embedding
:class:`~proxyframe.ProxyFactory` may call :func:`install` before its first
``from twisted.internet import reactor``, or keep any other reactor.
"""

from __future__ import annotations

import errno
import sys

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import installReactor
from twisted.python import log

__all__ = ["ProxyReactor", "install", "install_unless_chosen"]


class ProxyReactor(EPollReactor):
    """An :class:`EPollReactor` whose events skip ``log.callWithLogger``."""

    def doPoll(self, timeout):
        if timeout is None:
            timeout = -1  # wait until something happens
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        dispatch = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                try:
                    dispatch(selectable, fd, event)
                except BaseException:
                    log.err(None, f"while handling an event of {selectable!r}")

    doIteration = doPoll


def install() -> None:
    """
    Install a :class:`ProxyReactor` as ``twisted.internet.reactor``.

    :raises twisted.internet.error.ReactorAlreadyInstalledError: a reactor
        was installed already.
    """
    installReactor(ProxyReactor())


def install_unless_chosen() -> None:
    """Install a :class:`ProxyReactor` unless a reactor is installed already."""
    if "twisted.internet.reactor" not in sys.modules:
        install()
