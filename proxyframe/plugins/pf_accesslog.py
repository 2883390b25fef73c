"""
``accesslog``: one line per exchange, in Squid's native format, the Common
or Combined Log Format, or JSON lines, to standard output or a file::

    [[filter]]
    use = "accesslog"
    format = "combined"        # "squid" (default), "common", "combined", "json"
    path = "logs/access.log"   # "-" (default) is standard output

A line is made in ``exchange_done`` on the reactor thread (cheaply: one
precomputed format function, the date formatted once a second) and handed
to a writer thread, which does the blocking writes.  Lines waiting for that
thread are bounded (``buffer_bytes``): when the disk is stuck, new lines are
dropped and counted, never piled up.  SIGHUP (or :meth:`AccessLog.reopen`)
reopens the file, for logrotate.  At shutdown the writer gets
``timeouts.shutdown_grace`` seconds to write what is left.

With ``path = "-"`` the lines go straight to file descriptor 1 (no log
prefix), unless standard output goes nowhere: when the first line is made,
if descriptor 1 is ``/dev/null`` (as after ``twistd`` without ``-n``
daemonized), every line goes instead through :mod:`twisted.logger`, namespace
``proxyframe.accesslog``, at level info, and so lands in ``twistd``'s log
file.  This is checked once: the daemon's standard output does not change.

Written only against the public contract, as any third party would.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from proxyframe.config import ConfigError
from proxyframe.filters import Filter, check_options, number_option
from proxyframe.interfaces import IFilterFactory

__all__ = ["AccessLog", "AccessLogFactory", "FORMATS"]

_log = Logger(namespace="proxyframe.accesslog")

_OPTIONS = ("format", "path", "buffer_bytes")
#: Default bound on the bytes of lines waiting for the writer thread.
DEFAULT_BUFFER_BYTES = 4 * 1024 * 1024

# -- field text ------------------------------------------------------------------

# What may appear as-is in an unquoted field (printable ASCII but space, ``"``
# and ``\``) and in a quoted one (space allowed); the rest is escaped as
# Apache does: ``\"``, ``\\``, ``\xhh``.
_UNSAFE = re.compile(rb'[^!#-\[\]-~]')
_UNSAFE_QUOTED = re.compile(rb'[^ !#-\[\]-~]')


def _escape(match: re.Match) -> bytes:
    char = match.group()
    return b"\\" + char if char in b'"\\' else b"\\x%02x" % char[0]


def _text(value: bytes | str | None, unsafe: re.Pattern = _UNSAFE) -> str:
    """A field for a text format: ``-`` when absent or empty, else escaped ASCII."""
    if not value:
        return "-"
    if isinstance(value, str):
        value = value.encode("utf-8")
    if unsafe.search(value):
        value = unsafe.sub(_escape, value)
    return value.decode("ascii")


def _json_text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "backslashreplace")


class _PerSecond:
    """A timestamp format computed once a second, not once a line."""

    __slots__ = ("_format", "_second", "_text")

    def __init__(self, format: Callable[[int], str]) -> None:
        self._format = format
        self._second: int | None = None
        self._text = ""

    def __call__(self, when: float) -> str:
        second = int(when)
        if second != self._second:
            self._second, self._text = second, self._format(second)
        return self._text


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _clf_time(second: int) -> str:
    """``[10/Oct/2000:13:55:36 -0700]``, local time (not locale-dependent)."""
    t = time.localtime(second)
    offset = t.tm_gmtoff // 60
    return "[%02d/%s/%04d:%02d:%02d:%02d %s%02d%02d]" % (
        t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year, t.tm_hour, t.tm_min, t.tm_sec,
        "-" if offset < 0 else "+", abs(offset) // 60, abs(offset) % 60)


def _iso_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def _duration(exchange) -> float:
    """Seconds from the request head to the end (never negative)."""
    ended = exchange.ended if exchange.ended is not None else exchange.started
    return max(0.0, ended - exchange.started)


def _header(exchange, name: bytes) -> bytes | None:
    request = exchange.request
    return None if request is None else request.headers.get(name)


# -- the formats ----------------------------------------------------------------------
# Each makes a fresh ``format(exchange) -> str`` (its own per-second cache).

def _answered_here(exchange) -> bool:
    """
    Whether the proxy or a filter made the response (no upstream answered):
    responses made here carry their whole body.
    """
    response = exchange.response
    return response is None or response.body is not None


def _squid_code(exchange) -> str:
    """Squid's result code: the cache's note, else TCP_DENIED/TCP_TUNNEL/TCP_MISS."""
    code = exchange.notes.get("cache_status")
    if code is None:
        response = exchange.response
        if response is not None and response.status in (403, 407) and _answered_here(exchange):
            code = "TCP_DENIED"
        elif exchange.request is not None and exchange.request.method == b"CONNECT":
            code = "TCP_TUNNEL"
        else:
            code = "TCP_MISS"
    return f"{code}_ABORTED" if exchange.error == "client_closed" else str(code)


def squid_format() -> Callable:
    """
    Squid's native format (``logformat squid %ts.%03tu %6tr %>a %Ss/%03>Hs
    %<st %rm %ru %[un %Sh/%<a %mt``), stamped with the end of the exchange.
    """
    search = _UNSAFE.search

    def format(exchange) -> str:
        # Once a line, on the reactor thread: the four text fields are
        # checked for characters to escape in one search, and escaped one by
        # one only when that finds some.
        request, response = exchange.request, exchange.response
        started = exchange.started
        ended = exchange.ended
        if ended is None:
            ended = started
        elapsed = ended - started if ended > started else 0.0
        user = exchange.user
        user = user.encode("utf-8") if user else b""
        if response is None:
            status, hierarchy, content_type = 0, "HIER_NONE/-", b""
        else:
            status = response.status
            address = exchange.upstream_address
            hierarchy = "HIER_DIRECT/" + address if address and response.body is None else "HIER_NONE/-"
            content_type = response.headers.get(b"content-type") or b""
            if content_type.find(b";") >= 0:
                content_type = content_type.split(b";", 1)[0]
            content_type = content_type.strip()
        method, target = (b"", b"") if request is None else (request.method, request.target)
        if method and target and search(method + target + user + content_type) is None:
            method, target = method.decode("ascii"), target.decode("ascii")
            user = user.decode("ascii") if user else "-"
            content_type = content_type.decode("ascii") if content_type else "-"
        else:
            method, target, user, content_type = _text(method), _text(target), _text(user), _text(content_type)
        return "%d.%03d %6d %s %s/%03d %d %s %s %s %s %s" % (
            ended, ended % 1 * 1000, elapsed * 1000, exchange.client_host, _squid_code(exchange),
            status, exchange.bytes_sent, method, target, user, hierarchy, content_type)
    return format


def common_format() -> Callable:
    """NCSA Common Log Format, stamped with the arrival of the request head."""
    stamp = _PerSecond(_clf_time)

    def format(exchange) -> str:
        request, response = exchange.request, exchange.response
        line = None if request is None else b"%s %s HTTP/%s" % (request.method, request.target, request.version)
        return '%s - %s %s "%s" %s %s' % (
            exchange.client_host, _text(exchange.user), stamp(exchange.started), _text(line, _UNSAFE_QUOTED),
            response.status if response else "-", exchange.bytes_sent or "-")
    return format


def combined_format() -> Callable:
    """Common Log Format plus the ``Referer`` and ``User-Agent`` fields."""
    common = common_format()

    def format(exchange) -> str:
        return '%s "%s" "%s"' % (common(exchange), _text(_header(exchange, b"referer"), _UNSAFE_QUOTED),
                                 _text(_header(exchange, b"user-agent"), _UNSAFE_QUOTED))
    return format


def json_format() -> Callable:
    """One JSON object per line, always with the same keys (``null`` when absent)."""
    stamp = _PerSecond(_iso_second)
    encode = json.JSONEncoder(separators=(",", ":"), default=str).encode

    def format(exchange) -> str:
        request, response = exchange.request, exchange.response
        started = exchange.started
        return encode({
            "time": "%s.%03dZ" % (stamp(started), started % 1 * 1000),
            "client": exchange.client_host,
            "user": exchange.user,
            "method": _json_text(request and request.method),
            "target": _json_text(request and request.target),
            "status": response.status if response else None,
            "bytes_sent": exchange.bytes_sent,
            "bytes_received": exchange.bytes_received,
            "duration": round(_duration(exchange), 6),
            "error": exchange.error,
            "cache_status": exchange.notes.get("cache_status"),
            "user_agent": _json_text(_header(exchange, b"user-agent")),
            "referer": _json_text(_header(exchange, b"referer")),
        })
    return format


#: ``format`` option value → maker of the line format function.
FORMATS: dict[str, Callable[[], Callable]] = {
    "squid": squid_format,
    "common": common_format,
    "combined": combined_format,
    "json": json_format,
}


# -- the writer --------------------------------------------------------------------------

#: Seconds the writer thread waits after a write for more lines to gather:
#: under load it writes about this often, instead of waking (and taking the
#: GIL from the reactor thread) once a line.
FLUSH_INTERVAL = 0.05


class _Writer:
    """
    Lines in, written by a thread of its own: the reactor thread only
    appends to a list (under a lock the thread holds just to swap lists),
    and wakes the thread only when the list was empty.

    :ivar dropped: lines lost so far (buffer full, or a failed write).
    """

    def __init__(self, open_file: Callable, max_bytes: int, reactor) -> None:
        self._open = open_file
        self._file = open_file()
        self._max = max_bytes
        self._reactor = reactor
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._lines: list[bytes] = []
        self._size = 0
        self._reopen = self._closing = False
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self._reported = 0

    def write(self, line: bytes) -> None:
        # The lock itself, not the Condition: its __enter__ and __exit__
        # are C, the Condition's are Python calls, once a line.
        with self._lock:
            if self._size + len(line) > self._max or self._closing:
                self.dropped += 1
                return
            if not self._lines:
                self._cond.notify()
            self._lines.append(line)
            self._size += len(line)
        if self._thread is None:
            self._start()

    def reopen(self) -> None:
        with self._cond:
            self._reopen = True
            self._cond.notify()
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        # Started with the first line, so never before twistd forks.
        self._thread = threading.Thread(target=self._run, name="accesslog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._lines or self._reopen or self._closing):
                    self._cond.wait()
                lines, self._lines, self._size = self._lines, [], 0
                reopen, self._reopen = self._reopen, False
                closing = self._closing
            if reopen:
                self._reopen_file()
            try:
                self._write_lines(lines)
            except OSError as e:
                self._lost(len(lines), e)
            self._report_drops()
            if closing and not lines:
                return
            if not closing:
                time.sleep(FLUSH_INTERVAL)

    def _write_lines(self, lines: list[bytes]) -> None:
        """
        Write *lines* whole: to a pipe or a terminal in writes of at most
        PIPE_BUF bytes that end at a line's end, which the kernel keeps in
        one piece when several processes (workers) share the pipe; to a
        file in one write per batch (appends are not interleaved).
        """
        limit = select.PIPE_BUF if not stat.S_ISREG(os.fstat(self._file.fileno()).st_mode) else 1 << 20
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            if chunk and size + len(line) > limit:
                self._write_all(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._write_all(b"".join(chunk))

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self._file.write(view):]

    def _reopen_file(self) -> None:
        try:
            new = self._open()
        except OSError as e:
            self._reactor.callFromThread(_log.error, "accesslog cannot reopen {name}: {why}; still writing to "
                                         "the old file", name=self._file.name, why=e.strerror)
            return
        old, self._file = self._file, new
        old.close()

    def _lost(self, count: int, error: OSError) -> None:
        with self._cond:
            self.dropped += count
        self._reactor.callFromThread(_log.error, "accesslog cannot write {name}: {why}", name=self._file.name,
                                     why=error.strerror)

    def _report_drops(self) -> None:
        with self._cond:
            count, self._reported = self.dropped - self._reported, self.dropped
        if count:
            self._reactor.callFromThread(_log.warn, "accesslog dropped {count} lines meant for {name}",
                                         count=count, name=self._file.name)

    def close(self, timeout: float) -> None:
        """Write what is left (waiting up to *timeout* seconds), then close the file."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                # The disk is stuck: give up, the thread is a daemon.
                return
        self._file.close()


