"""
Test support: a real origin server that records what it receives, body
generators with known hashes, and a proxyframe process started through
``twistd`` like a user would start it.

Everything listens on 127.0.0.1 with port 0.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHUNK = 65536


# -- bodies ---------------------------------------------------------------

def body_chunks(size: int, seed: int = 0, chunk: int = CHUNK):
    """Yield *size* pseudo-random bytes (reproducible from *seed*) in pieces."""
    rng = random.Random(seed)
    left = size
    while left > 0:
        n = min(chunk, left)
        yield rng.randbytes(n)
        left -= n


def body_bytes(size: int, seed: int = 0) -> bytes:
    """The whole body :func:`body_chunks` yields (for small sizes)."""
    return b"".join(body_chunks(size, seed))


def body_sha256(size: int, seed: int = 0) -> str:
    """The sha256 hex digest of :func:`body_chunks`."""
    h = hashlib.sha256()
    for piece in body_chunks(size, seed):
        h.update(piece)
    return h.hexdigest()


# -- origin server ----------------------------------------------------------

@dataclass
class Received:
    """One request as the origin saw it on the wire."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    raw_head: bytes
    connection: int
    body_length: int = 0
    body_sha256: str = hashlib.sha256(b"").hexdigest()
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return ", ".join(values) if values else None

    def header_names(self) -> set[str]:
        return {n.lower() for n, _ in self.headers}


class OriginConnection:
    """The origin's side of one connection: reading requests, writing responses."""

    def __init__(self, sock: socket.socket, number: int) -> None:
        self.sock = sock
        self.number = number
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(CHUNK)
        if not data:
            return False
        self.buf += data
        return True

    def read_head(self) -> bytes | None:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                return None
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        return head

    def read_exact(self, n: int, sink) -> None:
        while n > 0:
            if not self.buf and not self._fill():
                raise EOFError("connection closed in body")
            piece, self.buf = self.buf[:n], self.buf[n:]
            sink(piece)
            n -= len(piece)

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise EOFError("connection closed in chunked body")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def read_request(self) -> Received | None:
        head = self.read_head()
        if head is None:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
        rec = Received(method, target, version, headers, head, self.number)
        h = hashlib.sha256()
        count = [0]

        def sink(piece: bytes) -> None:
            h.update(piece)
            count[0] += len(piece)

        if (rec.header("transfer-encoding") or "").lower() == "chunked":
            while True:
                size = int(self.read_line().split(b";")[0], 16)
                if size == 0:
                    break
                self.read_exact(size, sink)
                self.read_line()
            while line := self.read_line():
                name, value = line.decode("latin-1").split(":", 1)
                rec.trailers.append((name.strip(), value.strip()))
        elif rec.header("content-length"):
            self.read_exact(int(rec.header("content-length")), sink)
        rec.body_length = count[0]
        rec.body_sha256 = h.hexdigest()
        return rec

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


def default_handler(conn: OriginConnection, req: Received) -> bool:
    """
    Serve the built-in routes; returns whether the connection stays open.

    ``/bytes/N[?framing=length|chunked|close][&seed=S]``: N bytes of
    :func:`body_chunks`; ``/status/CODE``: that status, empty body;
    ``/sleep/SECONDS``: waits, then a short body; anything else: 200 with
    body ``b"hello"``.  Every response carries ``X-Origin-Connection`` (the
    connection's number) and ``X-Request-Count``.
    """
    path, _, query = req.target.partition("?")
    params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
    extra = f"X-Origin-Connection: {conn.number}\r\n"
    if path.startswith("/bytes/"):
        size = int(path[len("/bytes/"):])
        seed = int(params.get("seed", "0"))
        framing = params.get("framing", "length")
        if framing == "length":
            conn.send(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n{extra}\r\n".encode())
        elif framing == "chunked":
            conn.send(f"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n{extra}\r\n".encode())
        else:
            conn.send(f"HTTP/1.1 200 OK\r\nConnection: close\r\n{extra}\r\n".encode())
        if req.method == "HEAD":
            return framing != "close"
        for piece in body_chunks(size, seed):
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece) if framing == "chunked" else piece)
        if framing == "chunked":
            conn.send(b"0\r\n\r\n")
        return framing != "close"
    if path.startswith("/status/"):
        code = int(path[len("/status/"):])
        length = "" if code in (204, 304) or code < 200 else "Content-Length: 0\r\n"
        conn.send(f"HTTP/1.1 {code} Status\r\n{length}{extra}\r\n".encode())
        return True
    if path.startswith("/sleep/"):
        time.sleep(float(path[len("/sleep/"):]))
    body = b"hello"
    if req.method == "HEAD":
        body = b""
    conn.send(f"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n{extra}\r\n".encode() + body)
    return True


