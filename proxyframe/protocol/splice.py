"""
A CONNECT tunnel relayed inside the kernel with ``splice(2)`` (Linux).

The relay in :mod:`proxyframe.protocol.tunnel` copies every byte from the
kernel into a Python ``bytes`` and back.  Here ``splice`` moves what one
socket received into a pipe, and from the pipe into the other socket, so
the bytes never enter the process (HAProxy does the same).  The proxy's
work per read is two system calls.

Twisted's reactor still does the waiting: each socket is registered as one
:class:`_End`, readable for the direction it feeds and writable for the
direction it drains (the reactor keeps one registration per descriptor).
The transports themselves are taken off the reactor while the tunnel runs,
and given back to close: their protocols see ``connectionLost`` as usual.

A direction holds a pipe only while bytes wait in it for a slow sink: the
others are back in a small per-process pool at once, so idle tunnels hold
no pipe (a user's pipes count against ``fs.pipe-user-pages-soft``).  Pipes
are made 1 MiB large (``fs.pipe-max-size``'s default) where the system
allows, as fewer, larger moves cost less CPU per byte; where it does not,
the default size works the same, only with more moves.

Back-pressure is the pipe's: while the sink is slow, a direction goes on
reading into its pipe until the pipe is full (so the source keeps
flowing, as it would into a transport's buffer), then stops reading until
the sink takes some; at most one pipe's worth is held per direction, plus
the sockets' own buffers.  An end-of-stream is passed on as a half-close
(``shutdown(SHUT_WR)``) once the pipe is drained; the tunnel closes when
both directions have ended, and is aborted when either socket fails.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Callable

from twisted.internet.tcp import Connection

from proxyframe.protocol.sending import nothing_queued

__all__ = ["SpliceBody", "SpliceTunnel", "splice_available"]

# The pipe size asked for, and the most one splice(2) moves (bytes).
_PIPE_SIZE = 1 << 20
_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
# Empty pipes kept for the next tunnel that reads.
_POOL_SIZE = 8


class _PipePool:
    """
    Empty pipes, shared by the process's tunnels: ``(read end, write end,
    capacity in bytes)``.
    """

    def __init__(self) -> None:
        self._free: list[tuple[int, int, int]] = []

    def take(self) -> tuple[int, int, int]:
        """:raises OSError: no pipe could be made (e.g. ``EMFILE``)."""
        if self._free:
            return self._free.pop()
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            capacity = fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        except OSError:
            # Over fs.pipe-max-size or the user's quota: the size it has works.
            capacity = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
        return read_end, write_end, capacity

    def give_back(self, pipe: tuple[int, int, int], empty: bool = True) -> None:
        """Keep *pipe* for reuse if *empty* and there is room, else close it."""
        if empty and len(self._free) < _POOL_SIZE:
            self._free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])


_pipes = _PipePool()


def splice_available(client, upstream) -> bool:
    """
    Whether a tunnel between these transports can be relayed by
    :class:`SpliceTunnel`: the system has ``splice(2)``, both are plain
    (not TLS) TCP connections still open, and neither has bytes queued for
    writing (they would be overtaken).
    """
    return hasattr(os, "splice") and all(
        nothing_queued(t) and not getattr(t, "TLS", False) for t in (client, upstream))


def _take_over(*transports: Connection) -> None:
    """
    Take *transports* off the reactor (after checking that a pipe can be
    made: :raises OSError: otherwise, with nothing changed).
    """
    _pipes.give_back(_pipes.take())
    for transport in transports:
        transport.stopReading()
        transport.stopWriting()


def _hand_back(reactor, ends: tuple[_End, ...], directions: tuple[_Direction, ...]) -> None:
    """
    Take the splice's registrations off the reactor and its pipes back, before
    the transports touch the reactor again: it knows one registration per
    descriptor, and a transport's stopReading would remove ours.
    """
    for end in ends:
        reactor.removeReader(end)
        reactor.removeWriter(end)
    for direction in directions:
        direction.release_pipe()


class SpliceTunnel:
    """
    The splice between a client transport and an upstream transport, in
    the kernel.  Its counts, :meth:`close` and :meth:`abort` are those of
    :class:`~proxyframe.protocol.tunnel.Tunnel`; the transports deliver
    nothing to their protocols while it runs.

    :ivar bytes_up: bytes relayed client → upstream (``int``).
    :ivar bytes_down: bytes relayed upstream → client (``int``).
    """

    def __init__(self, client: Connection, upstream: Connection,
                 on_closed: Callable[[SpliceTunnel], object], bytes_up: int = 0) -> None:
        """
        :param client: the client's transport (see :func:`splice_available`).
        :param upstream: the upstream's transport.
        :param on_closed: called once, with this tunnel, when it is over.
        :param bytes_up: bytes already relayed client → upstream.
        :raises OSError: no pipe could be made (e.g. ``EMFILE``); nothing
            was changed, so the caller can relay in Python instead.
        """
        _take_over(client, upstream)
        self.client = client
        self.upstream = upstream
        self._on_closed: Callable[[SpliceTunnel], object] | None = on_closed
        self._reactor = client.reactor
        client_end, upstream_end = _End(self, client), _End(self, upstream)
        self._up = _Direction(self, client_end, upstream_end)
        self._down = _Direction(self, upstream_end, client_end)
        self._up.count = bytes_up
        self._ends = (client_end, upstream_end)
        self._up.start()
        self._down.start()

    @property
    def bytes_up(self) -> int:
        return self._up.count

    @property
    def bytes_down(self) -> int:
        return self._down.count

    def direction_ended(self, direction: _Direction) -> None:
        """*direction*'s source ended and its pipe is drained: pass the end on."""
        try:
            direction.sink.socket.shutdown(socket.SHUT_WR)
        except OSError:
            self.abort()
            return
        if self._up.ended and self._down.ended:
            self.close()

    def source_awaited(self) -> None:
        """A direction waits for its source (a tunnel has no timer for that)."""

    def sink_awaited(self) -> None:
        """A direction waits for its sink to take bytes."""

    def close(self) -> None:
        """
        End the tunnel: both connections are closed (nothing is queued in
        their transports; what the pipes still hold is dropped).
        """
        self._finish(lambda transport: transport.loseConnection())

    def abort(self) -> None:
        """End the tunnel at once (a socket failed, or the shutdown grace expired)."""
        self._finish(lambda transport: transport.abortConnection())

    sink_failed = abort

    def _finish(self, end_transport: Callable[[Connection], object]) -> None:
        if self._on_closed is None:
            return
        on_closed, self._on_closed = self._on_closed, None
        _hand_back(self._reactor, self._ends, (self._up, self._down))
        for transport in (self.client, self.upstream):
            end_transport(transport)
        on_closed(self)


