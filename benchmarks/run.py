#!/usr/bin/env python3
"""Benchmark proxyframe against tinyproxy, Squid and a direct connection.

Starts a local nginx origin, tinyproxy, Squid and proxyframe on 127.0.0.1,
then measures, in the same run and interleaved:

(a) small responses with keep-alive: ``wrk`` requests/s for a 1 KiB body;
(b) a large download: ``curl`` MB/s (10**6 bytes/s) for a 64 MiB body;
(c) cache hits: ``wrk`` requests/s for a fresh 1 KiB stored response, through
    Squid and proxyframe with their memory caches on, checked against the
    origin's request counter (a hit never reaches the origin).

Python 3 standard library only.  See benchmarks/README.rst.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import http.client
import json
import os
import pwd
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
TARGETS = ("direct", "tinyproxy", "squid", "proxyframe", "squid-cache",
           "proxyframe-cache")
#: Targets of tests (a) and (b): everything relayed, nothing cached.
RELAY_TARGETS = ("direct", "tinyproxy", "squid", "proxyframe")
#: Targets of test (c): shared caches answering from memory.
CACHE_TARGETS = ("squid-cache", "proxyframe-cache")
SMALL_PATH = "/small"
CACHEABLE_PATH = "/cacheable"     # 1 KiB, Cache-Control: max-age=3600
STATUS_PATH = "/__origin_status"  # nginx stub_status: the request counter
# Squid will not run as root: it switches to this user (cache_effective_user).
SQUID_USER = "proxy"
READY_TIMEOUT = 15.0              # seconds
STOP_GRACE = 5.0                  # seconds between SIGTERM and SIGKILL
CURL_TIMEOUT = 120.0              # seconds per download
INSTALL_HINT = "apt-get install nginx wrk tinyproxy squid curl"
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
    """Return the last lines of a log file (a note if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return b"\n".join(f.read().splitlines()[-lines:]).decode(
                errors="replace")
    except OSError as exc:
        return "(%s: %s)" % (path, exc.strerror)


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
    if "squid" in targets or "squid-cache" in targets:
        names.append("squid")
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
    for name in ("small", "cacheable"):
        with open(os.path.join(www, name), "wb") as f:
            f.write(b"x" * (SMALL_SIZE - 1) + b"\n")
    large = os.path.join(www, "large")
    try:
        os.link(cached_large_file(), large)
    except OSError:
        shutil.copyfile(cached_large_file(), large)
    os.chmod(www, 0o755)
    for name in os.listdir(www):
        os.chmod(os.path.join(www, name), 0o644)
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
        location = /cacheable {{
            add_header Cache-Control "max-age=3600" always;
        }}
        # Counts the requests that reach the origin (test (c)).
        location = /__origin_status {{ stub_status; }}
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

# Squid: loopback only (also its DNS client socket, which sends nothing as
# every request names an IP address), no disk cache, no logs but cache_log.
SQUID_CONF = """\
http_port {host}:{port}
workers 1
{user}pid_filename {dir}/squid.pid
cache_log {dir}/cache.log
access_log none
cache_store_log none
logfile_rotate 0
coredump_dir {dir}
shutdown_lifetime 1 seconds
pinger_enable off
netdb_filename none
icp_port 0
htcp_port 0
digest_generation off
visible_hostname proxyframe-bench
dns_nameservers {host}
udp_incoming_address {host}
udp_outgoing_address {host}
via off
forwarded_for transparent
client_persistent_connections on
server_persistent_connections on
{cache}
acl bench_clients src 127.0.0.0/8
http_access allow bench_clients
http_access deny all
"""

SQUID_CACHE_OFF = """\
cache deny all
cache_mem 8 MB
"""

# Memory cache only: no cache_dir line means no disk cache.
SQUID_CACHE_ON = """\
cache allow all
cache_mem 64 MB
maximum_object_size_in_memory 1 MB
"""

# proxyframe-cache: the default chain (DEFAULT_FILTERS in
# proxyframe/config.py), then the cache filter with its defaults.
PROXYFRAME_CACHE_CONF = """\
listen = ["tcp:{port}:interface={host}"]

[[filter]]
use = "acl"
default = "deny"

[[filter.rules]]
action = "allow"
clients = ["127.0.0.0/8", "::1/128", "::ffff:127.0.0.0/104"]

[[filter]]
use = "accesslog"

[[filter]]
use = "cache"
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


def start_squid(squid: str, tmp: str, name: str, caching: bool) -> Target:
    """Start Squid in the foreground (-N) on a free port.

    With caching, its memory cache is on (no disk cache); without, nothing
    is cached.  Started as root, Squid switches to SQUID_USER, which then
    owns the target's directory (config, pid file, cache_log).
    """
    port = free_port()
    conf_dir = os.path.join(tmp, name)
    os.mkdir(conf_dir)
    user = ""
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam(SQUID_USER)
        except KeyError:
            raise RuntimeError("%s: Squid will not run as root, and there is "
                               "no user %r to switch to" % (name, SQUID_USER))
        os.chown(conf_dir, account.pw_uid, account.pw_gid)
        user = "cache_effective_user %s\n" % SQUID_USER
    conf = os.path.join(conf_dir, "squid.conf")
    with open(conf, "w") as f:
        f.write(SQUID_CONF.format(
            host=HOST, port=port, dir=conf_dir, user=user,
            cache=SQUID_CACHE_ON if caching else SQUID_CACHE_OFF))
    run_bounded([squid, "-k", "parse", "-f", conf], 30)
    log_path = os.path.join(conf_dir, "cache.log")
    proc = spawn([squid, "-N", "-f", conf],
                 os.path.join(conf_dir, "stdout.log"))
    wait_ready(proc, port, log_path)
    return Target(name, port, proc, log_path)


def start_proxyframe(python: str, tmp: str, name: str) -> Target:
    """Start proxyframe (twistd plugin, access log on) on a free port.

    "proxyframe" runs with the built-in config (the default filter chain);
    "proxyframe-cache" with a config file adding the cache filter.  The
    access log goes to standard output, which is the target's log file.
    """
    port = free_port()
    log_path = os.path.join(tmp, name + ".log")
    argv = [python, "-c", TWISTD, "-n", "--pidfile=", "proxyframe"]
    if name == "proxyframe-cache":
        conf = os.path.join(tmp, name + ".toml")
        with open(conf, "w") as f:
            f.write(PROXYFRAME_CACHE_CONF.format(host=HOST, port=port))
        argv += ["--config", conf]
    else:
        argv += ["--listen", "tcp:%d:interface=%s" % (port, HOST)]
    proc = spawn(argv, log_path, cwd=REPO_ROOT)
    wait_ready(proc, port, log_path)
    return Target(name, port, proc, log_path)


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
        elif name in ("squid", "squid-cache"):
            targets.append(start_squid(tools["squid"], tmp, name,
                                       caching=name == "squid-cache"))
        else:
            targets.append(start_proxyframe(args.python, tmp, name))
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


def check_relay(curl: str, target: Target, origin_port: int,
                path: str = SMALL_PATH) -> None:
    """Fetch path (1 KiB) once through target; raise RuntimeError if wrong."""
    url = "http://%s:%d%s" % (HOST, origin_port, path)
    body = run_bounded(curl_argv(curl, target, url), CURL_TIMEOUT + 10)
    if len(body) != SMALL_SIZE:
        raise RuntimeError("%s: GET %s returned %d bytes, not %d:\n%s"
                           % (target.name, path, len(body), SMALL_SIZE,
                              body[:300]))


def origin_count(origin_port: int) -> int:
    """Return nginx's count of requests handled, this one included.

    Two calls around a measurement: origin requests during it = second -
    first - 1 (the first call's own request).
    """
    conn = http.client.HTTPConnection(HOST, origin_port, timeout=5)
    try:
        conn.request("GET", STATUS_PATH)
        text = conn.getresponse().read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as exc:
        raise RuntimeError("origin request counter: %s" % exc)
    finally:
        conn.close()
    # "Active connections: 1\nserver accepts handled requests\n 1 1 1\n..."
    try:
        return int(text.splitlines()[2].split()[2])
    except (IndexError, ValueError):
        raise RuntimeError("origin request counter: unexpected %r" % text)


def warm_cache(curl: str, target: Target, origin_port: int) -> int:
    """GET /cacheable once through target; return the origin requests it
    caused (1 when that first request was a miss forwarded to the origin).
    """
    before = origin_count(origin_port)
    check_relay(curl, target, origin_port, CACHEABLE_PATH)
    return origin_count(origin_port) - before - 1


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
wrk.path = "http://{host}:{port}{path}"
wrk.headers["Host"] = "{host}:{port}"
"""


def write_lua(tmp: str, origin_port: int) -> dict:
    """Write the wrk scripts; return {None: direct, path: proxy script}.

    Direct requests take the path from wrk's URL; through a proxy, the
    script for each path sends it in absolute-form.
    """
    scripts = {None: ("direct", LUA_DONE)}
    for path in (SMALL_PATH, CACHEABLE_PATH):
        scripts[path] = ("proxy-" + path.strip("/"), LUA_ABSOLUTE.format(
            host=HOST, port=origin_port, path=path) + LUA_DONE)
    paths = {}
    for key, (name, text) in scripts.items():
        paths[key] = os.path.join(tmp, name + ".lua")
        with open(paths[key], "w") as f:
            f.write(text)
    return paths


def test_wrk(wrk: str, lua: dict, target: Target, path: str,
             origin_port: int, args) -> dict:
    """Run wrk for path through target (or direct) for args.duration s.

    Returns wrk's counters (requests, bytes, socket errors connect/read/
    write/timeout, status = responses with status >= 400) plus "rps",
    requests per second, and "origin", the requests that reached the
    origin meanwhile (by its counter, read before and after).
    """
    if target.port is None:
        script, port = lua[None], origin_port
    else:
        script, port = lua[path], target.port
    url = "http://%s:%d%s" % (HOST, port, path)
    before = origin_count(origin_port)
    out = run_bounded([wrk, "-t1", "-c%d" % args.connections,
                       "-d%ds" % args.duration, "-s", script, url],
                      timeout=args.duration + 30)
    origin = origin_count(origin_port) - before - 1
    lines = [line for line in out.splitlines()
             if line.startswith('{"requests"')]
    if not lines:
        raise RuntimeError("no summary from wrk:\n" + out)
    result = json.loads(lines[-1])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["origin"] = origin
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
    """Return an empty per-target result record.

    "origin" holds the origin requests during each wrk run.
    """
    return {"rps": [], "requests": 0, "connect": 0, "read": 0, "write": 0,
            "timeout": 0, "status": 0, "origin": [], "mbps": [],
            "downloads": 0, "notes": []}


def record_wrk(res: dict, small: dict) -> None:
    """Add one wrk result to a target's record."""
    res["rps"].append(small["rps"])
    res["origin"].append(small["origin"])
    for key in ("requests", "connect", "read", "write", "timeout", "status"):
        res[key] += small[key]


def median(values: list) -> float | None:
    """Median of values, or None when there are none."""
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 1) -> str:
    """Format a number, or '-' for a missing one."""
    return "-" if value is None else "%.*f" % (digits, value)


ROW = "%-11s %10s %9s %10s %18s %11s %10s %9s"
CACHE_ROW = "%-16s %10s %9s %18s %18s %11s"


def errors_text(res: dict) -> str:
    """wrk's socket errors connect/read/write/timeout, totals."""
    return "%d/%d/%d/%d" % (res["connect"], res["read"], res["write"],
                            res["timeout"])


def print_table(results: dict, args) -> None:
    """Print the medians, error totals and ratios of (a)+(b), then (c)."""
    relay = {n: r for n, r in results.items() if n in RELAY_TARGETS}
    cache = {n: r for n, r in results.items() if n in CACHE_TARGETS}
    print()
    print("%d round(s); wrk -t1 -c%d -d%ds" % (args.rounds, args.connections,
                                               args.duration))
    if relay:
        print()
        print("(a) small: wrk for %s (1 KiB, keep-alive); (b) large: curl "
              "64 MiB x %d per round" % (SMALL_PATH, args.large_n))
        print(ROW % ("target", "small r/s", "requests", "origin/req",
                     "sock err c/r/w/t", "non-2xx/3xx", "large MB/s",
                     "sha256 ok"))
        for name, res in relay.items():
            print(ROW % (name, fmt(median(res["rps"])), res["requests"],
                         fmt(sum(res["origin"]) / res["requests"], 3)
                         if res["requests"] else "-",
                         errors_text(res), res["status"],
                         fmt(median(res["mbps"])),
                         "%d/%d" % (len(res["mbps"]), res["downloads"])))
        print("r/s, MB/s: medians over rounds (and downloads); requests, "
              "errors: totals over all rounds;")
        print("origin/req: origin requests / wrk requests in (a), totals "
              "(~1: every request relayed)")
        for base in ("tinyproxy", "squid", "direct"):
            if "proxyframe" in relay and base in relay:
                print("proxyframe/%-9s small %sx, large %sx" % (
                    base, ratio(results, "rps", "proxyframe", base),
                    ratio(results, "mbps", "proxyframe", base)))
    if cache:
        print()
        print("(c) cache hits: wrk for %s (1 KiB, max-age=3600), stored by "
              "one GET before round 1" % CACHEABLE_PATH)
        print(CACHE_ROW % ("target", "hit r/s", "requests",
                           "origin req/round", "sock err c/r/w/t",
                           "non-2xx/3xx"))
        for name, res in cache.items():
            print(CACHE_ROW % (name, fmt(median(res["rps"])),
                               res["requests"],
                               "/".join(map(str, res["origin"])) or "-",
                               errors_text(res), res["status"]))
        print("origin req/round: requests that reached the origin during "
              "each round's wrk run (0: all hits)")
        if len(cache) == 2:
            print("proxyframe-cache/squid-cache hit %sx" % ratio(
                results, "rps", "proxyframe-cache", "squid-cache"))
    for name, res in results.items():
        for note in res["notes"]:
            print("note: %s: %s" % (name, note))


def ratio(results: dict, key: str, ours: str, base: str) -> str:
    """Format median(results[ours][key]) / median(results[base][key])."""
    mine = median(results[ours][key])
    theirs = median(results[base][key])
    return fmt(mine / theirs, 2) if mine and theirs else "-"


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


def wrk_round(rnd: int, test: str, path: str, targets: list,
              results: dict, lua: dict, origin_port: int, tools: dict,
              args) -> None:
    """Run wrk for path once for each target, recording into results."""
    for t in targets:
        try:
            small = test_wrk(tools["wrk"], lua, t, path, origin_port, args)
        except RuntimeError as exc:
            results[t.name]["notes"].append("round %d wrk: %s" % (rnd, exc))
            continue
        record_wrk(results[t.name], small)
        log("round %d %-5s %-16s %8.1f r/s  %s" % (
            rnd, test, t.name, small["rps"], json.dumps(small)))


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
            log("round %d large %-16s %8.1f MB/s" % (rnd, t.name, mbps))


def of(targets: list, names: tuple) -> list:
    """Return the targets whose name is in names."""
    return [t for t in targets if t.name in names]


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
    for t in targets:
        if t.name in CACHE_TARGETS:
            log("warm %s: GET %s, %d origin request(s)" % (
                t.name, CACHEABLE_PATH,
                warm_cache(tools["curl"], t, origin_port)))
    results = {t.name: new_result() for t in targets}
    for rnd in range(1, args.rounds + 1):
        wrk_round(rnd, "small", SMALL_PATH, of(targets, RELAY_TARGETS),
                  results, lua, origin_port, tools, args)
        targets = drop_dead(targets, results)
        large_round(rnd, of(targets, RELAY_TARGETS), results, sha256,
                    origin_port, tools, args, tmp)
        targets = drop_dead(targets, results)
        wrk_round(rnd, "hit", CACHEABLE_PATH, of(targets, CACHE_TARGETS),
                  results, lua, origin_port, tools, args)
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
