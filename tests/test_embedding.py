"""
The embedding example (docs/examples/embed.py) run as a user would run it:
a subprocess that listens, relays through ProxyFactory, and stops cleanly on
a signal.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
import threading

import pytest

from support import REPO, body_bytes

EXAMPLE = REPO / "docs" / "examples" / "embed.py"
LISTENING = re.compile(r"^listening on (\S+):(\d+)$")


class Embedded:
    """docs/examples/embed.py as a subprocess; its output lines are collected in :attr:`lines`."""

    def __init__(self, *args: str) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLE), *args],
            env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            # A shell without job control starts background jobs with SIGINT
            # ignored; give the example the default disposition, as in a terminal.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.address: tuple[str, int] | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = LISTENING.match(line.rstrip("\n"))
            if m and self.address is None:
                self.address = (m[1], int(m[2]))
                self._ready.set()
        self._ready.set()

    def wait_listening(self) -> tuple[str, int]:
        self._ready.wait(30)
        assert self.address is not None, "no 'listening on' line:\n" + "\n".join(self.lines)
        return self.address

    def wait(self) -> int:
        """Wait (bounded) for the exit status and for the last output line."""
        status = self.proc.wait(20)
        self._reader.join(10)
        return status

    def stop(self, sig: int) -> int:
        """Send *sig*; :returns: the exit status."""
        self.proc.send_signal(sig)
        return self.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def embedded():
    """``embedded(*args)`` starts the example; every one is killed at teardown if still running."""
    started: list[Embedded] = []

    def start(*args: str) -> Embedded:
        started.append(Embedded(*args))
        return started[-1]

    yield start
    for proc in started:
        proc.kill()


def relay(address: tuple[str, int], url: str) -> tuple[int, bytes, str | None]:
    """GET *url* through the proxy at *address* with http.client; returns status, body, Via."""
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request("GET", url)
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("via")
    finally:
        conn.close()


def test_example_relays_and_exits_on_sigterm(embedded, origin):
    """
    embed.py with --listen tcp:0 prints its address, relays a request to the
    origin in origin-form with Via added (RFC 9110 §7.6.3, RFC 9112 §3.2.1),
    writes an access-log line, and exits 0 on SIGTERM.
    """
    proc = embedded("--listen", "tcp:0:interface=127.0.0.1")
    address = proc.wait_listening()
    assert address[0] == "127.0.0.1"
    status, body, via = relay(address, origin.url("/bytes/3000?seed=11"))
    assert (status, body, via) == (200, body_bytes(3000, seed=11), "1.1 proxyframe")
    (seen,) = origin.requests
    assert (seen.method, seen.target, seen.version) == ("GET", "/bytes/3000?seed=11", "HTTP/1.1")
    assert seen.header("host") == f"127.0.0.1:{origin.port}"
    assert seen.header("via") == "1.1 proxyframe"
    assert proc.stop(signal.SIGTERM) == 0
    assert any(f" TCP_MISS/200 3000 GET {origin.url('/bytes/3000?seed=11')} " in line
               for line in proc.lines), proc.lines
    assert not any("Traceback" in line for line in proc.lines), proc.lines


def test_example_reads_config_and_exits_on_sigint(embedded, origin, tmp_path):
    """
    embed.py --config FILE uses that file (here its Via pseudonym), and exits
    0 on SIGINT (Ctrl-C) after the port is closed.
    """
    config = tmp_path / "embed.toml"
    config.write_text('via = "embedded-test"\n')
    proc = embedded("--listen", "tcp:0:interface=127.0.0.1", "--config", str(config))
    address = proc.wait_listening()
    status, body, via = relay(address, origin.url("/"))
    assert (status, body, via) == (200, b"hello", "1.1 embedded-test")
    assert [r.header("via") for r in origin.requests] == ["1.1 embedded-test"]
    assert proc.stop(signal.SIGINT) == 0
    with pytest.raises(ConnectionRefusedError):
        relay(address, origin.url("/"))
    assert len(origin.requests) == 1


def test_example_reports_bad_config_without_traceback(embedded, tmp_path):
    """A bad config file makes embed.py exit 2 with the ConfigError message (file and key), no traceback."""
    config = tmp_path / "bad.toml"
    config.write_text("[timeouts]\nresponse = 0\n")
    proc = embedded("--config", str(config))
    assert proc.wait() == 2
    output = "\n".join(proc.lines)
    assert f"{config}: timeouts.response must be greater than 0" in output
    assert "Traceback" not in output
    assert proc.address is None
