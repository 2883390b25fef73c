"""
The supervisor's side of ``workers = N``: :class:`Workers` runs N worker
processes (``python -m proxyframe.worker``, see :mod:`proxyframe.worker`)
on listening sockets the supervisor opened, restarts those that die, passes
signals on, and stops them all.

Each worker gets, as file descriptors:

- 0: a pipe from the supervisor that is never written to.  When the
  supervisor dies, however it dies, the worker reads end-of-file there and
  stops gracefully instead of lingering.
- 1: the supervisor's own standard output, inherited as is, so access log
  lines written to ``"-"`` go straight to it (and when it is ``/dev/null``,
  as in a daemon, the access log goes to the worker's log instead).
- 2: a pipe to the supervisor, which reads the worker's log (one event per
  line, :func:`proxyframe.worker.format_event`) and logs each event again,
  at its level, as ``worker N: ...`` in namespace ``proxyframe.worker``:
  on standard output with ``twistd -n``, in twistd's log file as a daemon.
- 3 and up: its listening sockets, one per endpoint in config order (each
  worker has its own ``SO_REUSEPORT`` socket on every endpoint's address).

Its environment is the supervisor's, plus what the supervisor adds: with
the metrics filter, ``PROMETHEUS_MULTIPROC_DIR``, set from exec on and so
before the worker imports prometheus-client (see :mod:`proxyframe.service`).

Every worker is a separate process with its own memory: each has its own
filter instances (the memory cache store, the cache's and the access log's
counters), its own upstream connection pool and its own timers.  State
meant to be shared between workers lives in Redis (the ``redis`` cache
store).  A restarted worker reads the config file again.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Callable, Mapping

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

__all__ = ["KILL_AFTER", "RESTART_DELAY", "RESTART_DELAY_MAX", "STABLE_AFTER", "Workers"]

_log = Logger(namespace="proxyframe.worker")

#: Seconds before a dead worker is started again; doubled each time it dies
#: again within :data:`STABLE_AFTER` seconds of its start.
RESTART_DELAY = 1.0
#: The longest wait (seconds) before restarting a worker that keeps dying.
RESTART_DELAY_MAX = 30.0
#: A worker that ran at least this long (seconds) before it died is
#: restarted after :data:`RESTART_DELAY` again.
STABLE_AFTER = 10.0
#: At stop, a worker still running this many seconds after the shutdown
#: grace period is killed (SIGKILL).
KILL_AFTER = 5.0
#: The longest log line (bytes) read from a worker; a longer one is logged
#: in pieces of this size.
MAX_LINE = 65536

# "LEVEL TEXT", TEXT with backslash and newline escaped (proxyframe.worker).
_EVENT_LINE = re.compile(r"(debug|info|warn|error|critical) (.*)", re.DOTALL)
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)


def _unescape(text: str) -> str:
    return _ESCAPE.sub(lambda m: "\n" if m[1] == "n" else m[1], text)


class _Worker(ProcessProtocol):
    """
    One worker slot: the current process, if any, and when to restart it.

    :ivar number: the worker's number, from 1.
    :ivar pid: the current process id, or ``None`` when none runs.
    """

    def __init__(self, workers: Workers, number: int) -> None:
        self._workers = workers
        self.number = number
        self.pid: int | None = None
        self.started = 0.0
        self.delay = RESTART_DELAY
        self.restart_timer = None
        self._buffer = b""

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        while len(self._buffer) > MAX_LINE:
            lines.append(self._buffer[:MAX_LINE])
            self._buffer = self._buffer[MAX_LINE:]
        for line in lines:
            self._relay(line)

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == 2 and self._buffer:
            self._relay(self._buffer)
            self._buffer = b""

    def _relay(self, raw: bytes) -> None:
        """Log one line of the worker's standard error again, at its level."""
        line = raw.decode("utf-8", "backslashreplace")
        m = _EVENT_LINE.fullmatch(line)
        if m:
            level, text = LogLevel.levelWithName(m[1]), _unescape(m[2])
        else:
            # Not from the worker's logger: the interpreter itself wrote it
            # (a crash before logging started, say).
            level, text = LogLevel.error, line
        _log.emit(level, "worker {worker}: {text}", worker=self.number, text=text)

    def processEnded(self, reason: Failure) -> None:
        self._workers._ended(self, reason.value)


