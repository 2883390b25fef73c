"""
``workers = N``: a supervisor opens the listening sockets once and runs N
worker processes that accept on them; it restarts a worker that dies,
passes SIGHUP on, stops them all gracefully, and brings their log lines
to its own log.

The integration tests run the real ``twistd proxyframe`` with two workers;
to know which worker answers, they freeze the other with SIGSTOP (a stopped
process cannot accept, so the kernel hands each new connection to the one
left).  The supervisor's bookkeeping (restart delays, stop, log relay) is
tested with a fake reactor.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure

from flowtools import TIMEOUT
from support import REPO, Daemon, ProxyProcess, process_gone, proxy_config, twistd_command, wait_until
from proxyframe import Config, ConfigError, load_config
from proxyframe.chain import Chain
from proxyframe.service import ProxyService, WorkersService, makeService, worker_count
from proxyframe.worker import format_event
from proxyframe.workers import KILL_AFTER, Workers

SERVING = re.compile(r"worker (\d+) \(pid (\d+)\) serving")


def access_pattern(port: int) -> str:
    """A whole access line (Squid format) for GET /n/<i> from the origin on *port*; group 1 is i."""
    return (r"\d+\.\d{3} +\d+ 127\.0\.0\.1 TCP_MISS/200 5 GET http://127\.0\.0\.1:%d/n/(\d+)(?:\?p=x+)? "
            r"- HIER_DIRECT/127\.0\.0\.1 text/plain" % port)


# -- helpers --------------------------------------------------------------------

def serving(proxy: ProxyProcess, count: int) -> dict[int, int]:
    """Wait until workers 1..*count* have each logged "serving"; returns {number: latest pid}."""
    def found() -> dict[int, int]:
        return {int(m[1]): int(m[2]) for line in list(proxy.lines) if (m := SERVING.search(line))}
    wait_until(lambda: len(found()) == count, TIMEOUT, f"{count} workers serving")
    return found()


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, ..."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def children(pid: int) -> set[int]:
    """The live processes whose parent is *pid*."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = stat_fields(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry.name))
    return found