class SpliceBody:
    """
    A response body of known length, moved from the upstream's socket to
    the client's inside the kernel, exactly *length* bytes; then both
    transports are the caller's again.

    :ivar moved: body bytes that reached the client's socket so far (``int``).
    """

    def __init__(self, upstream: Connection, client: Connection, length: int, timeout: float,
                 on_done: Callable[[SpliceBody], object], on_failed: Callable[[SpliceBody, str], object]) -> None:
        """
        :param upstream: the upstream's transport, the response head read.
        :param client: the client's transport, the response head written
            (see :func:`splice_available`).
        :param length: body bytes to move (bytes).
        :param timeout: seconds the upstream may send nothing while the
            client is not the one holding things up.
        :param on_done: called with this once *length* bytes reached the
            client's socket.
        :param on_failed: called with this and what failed:
            ``"timeout"`` (the upstream sent nothing for *timeout*
            seconds), ``"upstream"`` (it ended early, or its socket
            failed) or ``"client"`` (the client's socket failed); the
            caller then closes the connections.
        :raises OSError: no pipe could be made; nothing was changed.
        """
        _take_over(upstream, client)
        self.upstream, self.client = upstream, client
        self._reactor = upstream.reactor
        self._timeout = timeout
        self._on_done: Callable | None = on_done
        self._on_failed = on_failed
        source, sink = _End(self, upstream), _End(self, client)
        self._ends = (source, sink)
        self._body = _Direction(self, source, sink, limit=length)
        self._timer = self._reactor.callLater(timeout, self._timed_out)
        self._body.start()

    @property
    def moved(self) -> int:
        return self._body.count - self._body.in_pipe

    def source_awaited(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._timeout)
        elif self._on_done is not None:
            self._timer = self._reactor.callLater(self._timeout, self._timed_out)

    def sink_awaited(self) -> None:
        # A client that reads slowly is not an origin that is slow.
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def direction_ended(self, direction: _Direction) -> None:
        if direction.count == direction.limit:
            on_done = self._finish()
            if on_done is not None:
                on_done(self)
        else:
            self.abort()

    def abort(self) -> None:
        """The upstream ended early, or a socket failed."""
        self._fail("upstream")

    def sink_failed(self) -> None:
        self._fail("client")

    def _timed_out(self) -> None:
        self._timer = None
        self._fail("timeout")

    def _fail(self, what: str) -> None:
        if self._finish() is not None:
            self._on_failed(self, what)

    def cancel(self) -> None:
        """Stop at once, calling back nobody (the caller is closing the connections)."""
        self._finish()

    def _finish(self) -> Callable | None:
        """Off the reactor, the pipe back; returns on_done the first time only."""
        on_done, self._on_done = self._on_done, None
        if on_done is None:
            return None
        self.sink_awaited()
        _hand_back(self._reactor, self._ends, (self._body,))
        return on_done


