#!/usr/bin/env python3
"""Benchmark proxyframe against tinyproxy and a direct connection.

Starts a local nginx origin, tinyproxy and proxyframe on 127.0.0.1, then
measures, in the same run and interleaved:

(a) small responses with keep-alive: ``wrk`` requests/s for a 1 KiB body;
(b) a large download: ``curl`` MB/s (10**6 bytes/s) for a 64 MiB body.

Python 3 standard library only.  See benchmarks/README.rst.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import namedtuple

HOST = "127.0.0.1"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = "/tmp/proxyframe-bench-cache"
SMALL_SIZE = 1024                 # bytes
LARGE_SIZE = 64 * 1024 * 1024     # bytes
TARGETS = ("direct", "tinyproxy", "proxyframe")
READY_TIMEOUT = 15.0              # seconds
STOP_GRACE = 5.0                  # seconds between SIGTERM and SIGKILL
CURL_TIMEOUT = 120.0              # seconds per download
INSTALL_HINT = "apt-get install nginx wrk tinyproxy curl"
PROXY_ENV_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
# twistd with a given interpreter: "python -m twisted" is the "twist" runner,
# which has no -n/--pidfile options, and twisted.scripts.twistd has no
# __main__ block.
TWISTD = "from twisted.scripts.twistd import run; run()"

# A target under test; port, proc and log are None for "direct".
Target = namedtuple("Target", "name port proc log")

_procs = []  # every Popen we started; each leads its own process group


# --------------------------------------------------------------------------
# processes


def child_env() -> dict:
    """Return our environment minus proxy variables (curl obeys them)."""
    return {k: v for k, v in os.environ.items()
            if k.lower() not in PROXY_ENV_VARS}


def spawn(argv: list, log_path: str | None = None,
          cwd: str | None = None) -> subprocess.Popen:
    """Start argv in its own process group; output to log_path or a pipe."""
    if log_path:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    cwd=cwd, env=child_env(),
                                    start_new_session=True)
    else:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE,
                                cwd=cwd, env=child_env(),
                                start_new_session=True)
    _procs.append(proc)
    return proc


def exited(proc: subprocess.Popen) -> bool:
    """True if proc has exited; does not reap it, so its PID stays ours."""
    if proc.returncode is not None:
        return True
    info = os.waitid(os.P_PID, proc.pid,
                     os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info is not None and info.si_pid == proc.pid


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM proc's process group, wait STOP_GRACE s, then SIGKILL it.

    The leader is reaped only at the end, so the group id cannot have been
    reused by a process we did not start.
    """
    if proc.returncode is not None:  # already reaped (ran to completion)
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + STOP_GRACE
    while not exited(proc) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leader or stragglers left
    except ProcessLookupError:
        pass
    proc.wait()


def stop_all() -> None:
    """Stop every process we started (idempotent)."""
    while _procs:
        stop(_procs.pop())


def run_bounded(argv: list, timeout: float) -> str:
    """Run argv to completion within timeout seconds; return its stdout.

    Raises RuntimeError on a non-zero exit status or a timeout.
    """
    proc = spawn(argv)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError("%s: no result after %.0f s" % (argv[0], timeout))
    finally:
        stop(proc)
        _procs.remove(proc)
    if proc.returncode != 0:
        raise RuntimeError("%s exited with %d: %s" % (
            argv[0], proc.returncode, err.decode(errors="replace").strip()))
    return out.decode(errors="replace")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def tail(path: str, lines: int = 15) -> str:
    """Return the last lines of a log file."""
    with open(path, "rb") as f:
        return b"\n".join(f.read().splitlines()[-lines:]).decode(
            errors="replace")


def wait_ready(proc: subprocess.Popen, port: int, log_path: str) -> None:
    """Wait up to READY_TIMEOUT s until port accepts connections."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if exited(proc):
            raise RuntimeError("%s exited at start-up; log:\n%s"
                               % (proc.args[0], tail(log_path)))
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("%s: port %d not ready after %.0f s; log:\n%s"
                       % (proc.args[0], port, READY_TIMEOUT, tail(log_path)))


# --------------------------------------------------------------------------
# origin and proxies


def find_tools(targets: list) -> dict:
    """Map tool name to its path; exit with an install hint if missing."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    names = ["nginx", "wrk", "curl"]
    if "tinyproxy" in targets:
        names.append("tinyproxy")
    tools = {name: shutil.which(name, path=path) for name in names}
    missing = [name for name, found in tools.items() if not found]
    if missing:
        sys.exit("missing: %s; install with: %s"
                 % (", ".join(missing), INSTALL_HINT))
    return tools