def get(port: int, url: str) -> tuple[int, bytes, str | None]:
    """GET *url* through the proxy on a new connection; (status, body, Connection)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", url)
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("connection")
    finally:
        conn.close()


def accepted_by(port: int, client_port: int, pids) -> int | None:
    """
    Which of *pids* accepted the connection from *client_port* to the
    proxy's *port* (the one whose file descriptors hold the server side's
    socket, found by its inode in /proc/net/tcp), or ``None`` (not yet).
    """
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.read().splitlines()[1:]:
                fields = row.split()
                if (int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)) == (port, client_port):
                    inode = fields[9]
    if inode in (None, "0"):
        return None
    for pid in pids:
        if f"socket:[{inode}]" in open_fds(pid):
            return pid
    return None


def connection_to(port: int, pid: int, pids) -> http.client.HTTPConnection:
    """
    A connection to the proxy that worker *pid* accepted.  Each worker
    accepts on its own SO_REUSEPORT socket and the kernel picks the socket
    by a hash of the connection's addresses, so new connections are made
    until one lands on *pid*.
    """
    for _ in range(64):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        conn.connect()
        client_port = conn.sock.getsockname()[1]
        deadline = time.monotonic() + 2
        owner = None
        while owner is None and time.monotonic() < deadline:
            owner = accepted_by(port, client_port, pids)
            time.sleep(0.01)
        if owner == pid:
            return conn
        conn.close()
    raise AssertionError(f"no connection landed on worker pid {pid}")


def get_from(port: int, pid: int, pids, url: str) -> tuple[int, bytes]:
    """GET *url* on a connection worker *pid* accepted; (status, body)."""
    conn = connection_to(port, pid, pids)
    try:
        conn.request("GET", url)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def access_numbers(lines: list[str], port: int) -> list[int]:
    """The i of every access line for /n/<i>; fails on any line that mentions TCP_ but is not whole."""
    whole = re.compile(access_pattern(port))
    numbers = []
    for line in lines:
        if "TCP_" in line:
            m = whole.fullmatch(line)
            assert m, f"not a whole access line: {line!r}"
            numbers.append(int(m[1]))
    return numbers


def open_fds(pid: int) -> set[str]:
    """What the file descriptors of *pid* point to (paths, socket:[n], pipe:[n])."""
    fds = Path(f"/proc/{pid}/fd")
    targets = set()
    for fd in fds.iterdir():
        try:
            targets.add(os.readlink(fd))
        except FileNotFoundError:
            pass
    return targets


# -- integration: twistd proxyframe with two workers ------------------------------

def test_two_workers_are_children_of_the_proxy_and_each_serves(start_proxy, origin):
    """
    ``workers = 2``: the proxy logs one "listening on" line and two worker
    processes, its children, each serve: connections land on both, and each
    answers those it accepted.  The access lines of both reach the proxy's
    standard output, one whole line per exchange.  SIGHUP, passed on to
    workers with no log file to reopen, kills none: each still serves
    after it.
    """
    proxy = start_proxy(workers=2)
    pids = serving(proxy, 2)
    workers = list(pids.values())
    assert children(proxy.pid) == set(workers)
    assert sum("proxyframe listening on" in line for line in proxy.lines) == 1
    for i in range(10):
        assert get_from(proxy.port, workers[i % 2], workers, origin.url(f"/n/{i}")) == (200, b"hello")
    os.kill(proxy.pid, signal.SIGHUP)
    proxy.wait_for_line(r"SIGHUP: passing it on to the workers")
    for i in (10, 11):
        assert get_from(proxy.port, workers[i % 2], workers, origin.url(f"/n/{i}")) == (200, b"hello")
    wait_until(lambda: len(proxy.access_lines()) == 12, TIMEOUT, "12 access lines")
    assert sorted(access_numbers(proxy.lines, origin.port)) == list(range(12))
    assert children(proxy.pid) == set(pids.values())
    assert not [line for line in proxy.lines if "restarting" in line]


def test_access_lines_of_concurrent_workers_stay_whole(start_proxy, origin):
    """
    600 exchanges with 1 KB targets from 8 clients at once, spread over
    two workers that write batches of lines (larger than a pipe's atomic
    write) to the same standard output: exactly one whole access line
    each, none cut or interleaved with another.
    """
    proxy = start_proxy(workers=2)
    serving(proxy, 2)
    numbers = iter(range(600))
    query = "?p=" + "x" * 1000
    lock = threading.Lock()
    errors = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=TIMEOUT)
        while True:
            with lock:
                i = next(numbers, None)
            if i is None:
                break
            try:
                conn.request("GET", origin.url(f"/n/{i}{query}"))
                resp = conn.getresponse()
                if (resp.status, resp.read()) != (200, b"hello"):
                    errors.append(i)
            except (OSError, http.client.HTTPException) as e:
                errors.append((i, e))
                conn.close()
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert errors == []
    wait_until(lambda: len(proxy.access_lines()) >= 600, TIMEOUT, "600 access lines")
    proxy.stop()
    assert sorted(access_numbers(proxy.lines, origin.port)) == list(range(600))


def test_killed_worker_is_restarted_and_serves(start_proxy, origin):
    """
    A worker killed with SIGKILL is logged with its signal and started again
    after the 1 s restart delay, as a new child of the proxy; the new one
    serves, on the same listening socket as the one killed.
    """
    proxy = start_proxy(workers=2)
    pids = serving(proxy, 2)
    killed = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    proxy.wait_for_line(rf"worker 1 \(pid {pids[1]}\) was killed by signal 9 \(SIGKILL\); restarting it in 1 s",
                        TIMEOUT)
    wait_until(lambda: serving(proxy, 2)[1] != pids[1], TIMEOUT, "worker 1 to serve again")
    assert time.monotonic() - killed >= 1.0
    new = serving(proxy, 2)
    assert children(proxy.pid) == {new[1], pids[2]}
    for i in range(3):
        assert get_from(proxy.port, new[1], [new[1], pids[2]], origin.url(f"/n/{i}")) == (200, b"hello")
    wait_until(lambda: len(proxy.access_lines()) == 3, TIMEOUT, "3 access lines")


def test_sighup_reopens_the_access_log_in_every_worker(start_proxy, origin, tmp_path):
    """
    logrotate renames the access log and sends SIGHUP to the proxy: each
    worker reopens the file at its path (it then holds the new file, not
    the renamed one), so the lines of both go to the new file and the
    earlier ones stay in the renamed file; no worker is restarted.
    """
    log, rotated = tmp_path / "access.log", tmp_path / "access.log.1"
    proxy = start_proxy(workers=2, filter=[{"use": "accesslog", "path": str(log)}])
    pids = serving(proxy, 2)
    workers = list(pids.values())
    for i in (0, 1):
        assert get_from(proxy.port, workers[i], workers, origin.url(f"/n/{i}")) == (200, b"hello")
    wait_until(lambda: log.exists() and len(log.read_text().splitlines()) == 2, TIMEOUT, "2 lines in the log")
    log.rename(rotated)
    os.kill(proxy.pid, signal.SIGHUP)
    for pid in pids.values():
        wait_until(lambda pid=pid: str(log) in open_fds(pid) and str(rotated) not in open_fds(pid), TIMEOUT,
                   f"worker pid {pid} to reopen the log")
    for i in (2, 3):
        assert get_from(proxy.port, workers[i % 2], workers, origin.url(f"/n/{i}")) == (200, b"hello")
    proxy.stop()
    assert sorted(access_numbers(rotated.read_text().splitlines(), origin.port)) == [0, 1]
    assert sorted(access_numbers(log.read_text().splitlines(), origin.port)) == [2, 3]
    assert not [line for line in proxy.lines if "restarting" in line]


def test_sigterm_finishes_in_flight_exchange_then_every_process_exits(start_proxy, origin):
    """
    SIGTERM to the proxy: the listening socket closes at once (in the proxy
    and in every worker), the exchange in flight still completes (with
    ``Connection: close``, RFC 9112 §9.6), then both workers and the proxy
    exit, the proxy killed by that signal as twistd does.
    """
    proxy = start_proxy(workers=2)
    pids = serving(proxy, 2)
    result = []
    slow = threading.Thread(target=lambda: result.append(get(proxy.port, origin.url("/sleep/3"))))
    slow.start()
    wait_until(lambda: len(origin.requests) == 1, TIMEOUT, "the slow request to reach the origin")
    proxy.proc.send_signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        return False

    wait_until(refused, 2, "the listening socket to close")
    assert slow.is_alive()
    slow.join(TIMEOUT)
    assert result == [(200, b"hello", "close")]
    assert proxy.proc.wait(TIMEOUT) == -signal.SIGTERM
    assert all(process_gone(pid) for pid in pids.values())
    for number, pid in pids.items():
        proxy.wait_for_line(rf"worker {number} \(pid {pid}\) exited with status 0")


def test_workers_stop_when_the_proxy_is_killed(start_proxy):
    """A worker does not outlive the proxy: killed with SIGKILL, its workers notice and exit."""
    proxy = start_proxy(workers=2)
    pids = serving(proxy, 2)
    proxy.proc.kill()
    proxy.proc.wait(TIMEOUT)
    for pid in pids.values():
        wait_until(lambda pid=pid: process_gone(pid), TIMEOUT, f"worker pid {pid} to exit")


def test_daemonized_workers_log_to_twistd_log_file(origin, tmp_path):
    """
    As a daemon (``twistd --logfile F`` without ``-n``), standard output is
    /dev/null for the proxy and its workers: each worker's log, access lines
    included (``[proxyframe.accesslog#info]``), reaches F through the proxy,
    one line per exchange, with the worker's number.
    """
    daemon = Daemon(proxy_config(workers=2), tmp_path)
    pid, log_text = daemon.pid, daemon.log_text
    try:
        wait_until(lambda: len(SERVING.findall(log_text())) == 2, TIMEOUT, "two workers serving")
        port = daemon.port()
        pids = {int(m[1]): int(m[2]) for m in SERVING.finditer(log_text())}
        assert children(pid) == set(pids.values())
        for worker in pids.values():
            assert os.readlink(f"/proc/{worker}/fd/1") == os.devnull
        workers = list(pids.values())
        assert get_from(port, pids[2], workers, origin.url("/n/1")) == (200, b"hello")
        assert get_from(port, pids[1], workers, origin.url("/n/2")) == (200, b"hello")
        access = re.compile(r"\[proxyframe\.worker#info\] worker (\d): \[proxyframe\.accesslog#info\] ("
                            + access_pattern(origin.port) + ")$", re.MULTILINE)
        wait_until(lambda: len(access.findall(log_text())) == 2, TIMEOUT, "2 access lines in the log file")
    finally:
        daemon.stop()
    assert sorted((int(m[1]), int(m[3])) for m in access.finditer(log_text())) == [(1, 2), (2, 1)]
    assert all(process_gone(worker) for worker in pids.values())
    assert not daemon.pidfile.exists()


def test_endpoint_that_cannot_be_shared_stops_the_start(tmp_path):
    """
    With workers, a listener other than ``tcp:``/``tcp6:`` (here a UNIX
    socket) stops the start with status 1 and one line saying why; no
    worker is started.
    """
    config = tmp_path / "unix.toml"
    config.write_text(f'workers = 2\nlisten = ["unix:{tmp_path / "proxy.sock"}"]\n')
    result = subprocess.run(twistd_command() + ["-n", "--pidfile=", "proxyframe", "--config", str(config)],
                            cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout, result.stdout
    (line,) = [line for line in result.stdout.splitlines() if "cannot listen" in line]
    assert f"unix:{tmp_path / 'proxy.sock'}: workers = 2 can share only tcp: and tcp6: endpoints" in line
    assert "serving" not in result.stdout


# -- configuration --------------------------------------------------------------------

def test_workers_default_is_one_per_core():
    """``workers`` defaults to 0, which runs one worker per core (os.cpu_count())."""
    assert Config().workers == 0
    assert worker_count(Config()) == (os.cpu_count() or 1)
    assert worker_count(Config(workers=3)) == 3


@pytest.mark.parametrize("value, message", [
    ("-1", "workers must be 0 (one per core) or more, not -1"),
    ('"2"', "workers must be an integer, not '2'"),
    ("1.5", "workers must be an integer, not 1.5"),
])
def test_bad_workers_value_is_a_config_error(tmp_path, value, message):
    """A negative or non-integer ``workers`` is a ConfigError naming the file and the key."""
    path = tmp_path / "proxyframe.toml"
    path.write_text(f"workers = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}: {message}"


@pytest.mark.parametrize("workers, kind", [(1, ProxyService), (2, WorkersService)])
def test_make_service_supervises_only_several_workers(workers, kind):
    """One worker is today's single process (no supervisor); more is a supervisor of that many."""
    service = makeService({"proxy_config": Config(workers=workers), "proxy_chain": Chain([])})
    assert type(service) is kind
    if kind is WorkersService:
        assert service.count == workers


# -- the supervisor's bookkeeping, with a fake reactor ---------------------------------

class FakeProcess:
    """The transport ``spawnProcess`` returns: a pid and the signals sent to it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class ProcessClock(Clock):
    """A Clock whose ``spawnProcess`` records each call and connects a FakeProcess."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple] = []
        #: How many of the next calls fail as fork() does without memory.
        self.failures = 0

    def spawnProcess(self, protocol, executable, args, env, childFDs):
        if self.failures:
            self.failures -= 1
            raise OSError(12, "Cannot allocate memory")
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append((protocol, args, childFDs, process))
        protocol.makeConnection(process)
        return process


def end(clock: ProcessClock, index: int, status: Exception) -> None:
    """The process of spawn number *index* ends with *status*."""
    clock.spawned[index][0].processEnded(Failure(status))


def test_workers_get_their_sockets_stdout_and_a_watch_pipe():
    """
    Each worker runs ``python -m proxyframe.worker`` with its number, the
    config file, the listening sockets as fds 3 and up, the supervisor's
    own fd 1, a pipe for its log on fd 2 and a pipe on fd 0 it watches for
    the supervisor's death.
    """
    clock = ProcessClock()
    Workers(2, [[7, 9], [8, 10]], "/etc/proxyframe.toml", 10.0, clock).start()
    (_, args, fds, _), (_, args2, fds2, _) = clock.spawned
    assert args[1:] == ["-m", "proxyframe.worker", "--number", "1", "--sockets", "3,4",
                        "--config", "/etc/proxyframe.toml"]
    assert args2[4] == "2"
    assert fds == {0: "w", 1: 1, 2: "r", 3: 7, 4: 9}
    assert fds2 == {0: "w", 1: 1, 2: "r", 3: 8, 4: 10}


def test_restart_delay_doubles_while_a_worker_keeps_dying_early():
    """
    A worker dying within 10 s of its start is restarted after 1, 2, 4, 8,
    16, then 30 s (the cap); one that ran 10 s or more is restarted after
    1 s again.
    """
    clock = ProcessClock()
    workers = Workers(1, [[3]], None, 10.0, clock)
    workers.start()
    delays = []
    for run in [0.5] * 7 + [10.0, 0.5]:
        clock.advance(run)
        spawned = len(clock.spawned)
        end(clock, -1, ProcessTerminated(exitCode=1))
        waited = 0.0
        while len(clock.spawned) == spawned:
            clock.advance(0.5)
            waited += 0.5
        delays.append(waited)
    assert delays == [1, 2, 4, 8, 16, 30, 30, 1, 2]
    assert "--config" not in clock.spawned[-1][1]


def test_worker_that_cannot_be_started_is_tried_again_later():
    """
    When fork fails (no memory), the supervisor logs it and tries again
    with the same doubling delay, instead of losing that worker.
    """
    clock = ProcessClock()
    clock.failures = 2
    with capturedLogs() as events:
        Workers(1, [[3]], None, 10.0, clock).start()
        clock.advance(1.0)
        assert clock.spawned == []
        clock.advance(2.0)
    assert len(clock.spawned) == 1
    assert [e["delay"] for e in events if "cannot be started" in e["log_format"]] == [1.0, 2.0]


def test_stop_terminates_every_worker_and_kills_the_stubborn():
    """
    stop() sends SIGTERM to every worker, restarts none, and fires once all
    have exited; one still running ``shutdown_grace`` + 5 s later gets
    SIGKILL.
    """
    clock = ProcessClock()
    workers = Workers(2, [[3], [4]], None, 10.0, clock)
    workers.start()
    processes = [spawn[3] for spawn in clock.spawned]
    stopped = []
    workers.stop().addCallback(stopped.append)
    assert [p.signals for p in processes] == [["TERM"], ["TERM"]]
    end(clock, 0, ProcessDone(0))
    clock.advance(10.0 + KILL_AFTER - 0.1)
    assert processes[1].signals == ["TERM"] and stopped == []
    clock.advance(0.1)
    assert processes[1].signals == ["TERM", "KILL"]
    end(clock, 1, ProcessTerminated(signal=9))
    assert stopped == [None]
    clock.advance(60)
    assert len(clock.spawned) == 2


def test_stop_cancels_a_pending_restart():
    """A worker waiting for its restart delay when the stop comes is not started again."""
    clock = ProcessClock()
    workers = Workers(1, [[3]], None, 10.0, clock)
    workers.start()
    end(clock, 0, ProcessTerminated(signal=9))
    stopped = []
    workers.stop().addCallback(stopped.append)
    assert stopped == [None]
    clock.advance(60)
    assert len(clock.spawned) == 1


def test_worker_log_lines_are_logged_again_at_their_level():
    """
    A worker's events, written by format_event (one line each, even with a
    traceback), are logged by the supervisor at the same level as
    ``worker N: [namespace#level] text``, split reads and all; a line the
    worker's logger did not write (a crash before logging started) is an
    error.
    """
    clock = ProcessClock()
    Workers(1, [[3]], None, 10.0, clock).start()
    protocol = clock.spawned[0][0]
    lines = (format_event({"log_level": LogLevel.warn, "log_namespace": "ns", "log_format": "two\nlines \\ {x}",
                           "x": 1}) + format_event({"log_level": LogLevel.info, "log_namespace": "ns",
                                                    "log_format": "plain"})).encode()
    with capturedLogs() as events:
        for i in range(len(lines)):
            protocol.childDataReceived(2, lines[i:i + 1])
        protocol.childDataReceived(2, b"Traceback (most recent call last):\n")
        protocol.childConnectionLost(2)
    relayed = [(e["log_level"], e["log_namespace"], e["worker"], e["text"]) for e in events]
    assert relayed == [
        (LogLevel.warn, "proxyframe.worker", 1, "[ns#warn] two\nlines \\ 1"),
        (LogLevel.info, "proxyframe.worker", 1, "[ns#info] plain"),
        (LogLevel.error, "proxyframe.worker", 1, "Traceback (most recent call last):"),
    ]