class Workers:
    """
    N worker processes, each serving on its own listening sockets.

    :param count: how many workers (``int``, at least 1).
    :param sockets: per worker, the listening sockets' file descriptors
        (``list[list[int]]``, open in this process): worker *i* adopts
        ``sockets[i]``, and a restarted worker the same ones again.
    :param config_path: the config file the workers read, or ``None`` for
        the built-in defaults.
    :param grace: ``timeouts.shutdown_grace`` (seconds): how long a worker
        may take to finish its exchanges when stopped.
    :param reactor: an ``IReactorProcess`` and ``IReactorTime`` provider.
    :param env: variables added to this process's environment for the
        workers (``PROMETHEUS_MULTIPROC_DIR`` for the metrics filter): set
        from exec on, before the worker imports anything.
    :param exited: called with the process id of each worker that has
        exited (the metrics' ``mark_process_dead``), before any restart.
    """

    def __init__(self, count: int, sockets: list[list[int]], config_path: str | None, grace: float,
                 reactor, env: Mapping[str, str] | None = None, exited: Callable[[int], object] | None = None) -> None:
        self._slots = [_Worker(self, n) for n in range(1, count + 1)]
        self._sockets = sockets
        self._config_path = config_path
        self._grace = grace
        self._reactor = reactor
        self._env = dict(env or {})
        self._exited = exited
        self._stopping = False
        self._all_ended: Deferred | None = None

    @property
    def pids(self) -> list[int]:
        """The process ids of the workers running now."""
        return [slot.pid for slot in self._slots if slot.pid is not None]

    def start(self) -> None:
        """Start every worker; does not wait for them to serve."""
        for slot in self._slots:
            self._spawn(slot)

    def _spawn(self, slot: _Worker) -> None:
        slot.restart_timer = None
        sockets = self._sockets[slot.number - 1]
        args = [sys.executable, "-m", "proxyframe.worker", "--number", str(slot.number),
                "--sockets", ",".join(str(3 + i) for i in range(len(sockets)))]
        if self._config_path is not None:
            args += ["--config", self._config_path]
        child_fds = {0: "w", 1: 1, 2: "r"}
        child_fds.update({3 + i: fd for i, fd in enumerate(sockets)})
        slot.started = self._reactor.seconds()
        try:
            env = {**os.environ, **self._env} if self._env else os.environ
            self._reactor.spawnProcess(slot, sys.executable, args, env=env, childFDs=child_fds)
        except OSError as e:  # fork or exec failed: out of memory or processes, say
            _log.error("worker {worker} cannot be started: {why}; trying again in {delay:g} s",
                       worker=slot.number, why=e, delay=self._restart_later(slot))

    def _ended(self, slot: _Worker, status: Exception) -> None:
        pid, slot.pid = slot.pid, None
        if isinstance(status, ProcessDone):
            how = "exited with status 0"
        elif status.signal is not None:
            how = f"was killed by signal {status.signal} ({signal.Signals(status.signal).name})"
        else:
            how = f"exited with status {status.exitCode}"
        if self._exited is not None and pid is not None:
            try:
                self._exited(pid)
            except Exception:
                _log.failure("after worker {worker} (pid {pid}) exited", worker=slot.number, pid=pid)
        if self._stopping:
            _log.info("worker {worker} (pid {pid}) {how}", worker=slot.number, pid=pid, how=how)
            if not self.pids and self._all_ended is not None:
                d, self._all_ended = self._all_ended, None
                d.callback(None)
            return
        _log.warn("worker {worker} (pid {pid}) {how}; restarting it in {delay:g} s",
                  worker=slot.number, pid=pid, how=how, delay=self._restart_later(slot))

    def _restart_later(self, slot: _Worker) -> float:
        """
        Start *slot* again after its restart delay, and double that delay
        for next time, unless its last start was :data:`STABLE_AFTER` ago.

        :returns: the delay, in seconds.
        """
        if self._reactor.seconds() - slot.started >= STABLE_AFTER:
            slot.delay = RESTART_DELAY
        delay, slot.delay = slot.delay, min(slot.delay * 2, RESTART_DELAY_MAX)
        slot.restart_timer = self._reactor.callLater(delay, self._spawn, slot)
        return delay

    def signal_all(self, name: str) -> None:
        """
        Send a signal to every running worker.

        :param name: the signal's name without ``SIG`` (``"HUP"``, ``"TERM"``,
            ``"KILL"``), as ``IProcessTransport.signalProcess`` takes it.
        """
        for slot in self._slots:
            if slot.pid is not None:
                try:
                    slot.transport.signalProcess(name)
                except ProcessExitedAlready:
                    pass  # its processEnded is on its way

    def stop(self) -> Deferred:
        """
        Stop every worker gracefully: no more restarts, SIGTERM to each
        (which stops accepting and lets its exchanges finish for the
        shutdown grace period), then SIGKILL to any still running
        :data:`KILL_AFTER` seconds after that grace period.

        :returns: a ``Deferred`` firing with ``None`` once every worker has
            exited.
        """
        self._stopping = True
        for slot in self._slots:
            if slot.restart_timer is not None:
                slot.restart_timer.cancel()
                slot.restart_timer = None
        if not self.pids:
            return succeed(None)
        self.signal_all("TERM")
        self._all_ended = Deferred()
        timer = self._reactor.callLater(self._grace + KILL_AFTER, self._kill)
        return self._all_ended.addBoth(lambda result: timer.cancel() if timer.active() else None)

    def _kill(self) -> None:
        for slot in self._slots:
            if slot.pid is not None:
                _log.warn("worker {worker} (pid {pid}) still running {seconds:g} s after SIGTERM; killing it",
                          worker=slot.number, pid=slot.pid, seconds=self._grace + KILL_AFTER)
        self.signal_all("KILL")