def sha256_file(path: str) -> str:
    """Return the hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_large_file() -> str:
    """Return the path of the 64 MiB random file, generating it once."""
    path = os.path.join(CACHE_DIR, "large-64MiB.bin")
    if os.path.isfile(path) and os.path.getsize(path) == LARGE_SIZE:
        return path
    os.makedirs(CACHE_DIR, exist_ok=True)
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "wb") as f:
        for _ in range(LARGE_SIZE >> 20):
            f.write(os.urandom(1 << 20))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def make_www(tmp: str) -> str:
    """Create the origin's document root; return the sha256 of /large."""
    www = os.path.join(tmp, "www")
    os.mkdir(www)
    with open(os.path.join(www, "small"), "wb") as f:
        f.write(b"x" * (SMALL_SIZE - 1) + b"\n")
    large = os.path.join(www, "large")
    try:
        os.link(cached_large_file(), large)
    except OSError:
        shutil.copyfile(cached_large_file(), large)
    for path in (www, large, os.path.join(www, "small")):
        os.chmod(path, 0o755 if os.path.isdir(path) else 0o644)
    return sha256_file(large)


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nodelay on;
    keepalive_timeout 300s;
    keepalive_requests 100000;
    client_body_temp_path {tmp}/nginx-tmp/body;
    proxy_temp_path {tmp}/nginx-tmp/proxy;
    fastcgi_temp_path {tmp}/nginx-tmp/fastcgi;
    uwsgi_temp_path {tmp}/nginx-tmp/uwsgi;
    scgi_temp_path {tmp}/nginx-tmp/scgi;
    server {{
        listen {host}:{port};
        root {tmp}/www;
        location = /small {{ }}
        location = /large {{ }}
        location / {{ return 404; }}
    }}
}}
"""

TINYPROXY_CONF = """\
Listen {host}
Port {port}
MaxClients 1024
Timeout 600
LogLevel Critical
DisableViaHeader Yes
"""


def start_nginx(nginx: str, tmp: str) -> int:
    """Start the nginx origin; return its port."""
    port = free_port()
    conf = os.path.join(tmp, "nginx.conf")
    os.mkdir(os.path.join(tmp, "nginx-tmp"))
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(tmp=tmp, host=HOST, port=port))
    log = os.path.join(tmp, "nginx.out")
    proc = spawn([nginx, "-p", tmp + "/", "-e", tmp + "/nginx-error.log",
                  "-c", conf], log)
    wait_ready(proc, port, log)
    return port


def start_tinyproxy(tinyproxy: str, tmp: str) -> Target:
    """Start tinyproxy in the foreground on a free port."""
    port = free_port()
    conf = os.path.join(tmp, "tinyproxy.conf")
    with open(conf, "w") as f:
        f.write(TINYPROXY_CONF.format(host=HOST, port=port))
    log = os.path.join(tmp, "tinyproxy.log")
    proc = spawn([tinyproxy, "-d", "-c", conf], log)
    wait_ready(proc, port, log)
    return Target("tinyproxy", port, proc, log)


def start_proxyframe(python: str, tmp: str) -> Target:
    """Start proxyframe (twistd plugin, access log on) on a free port."""
    port = free_port()
    log = os.path.join(tmp, "proxyframe.log")
    proc = spawn([python, "-c", TWISTD, "-n", "--pidfile=", "proxyframe",
                  "--listen", "tcp:%d:interface=%s" % (port, HOST)],
                 log, cwd=REPO_ROOT)
    wait_ready(proc, port, log)
    return Target("proxyframe", port, proc, log)


def start_targets(args, tools: dict, tmp: str) -> list:
    """Start the proxies selected by --only; return their Targets."""
    targets = []
    for name in TARGETS:
        if name not in args.only:
            continue
        if name == "direct":
            targets.append(Target("direct", None, None, None))
        elif name == "tinyproxy":
            targets.append(start_tinyproxy(tools["tinyproxy"], tmp))
        else:
            targets.append(start_proxyframe(args.python, tmp))
        log("started %s" % name)
    return targets


def curl_argv(curl: str, target: Target, url: str) -> list:
    """Return a curl command line fetching url through target."""
    argv = [curl, "-sS", "--max-time", str(int(CURL_TIMEOUT))]
    if target.port is None:
        argv += ["--noproxy", "*"]
    else:
        argv += ["-x", "http://%s:%d" % (HOST, target.port)]
    return argv + [url]


def check_relay(curl: str, target: Target, origin_port: int) -> None:
    """Fetch /small once through target; raise RuntimeError if it is wrong."""
    url = "http://%s:%d/small" % (HOST, origin_port)
    body = run_bounded(curl_argv(curl, target, url), CURL_TIMEOUT + 10)
    if len(body) != SMALL_SIZE:
        raise RuntimeError("%s: GET /small returned %d bytes, not %d:\n%s"
                           % (target.name, len(body), SMALL_SIZE, body[:300]))


# --------------------------------------------------------------------------
# tests

LUA_DONE = """\
function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      '{"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, ' ..
      '"read": %d, "write": %d, "timeout": %d, "status": %d}\\n',
      summary.requests, summary.duration, summary.bytes, e.connect,
      e.read, e.write, e.timeout, e.status))