def _open_stdout():
    return open(1, "wb", buffering=0, closefd=False)


def _stdout_discarded() -> bool:
    """Whether file descriptor 1 is ``/dev/null`` (``twistd`` daemonized, or ``> /dev/null``)."""
    try:
        return os.path.samestat(os.fstat(1), os.stat(os.devnull))
    except OSError:
        return False


def _opener(path: Path) -> Callable:
    return lambda: open(path, "ab", buffering=0)


# -- the filter --------------------------------------------------------------------------

class AccessLog(Filter):
    """
    Writes one line per exchange (see the module docstring).

    :param stdout: whether *writer* writes to standard output: the first
        line then decides, once, between *writer* and :mod:`twisted.logger`
        (when standard output is ``/dev/null``).
    """

    def __init__(self, format: Callable, writer: _Writer, stdout: bool = False) -> None:
        self._format = format
        self._writer = writer
        self._deliver = self._first_to_stdout if stdout else self._to_writer

    @property
    def dropped(self) -> int:
        """Lines lost so far: the buffer was full, or a write failed."""
        return self._writer.dropped

    def exchange_done(self, exchange) -> None:
        self._deliver(self._format(exchange))

    def _to_writer(self, line: str) -> None:
        self._writer.write((line + "\n").encode("utf-8"))

    def _to_logger(self, line: str) -> None:
        _log.info("{line}", line=line)

    def _first_to_stdout(self, line: str) -> None:
        # Not when the filter is built: twistd daemonizes after that.
        if _stdout_discarded():
            _log.info("accesslog: standard output is /dev/null; the access log goes to this log instead")
            self._deliver = self._to_logger
        else:
            self._deliver = self._to_writer
        self._deliver(line)

    def reopen(self) -> None:
        """
        Close and reopen the log file at its path (after logrotate renamed
        it); lines already made go to the old file.  Does not block: the
        writer thread reopens before its next write.  No effect on stdout.
        """
        self._writer.reopen()