class _End:
    """One socket of the tunnel, as the reactor sees it (an ``IReadWriteDescriptor``)."""

    def __init__(self, tunnel: SpliceTunnel | SpliceBody, transport: Connection) -> None:
        self.tunnel = tunnel
        self.socket: socket.socket = transport.socket
        self.fd = transport.fileno()
        self.reading = self.writing = False
        # The direction this socket feeds, and the one it drains.
        self.feeds: _Direction | None = None
        self.drains: _Direction | None = None

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "SpliceTunnel"

    def doRead(self) -> None:
        self.feeds.pull()

    def doWrite(self) -> None:
        self.drains.push()

    def connectionLost(self, reason) -> None:
        """The reactor saw the socket fail (error or hang-up while only writing)."""
        self.tunnel.abort()

    def start_reading(self) -> None:
        if not self.reading:
            self.reading = True
            self.tunnel._reactor.addReader(self)

    def stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.tunnel._reactor.removeReader(self)

    def start_writing(self) -> None:
        if not self.writing:
            self.writing = True
            self.tunnel._reactor.addWriter(self)

    def stop_writing(self) -> None:
        if self.writing:
            self.writing = False
            self.tunnel._reactor.removeWriter(self)


class _Direction:
    """The bytes from one socket to the other, through a pipe while they wait."""

    def __init__(self, tunnel: SpliceTunnel | SpliceBody, source: _End, sink: _End,
                 limit: int | None = None) -> None:
        self.tunnel = tunnel
        self.source, self.sink = source, sink
        source.feeds = sink.drains = self
        self.pipe: tuple[int, int, int] | None = None
        self.in_pipe = 0
        self.count = 0
        # Bytes to move before the direction ends, or None: until EOF.
        self.limit = limit
        self.eof = False
        self.ended = False

    def start(self) -> None:
        self.source.start_reading()

    def pull(self) -> None:
        """The source is readable: move what it has into the pipe, then on to the sink."""
        if self.pipe is None:
            try:
                self.pipe = _pipes.take()
            except OSError:
                self.tunnel.abort()
                return
        wanted = _PIPE_SIZE if self.limit is None else min(_PIPE_SIZE, self.limit - self.count)
        try:
            moved = os.splice(self.source.fd, self.pipe[1], wanted, flags=_FLAGS)
        except BlockingIOError:
            # Nothing to read after all, or the pipe is full: the sink's
            # next writable event makes room and reads again.
            if self.in_pipe:
                self.source.stop_reading()
            else:
                self.release_pipe()
            return
        except OSError:
            self.tunnel.abort()
            return
        if moved == 0:
            self.eof = True
            self.source.stop_reading()
            if not self.in_pipe:
                self.release_pipe()
                self._pass_on_end()
            return
        self.in_pipe += moved
        self.count += moved
        if self.count == self.limit:
            self.eof = True
            self.source.stop_reading()
        self.push()

    def push(self) -> None:
        """
        Move the pipe's bytes into the sink.  What the sink does not take
        waits in the pipe (the sink is watched for room), and the source
        is read meanwhile until the pipe is full: then the source waits.
        """
        while self.in_pipe:
            try:
                moved = os.splice(self.pipe[0], self.sink.fd, self.in_pipe, flags=_FLAGS)
            except BlockingIOError:
                break
            except OSError:
                self.tunnel.sink_failed()
                return
            self.in_pipe -= moved
        if self.in_pipe:
            self.sink.start_writing()
            self.tunnel.sink_awaited()
            if self.in_pipe >= self.pipe[2]:
                self.source.stop_reading()
            elif not self.eof:
                self.source.start_reading()
            return
        self.release_pipe()
        self.sink.stop_writing()
        if self.eof:
            self._pass_on_end()
        else:
            self.tunnel.source_awaited()
            self.source.start_reading()

    def _pass_on_end(self) -> None:
        if self.in_pipe or self.ended:
            return
        self.ended = True
        self.tunnel.direction_ended(self)

    def release_pipe(self) -> None:
        """Give the pipe back to the pool (closed instead if bytes are left in it)."""
        if self.pipe is not None:
            pipe, self.pipe = self.pipe, None
            _pipes.give_back(pipe, empty=not self.in_pipe)
