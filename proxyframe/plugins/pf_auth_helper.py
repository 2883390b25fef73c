"""
An external Basic-credentials checker for the ``auth`` filter
(:mod:`proxyframe.plugins.pf_auth`), speaking Squid's basic helper line
protocol.  A helper module: it defines no plugin objects.

The proxy writes one line per check, ``user password\\n``, both
URL-encoded (``%XX``, as Squid does); the helper answers each line, in
order, with a line starting ``OK`` (valid) or ``ERR`` (not valid); ``BH``
("broken helper") or anything else is an error.  Such helpers exist for
LDAP, PAM, RADIUS, NCSA files and more (Squid's ``basic_*_auth``).

One long-running child process serves every check; checks queue in order
on its stdin.  It is started on first use and restarted on the next check
after it dies.  A check that gets no answer within the timeout fails, and
the child is killed (a late answer would be matched to the wrong check).
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from urllib.parse import quote_from_bytes

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

__all__ = ()

_log = Logger()

#: The longest answer line accepted (bytes).
MAX_LINE = 65536


class HelperError(Exception):
    """The helper gave no usable answer: it died, timed out or said ``BH``."""


class _HelperProcess(ProcessProtocol):
    """One child process: splits its stdout into lines for the owner."""

    def __init__(self, owner: BasicHelper) -> None:
        self._owner = owner
        self._buf = b""
        self.pid: int | None = None
        self.ended = Deferred()

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def outReceived(self, data: bytes) -> None:
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            self._owner._answered(self, line.rstrip(b"\r"))
        if len(self._buf) > MAX_LINE:
            self._owner._broken(self, "answered a line that is too long")

    def errReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            _log.warn("auth helper {pid}: {line}", pid=self.pid, line=line)

    def processEnded(self, reason) -> None:
        self._owner._broken(self, f"exited ({reason.value})")
        self.ended.callback(None)


class BasicHelper:
    """
    Checks Basic credentials with an external helper program.

    :param reactor: provides ``IReactorProcess`` and ``IReactorTime``.
    :param argv: the program and its arguments (``argv[0]`` is a path).
    :param timeout: seconds to wait for each answer.
    """

    def __init__(self, reactor, argv: list[str], timeout: float) -> None:
        self._reactor = reactor
        self._argv = argv
        self._timeout = timeout
        self._process: _HelperProcess | None = None
        self._pending: deque = deque()
        self._shutdown_hooked = False
        self._stopping = False

    def check(self, user: bytes, password: bytes) -> Deferred:
        """
        :returns: a ``Deferred`` firing with ``True`` (``OK``) or ``False``
            (``ERR``), or failing with :class:`HelperError`.
        """
        if self._process is None:
            self._start()
        process = self._process
        d = Deferred()
        timer = self._reactor.callLater(self._timeout, self._broken, process, "did not answer in time")
        self._pending.append((d, timer))
        process.transport.write(b"%s %s\n" % (quote_from_bytes(user, safe="").encode("ascii"),
                                              quote_from_bytes(password, safe="").encode("ascii")))
        return d

    def _start(self) -> None:
        process = _HelperProcess(self)
        self._reactor.spawnProcess(process, self._argv[0], self._argv, env=os.environ.copy())
        self._process = process
        _log.info("auth helper started: {argv} (pid {pid})", argv=" ".join(self._argv), pid=process.pid)
        if not self._shutdown_hooked:
            self._shutdown_hooked = True
            self._reactor.addSystemEventTrigger("before", "shutdown", self.stop)

    def _answered(self, process: _HelperProcess, line: bytes) -> None:
        if process is not self._process or not self._pending:
            _log.warn("auth helper: unexpected line {line!r}", line=line[:200])
            return
        d, timer = self._pending.popleft()
        timer.cancel()
        word = line.split(b" ", 1)[0]
        if word == b"OK":
            d.callback(True)
        elif word == b"ERR":
            d.callback(False)
        else:
            d.errback(HelperError(f"the auth helper answered {line[:200]!r}"))

    def _broken(self, process: _HelperProcess, why: str) -> None:
        """The child failed: fail every pending check; the next check starts a new child."""
        if process is not self._process:
            return
        self._process = None
        pending, self._pending = self._pending, deque()
        if not self._stopping:
            _log.error("auth helper {pid} {why}; failing {count} check(s)", pid=process.pid, why=why,
                       count=len(pending))
        with contextlib.suppress(ProcessExitedAlready):
            process.transport.signalProcess("KILL")
        for d, timer in pending:
            if timer.active():
                timer.cancel()
            d.errback(HelperError(f"the auth helper {why}"))

    def stop(self) -> Deferred | None:
        """
        Close the child's stdin (a helper exits at end of input) and wait
        for it to end; it is killed if it is still there after the timeout.
        """
        process = self._process
        if process is None:
            return None
        self._stopping = True
        process.transport.closeStdin()
        timer = self._reactor.callLater(self._timeout, self._broken, process, "did not exit")
        process.ended.addCallback(lambda _: timer.active() and timer.cancel())
        return process.ended