end
"""

LUA_ABSOLUTE = """\
-- Absolute-form requests, as a client sends them to a forward proxy.
wrk.path = "http://{host}:{port}/small"
wrk.headers["Host"] = "{host}:{port}"
"""


def write_lua(tmp: str, origin_port: int) -> dict:
    """Write the wrk scripts; return {"direct": path, "proxy": path}."""
    scripts = {"direct": LUA_DONE,
               "proxy": LUA_ABSOLUTE.format(host=HOST, port=origin_port)
               + LUA_DONE}
    paths = {}
    for name, text in scripts.items():
        paths[name] = os.path.join(tmp, name + ".lua")
        with open(paths[name], "w") as f:
            f.write(text)
    return paths


def test_small(wrk: str, lua: str, port: int, args) -> dict:
    """Run wrk against port for args.duration s.

    Returns wrk's counters (requests, bytes, socket errors connect/read/
    write/timeout, status = responses with status >= 400) plus "rps",
    requests per second.
    """
    url = "http://%s:%d/small" % (HOST, port)
    out = run_bounded([wrk, "-t1", "-c%d" % args.connections,
                       "-d%ds" % args.duration, "-s", lua, url],
                      timeout=args.duration + 30)
    lines = [line for line in out.splitlines()
             if line.startswith('{"requests"')]
    if not lines:
        raise RuntimeError("no summary from wrk:\n" + out)
    result = json.loads(lines[-1])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def test_large(curl: str, target: Target, origin_port: int,
               out_path: str, sha256: str) -> float:
    """Download /large once; return MB/s (10**6 bytes per s of time_total).

    Raises RuntimeError on a failed, short or corrupted download.
    """
    url = "http://%s:%d/large" % (HOST, origin_port)
    argv = curl_argv(curl, target, url)[:-1] + [
        "-o", out_path, "-w", "%{http_code} %{size_download} %{time_total}",
        url]
    try:
        status, size, seconds = run_bounded(argv, CURL_TIMEOUT + 10).split()
        if status != "200" or int(size) != LARGE_SIZE:
            raise RuntimeError("HTTP %s, %s bytes" % (status, size))
        if sha256_file(out_path) != sha256:
            raise RuntimeError("sha256 mismatch")
        return int(size) / float(seconds) / 1e6
    finally:
        if os.path.exists(out_path):
            os.remove(out_path)


# --------------------------------------------------------------------------
# report


def new_result() -> dict:
    """Return an empty per-target result record."""
    return {"rps": [], "requests": 0, "connect": 0, "read": 0, "write": 0,
            "timeout": 0, "status": 0, "mbps": [], "downloads": 0,
            "notes": []}


def record_small(res: dict, small: dict) -> None:
    """Add one wrk result to a target's record."""
    res["rps"].append(small["rps"])
    for key in ("requests", "connect", "read", "write", "timeout", "status"):
        res[key] += small[key]


def median(values: list) -> float | None:
    """Median of values, or None when there are none."""
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 1) -> str:
    """Format a number, or '-' for a missing one."""
    return "-" if value is None else "%.*f" % (digits, value)


ROW = "%-11s %10s %9s %18s %11s %10s %9s"


def print_table(results: dict, args) -> None:
    """Print the medians, error totals and ratios."""
    print()
    print("%d round(s); small: wrk -t1 -c%d -d%ds, 1 KiB, keep-alive; "
          "large: curl 64 MiB x %d per round" % (
              args.rounds, args.connections, args.duration, args.large_n))
    print(ROW % ("target", "small r/s", "requests", "sock err c/r/w/t",
                 "non-2xx/3xx", "large MB/s", "sha256 ok"))
    for name, res in results.items():
        errors = "%d/%d/%d/%d" % (res["connect"], res["read"],
                                  res["write"], res["timeout"])
        print(ROW % (name, fmt(median(res["rps"])), res["requests"], errors,
                     res["status"], fmt(median(res["mbps"])),
                     "%d/%d" % (len(res["mbps"]), res["downloads"])))
    print("r/s, MB/s: medians over rounds (and downloads); requests, "
          "errors: totals over all rounds")
    for base in ("tinyproxy", "direct"):
        if "proxyframe" in results and base in results:
            print("proxyframe/%-9s small %sx, large %sx" % (
                base, ratio(results, "rps", base),
                ratio(results, "mbps", base)))
    for name, res in results.items():
        for note in res["notes"]:
            print("note: %s: %s" % (name, note))