def _reopen_on_sighup(reactor, reopen: Callable[[], None]) -> None:
    """
    Call *reopen* on the reactor thread on SIGHUP, then any handler that was
    there before.  Twisted leaves SIGHUP alone; ours is removed at shutdown.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # signals can only be handled in the main thread (embedding)
    previous = signal.getsignal(signal.SIGHUP)

    def on_sighup(signum, frame) -> None:
        # Runs between two bytecodes of the main thread: do nothing but
        # schedule, as Twisted's own SIGINT handler does.
        reactor.callFromThread(reopen)
        if callable(previous):
            previous(signum, frame)

    def restore() -> None:
        if signal.getsignal(signal.SIGHUP) is on_sighup:
            signal.signal(signal.SIGHUP, previous)

    signal.signal(signal.SIGHUP, on_sighup)
    reactor.addSystemEventTrigger("after", "shutdown", restore)


@implementer(IPlugin, IFilterFactory)
class AccessLogFactory:
    name = "accesslog"
    description = "Log one line per exchange (Squid, Common, Combined or JSON format) to stdout or a file"

    def build(self, options: dict, context) -> AccessLog:
        check_options(options, _OPTIONS)
        fmt = options.get("format", "squid")
        if not isinstance(fmt, str) or fmt not in FORMATS:
            raise ConfigError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
        path = options.get("path", "-")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"path must be a file name or \"-\" for standard output, not {path!r}")
        size = number_option(options, "buffer_bytes", DEFAULT_BUFFER_BYTES, minimum=1, integer=True, unit="bytes")
        opener = _open_stdout if path == "-" else _opener(context.path(path))
        try:
            writer = _Writer(opener, size, context.reactor)
        except OSError as e:
            raise ConfigError(f"path: cannot open {context.path(path)} for writing: {e.strerror}") from None
        filter_ = AccessLog(FORMATS[fmt](), writer, stdout=path == "-")
        if path != "-":
            _reopen_on_sighup(context.reactor, filter_.reopen)
        grace = context.config.timeouts.shutdown_grace
        context.reactor.addSystemEventTrigger("after", "shutdown", writer.close, grace)
        return filter_


accesslog = AccessLogFactory()
