"""
A real ``redis-server`` for the tests (:class:`RedisServer`, started by the
``start_redis`` fixture in ``conftest.py``) and a blocking client to look at
it behind the stores' back (:class:`RawRedis`).
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A ``redis-server`` on 127.0.0.1 that persists nothing; it can be stopped and started on the same port."""

    def __init__(self, executable: str, directory: Path, password: str | None) -> None:
        self.executable = executable
        self.directory = directory
        self.password = password
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        args = [self.executable, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                "--appendonly", "no", "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")]
        if self.password is not None:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                RawRedis(self.port, self.password).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    log = (self.directory / "redis.log").read_text()
                    raise RuntimeError(f"redis-server did not start: {log}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def raw(self, db: int = 0) -> RawRedis:
        return RawRedis(self.port, self.password, db)


class RawRedis:
    """A blocking RESP client for looking at Redis behind the store's back (tests only)."""

    def __init__(self, port: int, password: str | None = None, db: int = 0) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._file = self._sock.makefile("rb")
        if password is not None:
            self.command("AUTH", password)
        self.command("SELECT", str(db))

    def send(self, *args: str | bytes) -> None:
        parts = [a if isinstance(a, bytes) else a.encode() for a in args]
        self._sock.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))

    def command(self, *args: str | bytes):
        self.send(*args)
        line = self._file.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            if rest == b"-1":
                return None
            data = self._file.read(int(rest) + 2)
            return data[:-2]
        raise RuntimeError(f"unexpected reply {line!r}")

    def close(self) -> None:
        self._file.close()
        self._sock.close()