def ratio(results: dict, key: str, base: str) -> str:
    """Format median(proxyframe[key]) / median(base[key])."""
    ours = median(results["proxyframe"][key])
    theirs = median(results[base][key])
    return fmt(ours / theirs, 2) if ours and theirs else "-"


# --------------------------------------------------------------------------
# main


def parse_args(argv: list | None = None):
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=int, default=10,
                        help="seconds per wrk run (default 10)")
    parser.add_argument("--connections", type=int, default=50,
                        help="wrk connections (default 50)")
    parser.add_argument("--large-n", type=int, default=3,
                        help="64 MiB downloads per target per round "
                        "(default 3)")
    parser.add_argument("--only", nargs="+", choices=TARGETS,
                        default=list(TARGETS), help="targets to measure")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter that runs proxyframe "
                        "(default: this one)")
    return parser.parse_args(argv)


def log(msg: str) -> None:
    """Print progress to stderr."""
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr,
          flush=True)


def small_round(rnd: int, targets: list, results: dict, lua: dict,
                origin_port: int, tools: dict, args) -> None:
    """Run test (a) once for each target, recording into results."""
    for t in targets:
        try:
            small = test_small(tools["wrk"],
                               lua["direct" if t.port is None else "proxy"],
                               t.port or origin_port, args)
        except RuntimeError as exc:
            results[t.name]["notes"].append("round %d wrk: %s" % (rnd, exc))
            continue
        record_small(results[t.name], small)
        log("round %d small %-10s %8.1f r/s  %s" % (
            rnd, t.name, small["rps"], json.dumps(small)))


def large_round(rnd: int, targets: list, results: dict, sha256: str,
                origin_port: int, tools: dict, args, tmp: str) -> None:
    """Run test (b) args.large_n times for each target."""
    download = os.path.join(tmp, "download")
    for t in targets:
        for _ in range(args.large_n):
            results[t.name]["downloads"] += 1
            try:
                mbps = test_large(tools["curl"], t, origin_port, download,
                                  sha256)
            except RuntimeError as exc:
                results[t.name]["notes"].append("round %d curl: %s"
                                                % (rnd, exc))
                continue
            results[t.name]["mbps"].append(mbps)
            log("round %d large %-10s %8.1f MB/s" % (rnd, t.name, mbps))


def drop_dead(targets: list, results: dict) -> list:
    """Return the targets still running; note the ones that exited."""
    alive = []
    for t in targets:
        if t.proc is not None and exited(t.proc):
            results[t.name]["notes"].append(
                "process exited; last log lines:\n" + tail(t.log))
        else:
            alive.append(t)
    return alive


def measure(args, tools: dict, tmp: str) -> dict:
    """Start everything, run all rounds; return {target: result record}."""
    sha256 = make_www(tmp)
    log("/large sha256 %s" % sha256)
    origin_port = start_nginx(tools["nginx"], tmp)
    log("origin nginx on %s:%d" % (HOST, origin_port))
    lua = write_lua(tmp, origin_port)
    targets = start_targets(args, tools, tmp)
    for t in targets:
        check_relay(tools["curl"], t, origin_port)
    results = {t.name: new_result() for t in targets}
    for rnd in range(1, args.rounds + 1):
        small_round(rnd, targets, results, lua, origin_port, tools, args)
        targets = drop_dead(targets, results)
        large_round(rnd, targets, results, sha256, origin_port, tools, args,
                    tmp)
        targets = drop_dead(targets, results)
    return results


def main(argv: list | None = None) -> int:
    """Entry point: set up, measure, print, clean up."""
    args = parse_args(argv)
    tools = find_tools(args.only)
    tmp = tempfile.mkdtemp(prefix="proxyframe-bench-")
    os.chmod(tmp, 0o755)  # nginx workers may run as another user (root)

    def cleanup():
        stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    atexit.register(cleanup)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda num, frame: sys.exit(128 + num))
    try:
        results = measure(args, tools, tmp)
    except RuntimeError as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        cleanup()
    print_table(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