class Origin:
    """
    An origin server on 127.0.0.1 (port 0) in a background thread, one
    thread per connection, HTTP/1.1 keep-alive.  Every request it receives
    is appended to :attr:`requests`.  Set :attr:`handler` to
    ``fn(conn, received) -> keep_open`` to serve something else, or
    :attr:`raw` to ``fn(sock)`` to speak raw bytes on each connection.
    """

    def __init__(self, tls: ssl.SSLContext | None = None, family=socket.AF_INET,
                 host: str = "127.0.0.1") -> None:
        self.requests: list[Received] = []
        self.handler = default_handler
        self.raw = None
        self.connections = 0
        self._tls = tls
        self._lock = threading.Lock()
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self._sock.listen(128)
        self.host = host
        self.port = self._sock.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def open_connections(self) -> int:
        """Connections the origin has accepted and not yet seen closed."""
        with self._lock:
            return len(self._open)

    def url(self, path: str = "/") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
                self._open.add(sock)
            threading.Thread(target=self._serve, args=(sock, number), daemon=True).start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        try:
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_side=True)
            if self.raw is not None:
                self.raw(sock)
                return
            conn = OriginConnection(sock, number)
            while True:
                req = conn.read_request()
                if req is None:
                    return
                with self._lock:
                    self.requests.append(req)
                if not self.handler(conn, req):
                    return
        except (OSError, EOFError, ssl.SSLError, ValueError):
            return
        finally:
            with self._lock:
                self._open.discard(sock)
            try:
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone
        # would leave that accept() taking connections on Linux.
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            for sock in list(self._open):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def make_tls_context(tmp: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context with a fresh self-signed certificate for 127.0.0.1 and localhost."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "origin-cert.pem", tmp / "origin-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx, cert_path


# -- the proxy process --------------------------------------------------------

_LISTENING = re.compile(r"proxyframe listening on (\S+):(\d+)")
# time.millis, elapsed ms, client, code/status: the accesslog filter's
# default (Squid native) format.
_SQUID_LINE = re.compile(r"\d+\.\d{3} +\d+ \S+ [A-Z_]+/\d{3} ")


def twistd_command() -> list[str]:
    """``twistd`` of the running interpreter's environment."""
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def start_failure(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    """
    Run ``twistd -n proxyframe`` with the config *text* (written to
    ``tmp_path/bad.toml``), expecting it to stop at start: its exit status
    and output, within 60 s.
    """
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return subprocess.run(twistd_command() + ["-n", "--pidfile=", "proxyframe", "--config", str(path)],
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=60)


class ProxyProcess:
    """
    ``twistd -n proxyframe --config FILE`` as a subprocess, using this
    working tree's code (or, with *twistd* and ``pythonpath=None``, an
    installed one).  Its output lines are collected in :attr:`lines`.

    A *config_text* that does not set ``workers`` gets ``workers = 1``, so
    that :attr:`pid` is the one process that serves (its RSS, its signals);
    with ``None`` (no config file at all) the default applies: one worker
    per core under a supervisor.
    """

    def __init__(self, config_text: str | None, tmp: Path, extra_args: list[str] = (),
                 pythonpath: str | None = str(REPO), twistd: list[str] | None = None) -> None:
        config_args = []
        if config_text is not None:  # None: no --config, the built-in defaults
            self.config_path = tmp / f"proxyframe-{id(self)}.toml"
            self.config_path.write_text(_one_worker_unless_set(config_text))
            config_args = ["--config", str(self.config_path)]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["PYTHONUNBUFFERED"] = "1"
        if pythonpath is not None:  # None: an installed proxyframe, no PYTHONPATH at all
            env["PYTHONPATH"] = pythonpath
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            (twistd or twistd_command()) + ["-n", "--pidfile=", "proxyframe", *config_args, *extra_args],
            cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self._listening = threading.Event()
        self.host = self.port = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._listening.wait(30) or self.port is None:
            self.stop()
            raise RuntimeError("proxyframe did not start:\n" + "\n".join(self.lines))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = _LISTENING.search(line)
            if m and not self._listening.is_set():
                self.host, self.port = m[1], int(m[2])
                self._listening.set()
        self._listening.set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_bytes(self) -> int:
        """Resident set size of the proxy process, from /proc."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def access_lines(self) -> list[str]:
        """The default access log's lines (Squid's native format, on stdout)."""
        return [line for line in self.lines if _SQUID_LINE.match(line)]

    def wait_for_line(self, pattern: str, timeout: float = 10.0) -> str:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if regex.search(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(self.lines))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_stdout()
        return self.proc.returncode

    def _close_stdout(self) -> None:
        """
        Close the pipe from the exited process once the reader thread has
        read it to the end (EOF), so that :attr:`lines` is complete.
        """
        self._reader.join(10)
        if not self._reader.is_alive():
            self.proc.stdout.close()


def _one_worker_unless_set(config_text: str) -> str:
    """
    *config_text* with ``workers = 1`` in front (a top-level key, valid
    before anything), unless it sets ``workers`` itself or is not TOML (a
    test of the error then sees its text unchanged).
    """
    try:
        if "workers" in tomllib.loads(config_text):
            return config_text
    except tomllib.TOMLDecodeError:
        return config_text
    return "workers = 1\n" + config_text


def process_gone(pid: int) -> bool:
    """Whether process *pid* has exited (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


class Daemon:
    """
    ``twistd --logfile F --pidfile P proxyframe --config C`` without ``-n``:
    proxyframe as a daemon, as an init script starts it; its log goes to
    the file F (:meth:`log_text`).
    """

    def __init__(self, config_text: str, tmp: Path) -> None:
        config, self.logfile, self.pidfile = tmp / "daemon.toml", tmp / "twistd.log", tmp / "twistd.pid"
        config.write_text(config_text)
        started = subprocess.run(
            twistd_command() + [f"--logfile={self.logfile}", f"--pidfile={self.pidfile}", "proxyframe",
                                "--config", str(config)],
            cwd=tmp, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60)
        assert started.returncode == 0, started.stdout + started.stderr
        wait_until(self.pidfile.exists, 30, "the daemon's pid file")
        self.pid = int(self.pidfile.read_text())

    def log_text(self) -> str:
        return self.logfile.read_text() if self.logfile.exists() else ""

    def port(self) -> int:
        """The port the daemon logged it listens on (waited for)."""
        wait_until(lambda: "proxyframe listening on" in self.log_text(), 30, "the daemon to listen")
        return int(re.search(r"proxyframe listening on 127\.0\.0\.1:(\d+)", self.log_text())[1])

    def stop(self) -> None:
        """SIGTERM, then wait until the process is gone."""
        os.kill(self.pid, signal.SIGTERM)
        wait_until(lambda: process_gone(self.pid), 30, "the daemon to exit")


def proxy_config(**sections) -> str:
    """
    A TOML config listening on 127.0.0.1 port 0; keyword arguments add
    top-level keys (``connect_ports=[443]``) or tables (``timeouts={...}``).
    """
    sections = {"listen": ["tcp:0:interface=127.0.0.1"], **sections}
    lines = []
    tables = []
    for key, value in sections.items():
        if isinstance(value, dict):
            tables.append(f"[{key}]")
            tables.extend(f"{k} = {_toml(v)}" for k, v in value.items())
        else:
            lines.append(f"{key} = {_toml(value)}")
    return "\n".join(lines + tables) + "\n"


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        # An inline table: filter=[{"use": "acl", ...}] is [[filter]].
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


# -- raw client -------------------------------------------------------------------

def raw_exchange(port: int, data: bytes, timeout: float = 10.0, host: str = "127.0.0.1") -> bytes:
    """
    Send *data* to the proxy on a fresh connection and read until the proxy
    closes it (or *timeout*); returns everything received.
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                piece = sock.recv(CHUNK)
            except (socket.timeout, ConnectionResetError):
                break
            if not piece:
                break
            chunks.append(piece)
        return b"".join(chunks)


def read_response(sock: socket.socket, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """
    Read one response from *sock* with http.client's parser; returns
    (status, lowercased headers, body).
    """
    import http.client

    resp = http.client.HTTPResponse(sock, method=method)
    resp.begin()
    body = resp.read()
    headers = {k.lower(): v for k, v in resp.getheaders()}
    return resp.status, headers, body


def tempdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="proxyframe-test-"))


# -- waiting -----------------------------------------------------------------------

def pipe_descriptors(pid: int) -> int:
    """How many pipe ends process *pid* has open (from ``/proc/PID/fd``)."""
    fds = f"/proc/{pid}/fd"
    count = 0
    for name in os.listdir(fds):
        try:
            count += os.readlink(f"{fds}/{name}").startswith("pipe:")
        except FileNotFoundError:
            pass
    return count


def wait_until(condition, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll *condition* until it is true; fail the test after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
