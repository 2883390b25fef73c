#!/usr/bin/env python3
"""Benchmark proxyframe against Squid, Tinyproxy, proxy.py and no proxy.

Starts a local nginx origin (HTTP, and TLS for the tunnel test), Tinyproxy,
Squid, proxy.py and proxyframe on 127.0.0.1, then measures, in the same run
and interleaved:

(a) small responses with keep-alive: ``wrk`` requests/s for a 1 KiB body,
    and the CPU time of each proxy's process tree per 10k requests;
(b) a large download: ``curl`` MB/s (10**6 bytes/s) for a 64 MiB body, and
    how much the proxy's memory (RSS) grows meanwhile;
(c) cache hits: ``wrk`` requests/s for a fresh 1 KiB stored response, through
    Squid and proxyframe with their memory caches on, checked against the
    origin's request counter (a hit never reaches the origin);
(d) a CONNECT tunnel: ``curl`` MB/s for the same 64 MiB body over TLS;
(e) memory with 1000 idle keep-alive clients: the proxy's RSS;
(f) the cost of filters: proxyframe with acl + auth (Basic) + accesslog
    against proxyframe with no filter, wrk requests/s;
(g) the floor: ``benchmarks/twisted_relay.py``, a Twisted process that only
    copies bytes between each client and its own origin connection, wrk
    requests/s and CPU per 10k requests as in (a);

then prints issue 5's targets, each met or not.

Python 3 standard library only.  See benchmarks/README.rst.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import hashlib
import http.client
import json
import os
import pwd
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import namedtuple

HOST = "127.0.0.1"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = "/tmp/proxyframe-bench-cache"
SMALL_SIZE = 1024                 # bytes
LARGE_SIZE = 64 * 1024 * 1024     # bytes
MIB = 1024 * 1024                 # bytes
TARGETS = ("direct", "tinyproxy", "squid", "proxypy", "proxyframe",
           "squid-cache", "proxyframe-cache", "proxyframe-bare",
           "proxyframe-filters", "twisted-relay")
#: Targets of tests (a), (b) and (d): everything relayed, nothing cached.
RELAY_TARGETS = ("direct", "tinyproxy", "squid", "proxypy", "proxyframe")
#: Targets of test (e): the relaying proxies.
IDLE_TARGETS = ("tinyproxy", "squid", "proxypy", "proxyframe")
#: Targets of test (c): shared caches answering from memory.
CACHE_TARGETS = ("squid-cache", "proxyframe-cache")
#: Targets of test (f): proxyframe without and with acl + auth + accesslog.
FILTER_TARGETS = ("proxyframe-bare", "proxyframe-filters")
#: Test (g): the floor, a Twisted process that only copies bytes between
#: each client and its own origin connection (benchmarks/twisted_relay.py).
FLOOR_TARGETS = ("twisted-relay",)
SMALL_PATH = "/small"
CACHEABLE_PATH = "/cacheable"     # 1 KiB, Cache-Control: max-age=3600
STATUS_PATH = "/__origin_status"  # nginx stub_status: the request counter
# Squid will not run as root: it switches to this user (cache_effective_user).
SQUID_USER = "proxy"
# proxy.py, pinned, installed on first use into its own venv.
PROXYPY_VERSION = "2.4.10"
PROXYPY_VENV = os.path.join(CACHE_DIR, "proxypy-venv")
PROXYPY_WORKERS = 2               # --num-acceptors and --num-workers
# Test (f): the one user of the htpasswd file (bcrypt, cost 10).
AUTH_USER = "bench"
AUTH_PASSWORD = "bench-password"
READY_TIMEOUT = 15.0              # seconds
WORKERS_TIMEOUT = 10.0            # seconds for proxyframe's workers to start
STOP_GRACE = 5.0                  # seconds between SIGTERM and SIGKILL
CURL_TIMEOUT = 120.0              # seconds per download
RSS_INTERVAL = 0.1                # seconds between RSS samples in (b), (d)
IDLE_SETTLE = 1.0                 # seconds after the first GET in (e)
IDLE_CONCURRENCY = 50             # connections being opened at once in (e)
IDLE_TIMEOUT = 10.0               # seconds per connect/request in (e)
IDLE_DEADLINE = 120.0             # seconds for all of one (e) measurement
WARM_BATCH = 20                   # cache warm-up GETs per batch in (c)
WARM_MAX_BATCHES = 10
SETTLE_INTERVAL = 0.3             # seconds without origin requests after wrk
SETTLE_TIMEOUT = 10.0             # seconds
INSTALL_HINT = "apt-get install nginx wrk tinyproxy squid curl openssl"
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


def stop_one(proc: subprocess.Popen) -> None:
    """Stop proc (as stop) and forget it."""
    stop(proc)
    if proc in _procs:
        _procs.remove(proc)


def stop_all() -> None:
    """Stop every process we started (idempotent)."""
    while _procs:
        stop(_procs.pop())


def run_bounded(argv: list, timeout: float, cwd: str | None = None) -> str:
    """Run argv to completion within timeout seconds; return its stdout.

    Raises RuntimeError on a non-zero exit status or a timeout.
    """
    proc = spawn(argv, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError("%s: no result after %.0f s" % (argv[0], timeout))
    finally:
        stop_one(proc)
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


def raise_fd_limit() -> int:
    """Raise our (and so our children's) open-file limit to the hard limit.

    Test (e) holds 1000 client connections in this process, and every
    proxy needs a descriptor per client and per upstream connection.
    Returns the new soft limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 65536)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --------------------------------------------------------------------------
# process trees: CPU time and memory, from /proc (Linux)

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list:
    """Fields of /proc/PID/stat after the command name (0 is the state)."""
    with open("/proc/%d/stat" % pid, "rb") as f:
        data = f.read()
    return data[data.rindex(b")") + 2:].split()


def tree_pids(root: int) -> list:
    """Return root and all its live descendants (by parent pid)."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(name))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        if os.path.exists("/proc/%d" % pid):
            pids.append(pid)
            todo.extend(children.get(pid, ()))
    return pids


def tree_cpu(root: int) -> dict:
    """Return {pid: CPU seconds} for root's tree.

    Each is utime + stime of the process (all its threads) plus cutime +
    cstime, the time of its children that have exited and been reaped, so
    that a helper or worker that ended is still counted.
    """
    cpu = {}
    for pid in tree_pids(root):
        try:
            fields = _stat_fields(pid)
            cpu[pid] = sum(int(x) for x in fields[11:15]) / CLK_TCK
        except (OSError, ValueError, IndexError):
            pass
    return cpu


def cpu_delta(before: dict, after: dict) -> list:
    """CPU seconds each process used between two tree_cpu() readings."""
    return [after[pid] - before.get(pid, 0.0) for pid in after]


def rss_of(pid: int) -> int:
    """Resident set size of one process, bytes (0 if it is gone)."""
    try:
        with open("/proc/%d/statm" % pid) as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


def tree_rss(root: int) -> int:
    """Sum of the RSS of root's tree, bytes.

    Pages shared between processes (forked workers, libraries) count once
    per process, as ps and top show them.
    """
    return sum(rss_of(pid) for pid in tree_pids(root))


def proc_kib(pid: int, name: str, key: str) -> int:
    """The "KEY: N kB" line of /proc/PID/NAME, in bytes (0 if unknown)."""
    try:
        with open("/proc/%d/%s" % (pid, name)) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def pss_of(pid: int) -> int:
    """Proportional set size of one process, bytes (0 if unknown): its
    RSS with each page shared with N processes counted 1/N."""
    return proc_kib(pid, "smaps_rollup", "Pss")


def cmdline(pid: int) -> bytes:
    """A process's command line, NUL-separated (b"" if it is gone)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read()
    except OSError:
        return b""


def hwm_of(pid: int) -> int:
    """Peak RSS (VmHWM) of one process since start or reset, bytes."""
    return proc_kib(pid, "status", "VmHWM")


def reset_hwm(pid: int) -> bool:
    """Reset a process's peak RSS to its RSS now (writing 5 to clear_refs,
    Linux 4.0+; needs the right to ptrace it); True if that worked."""
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Measures how much a process tree's RSS grows during a download.

    A thread samples the tree's RSS every RSS_INTERVAL s; and where the
    kernel allows it, each process's peak RSS (VmHWM) is reset at the start
    and read at the end, which catches a peak between two samples (the sum
    of the processes' peaks is an upper bound of the tree's peak).  The
    tree's processes are listed once, at the start (a download does not
    start or end processes).
    """

    def __init__(self, root: int) -> None:
        self.pids = tree_pids(root)
        self.hwm = all([reset_hwm(pid) for pid in self.pids])
        self.baseline = self.sample()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> int:
        """The tree's RSS now, bytes."""
        return sum(rss_of(pid) for pid in self.pids)

    def _run(self) -> None:
        while not self._stop.wait(RSS_INTERVAL):
            self.peak = max(self.peak, self.sample())

    def stop(self) -> int:
        """Stop; return the peak growth over the baseline, bytes (the
        larger of the sampled one and the one by VmHWM)."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())
        if self.hwm:
            self.peak = max(self.peak, sum(hwm_of(pid) for pid in self.pids))
        return self.peak - self.baseline


def others_cpu() -> float:
    """CPU seconds used by everything on the machine that this run did not
    start, so far: the sum of utime + stime + cutime + cstime over every
    process outside this process's tree (kernel threads left out; a child
    that exits moves its time into its parent's cutime, so the sum only
    grows by CPU actually used), plus the steal time of /proc/stat (CPU the
    hypervisor gave to other machines)."""
    ours = set(tree_pids(os.getpid()))
    ticks = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in ours or name == "2":
            continue
        try:
            fields = _stat_fields(int(name))
            if fields[1] != b"2":  # children of kthreadd are kernel threads
                ticks += sum(int(x) for x in fields[11:15])
        except (OSError, ValueError, IndexError):
            continue
    with open("/proc/stat") as f:
        cpu = f.readline().split()
    steal = int(cpu[8]) if len(cpu) > 8 else 0
    return (ticks + steal) / CLK_TCK


class Foreign:
    """Measures the CPU that other users of the machine (processes this run
    did not start, other virtual machines) take during a window, in % of
    the whole machine (every core: 100 %)."""

    def __init__(self) -> None:
        self.others = others_cpu()
        self.start = time.monotonic()

    def percent(self) -> float:
        """Foreign CPU since the window opened, % of the machine."""
        foreign = others_cpu() - self.others
        wall = time.monotonic() - self.start
        return max(0.0, foreign) / (wall * (os.cpu_count() or 1)) * 100


def wait_quiet(args) -> float:
    """Wait (1 s probes, up to args.wait_quiet s) until other processes use
    less than args.max_foreign % of the machine; return the last probe."""
    deadline = time.monotonic() + args.wait_quiet
    while True:
        window = Foreign()
        time.sleep(1.0)
        busy = window.percent()
        if busy < args.max_foreign or time.monotonic() >= deadline:
            return busy


def quietly(args, label: str, measurement):
    """Run measurement() (after wait_quiet); while other processes took
    more than args.max_foreign % of the machine meanwhile, run it again, up
    to args.retries times.  Returns (the result of the quietest attempt,
    its foreign CPU %, the number of attempts discarded)."""
    attempts = []
    for _ in range(args.retries + 1):
        wait_quiet(args)
        window = Foreign()
        result = measurement()
        attempts.append((window.percent(), result))
        if attempts[-1][0] <= args.max_foreign:
            break
        log("%s: other processes took %.0f%% of the machine meanwhile"
            % (label, attempts[-1][0]))
    busy, result = min(attempts, key=lambda attempt: attempt[0])
    return result, busy, len(attempts) - 1


# --------------------------------------------------------------------------
# origin and proxies


class Env:
    """What every test needs: tools, options, directories, origin ports."""

    def __init__(self, args, tools: dict, tmp: str) -> None:
        self.args = args
        self.tools = tools
        self.tmp = tmp
        self.origin_port = None      # nginx, HTTP
        self.tls_port = None         # nginx, HTTPS (test (d))
        self.sha256 = None           # of /large
        self.lua = {}                # wrk scripts, see write_lua
        self.htpasswd = None         # test (f)
        self.proxypy = None          # path of proxy.py's "proxy" script
        self.workers = {}            # proxyframe target: worker processes
        self.warmups = {}            # target: its wrk warm-up's result
        self.warm_gets = {}          # cache target: (GETs, origin requests)
        self.download_dir = tmp

    def target_dir(self, name: str) -> str:
        """A new directory for one start of a target, readable by all."""
        path = tempfile.mkdtemp(prefix=name + ".", dir=self.tmp)
        os.chmod(path, 0o755)
        return path


def find_tools(targets: list) -> dict:
    """Map tool name to its path; exit with an install hint if missing."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    names = ["nginx", "wrk", "curl", "openssl"]
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


def make_cert(env: Env) -> tuple:
    """Make a self-signed certificate for 127.0.0.1; return (cert, key)."""
    cert = os.path.join(env.tmp, "origin-cert.pem")
    key = os.path.join(env.tmp, "origin-key.pem")
    run_bounded([env.tools["openssl"], "req", "-x509", "-newkey", "rsa:2048",
                 "-nodes", "-days", "2", "-subj", "/CN=%s" % HOST,
                 "-addext", "subjectAltName=IP:%s" % HOST,
                 "-keyout", key, "-out", cert], 60)
    os.chmod(key, 0o644)  # nginx's workers may run as another user
    return cert, key


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
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
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    server {{
        listen {host}:{port};
        # Test (d): the same files over TLS, reached through CONNECT.
        listen {host}:{tls_port} ssl;
        root {tmp}/www;
        location = /small {{ }}
        location = /large {{ }}
        location = /cacheable {{
            add_header Cache-Control "max-age=3600" always;
        }}
        # Counts the requests that reach the origin (tests (a), (c)).
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
ConnectPort {tls_port}
"""

# Squid: loopback only (also its DNS client socket, which sends nothing as
# every request names an IP address), no disk cache, no logs but cache_log,
# CONNECT only to the origin's TLS port.
SQUID_CONF = """\
http_port {host}:{port}
workers 1
{user}pid_filename {dir}/squid.pid
cache_log {dir}/cache.log
access_log none
cache_store_log none
logfile_rotate 0
coredump_dir {dir}
max_filedescriptors 16384
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
acl SSL_ports port {tls_port}
acl CONNECT method CONNECT
http_access deny CONNECT !SSL_ports
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

# Every proxyframe target keeps the default workers (0: one per core).
PROXYFRAME_LISTEN = """\
listen = ["tcp:{port}:interface={host}"]
"""

# proxyframe: the default filter chain (no [[filter]]: DEFAULT_FILTERS in
# proxyframe/config.py, acl for loopback clients then accesslog to stdout),
# with CONNECT allowed to the origin's TLS port (test (d)).
PROXYFRAME_CONF = PROXYFRAME_LISTEN + """\
connect_ports = [{tls_port}]
"""

PROXYFRAME_ACL = """\
[[filter]]
use = "acl"
default = "deny"

[[filter.rules]]
action = "allow"
clients = ["127.0.0.0/8", "::1/128", "::ffff:127.0.0.0/104"]
"""

# proxyframe-cache: the default chain, then the cache filter (defaults).
PROXYFRAME_CACHE_CONF = PROXYFRAME_LISTEN + "\n" + PROXYFRAME_ACL + """
[[filter]]
use = "accesslog"

[[filter]]
use = "cache"
"""

# proxyframe-bare: no filter at all.
PROXYFRAME_BARE_CONF = PROXYFRAME_LISTEN + """\
filter = []
"""

# proxyframe-filters: acl, auth (Basic, htpasswd with one bcrypt user,
# successful checks cached: cache_ttl's default), accesslog to stdout.
PROXYFRAME_FILTERS_CONF = PROXYFRAME_LISTEN + "\n" + PROXYFRAME_ACL + """
[[filter]]
use = "auth"
realm = "proxyframe-bench"
htpasswd_file = "{htpasswd}"

[[filter]]
use = "accesslog"
"""

PROXYFRAME_CONFS = {
    "proxyframe": PROXYFRAME_CONF,
    "proxyframe-cache": PROXYFRAME_CACHE_CONF,
    "proxyframe-bare": PROXYFRAME_BARE_CONF,
    "proxyframe-filters": PROXYFRAME_FILTERS_CONF,
}


def start_nginx(env: Env) -> None:
    """Start the nginx origin; set env.origin_port and env.tls_port."""
    cert, key = make_cert(env)
    env.origin_port, env.tls_port = free_port(), free_port()
    tmp = env.tmp
    conf = os.path.join(tmp, "nginx.conf")
    os.mkdir(os.path.join(tmp, "nginx-tmp"))
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(tmp=tmp, host=HOST, port=env.origin_port,
                                  tls_port=env.tls_port, cert=cert, key=key))
    log = os.path.join(tmp, "nginx.out")
    proc = spawn([env.tools["nginx"], "-p", tmp + "/", "-e",
                  tmp + "/nginx-error.log", "-c", conf], log)
    wait_ready(proc, env.origin_port, log)
    wait_ready(proc, env.tls_port, log)


def start_tinyproxy(env: Env) -> Target:
    """Start tinyproxy in the foreground on a free port."""
    port = free_port()
    conf_dir = env.target_dir("tinyproxy")
    conf = os.path.join(conf_dir, "tinyproxy.conf")
    with open(conf, "w") as f:
        f.write(TINYPROXY_CONF.format(host=HOST, port=port,
                                      tls_port=env.tls_port))
    log = os.path.join(conf_dir, "tinyproxy.log")
    proc = spawn([env.tools["tinyproxy"], "-d", "-c", conf], log)
    wait_ready(proc, port, log)
    return Target("tinyproxy", port, proc, log)


def start_squid(env: Env, name: str) -> Target:
    """Start Squid in the foreground (-N) on a free port.

    "squid-cache" has its memory cache on (no disk cache); "squid" caches
    nothing.  Started as root, Squid switches to SQUID_USER, which then
    owns the target's directory (config, pid file, cache_log).
    """
    squid = env.tools["squid"]
    port = free_port()
    conf_dir = env.target_dir(name)
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
            tls_port=env.tls_port,
            cache=SQUID_CACHE_ON if name == "squid-cache"
            else SQUID_CACHE_OFF))
    run_bounded([squid, "-k", "parse", "-f", conf], 30)
    log_path = os.path.join(conf_dir, "cache.log")
    proc = spawn([squid, "-N", "-f", conf],
                 os.path.join(conf_dir, "stdout.log"))
    wait_ready(proc, port, log_path)
    return Target(name, port, proc, log_path)


def proxypy_path() -> str:
    """Return proxy.py's "proxy" script, installing it on first use.

    proxy.py PROXYPY_VERSION goes into its own venv, PROXYPY_VENV, made with
    the interpreter running this script; pip needs access to PyPI then.
    """
    proxy = os.path.join(PROXYPY_VENV, "bin", "proxy")
    if os.path.exists(proxy):
        try:
            if run_bounded([proxy, "--version"], 60).strip() \
                    == PROXYPY_VERSION:
                return proxy
        except RuntimeError:
            pass
    log("installing proxy.py %s into %s" % (PROXYPY_VERSION, PROXYPY_VENV))
    os.makedirs(CACHE_DIR, exist_ok=True)
    if not os.path.exists(os.path.join(PROXYPY_VENV, "bin", "pip")):
        run_bounded([sys.executable, "-m", "venv", PROXYPY_VENV], 300)
    run_bounded([os.path.join(PROXYPY_VENV, "bin", "pip"), "install", "-q",
                 "proxy.py==%s" % PROXYPY_VERSION], 600)
    return proxy


def start_proxypy(env: Env) -> Target:
    """Start proxy.py with PROXYPY_WORKERS acceptor processes, threadless.

    With its default --local-executor 1, each acceptor process handles its
    connections itself, so --num-acceptors sets the number of processes;
    --num-workers (the same number) only matters without it.
    --log-level WARNING drops its per-request log line; --open-file-limit
    and --backlog let it take the 1000 clients of test (e).  Its default
    plugin set is the HTTP proxy only, and it allows CONNECT to any port.
    """
    port = free_port()
    conf_dir = env.target_dir("proxypy")
    log_path = os.path.join(conf_dir, "proxypy.log")
    workers = str(PROXYPY_WORKERS)
    proc = spawn([env.proxypy, "--hostname", HOST, "--port", str(port),
                  "--num-acceptors", workers, "--num-workers", workers,
                  "--threadless", "--log-level", "WARNING",
                  "--open-file-limit", "16384", "--backlog", "1024",
                  "--data-dir", os.path.join(conf_dir, "data")],
                 log_path, cwd=conf_dir)
    wait_ready(proc, port, log_path)
    return Target("proxypy", port, proc, log_path)


def start_twisted_relay(env: Env) -> Target:
    """Start benchmarks/twisted_relay.py (one process, proxyframe's
    interpreter and reactor) in front of the HTTP origin."""
    port = free_port()
    log_path = os.path.join(env.target_dir("twisted-relay"), "relay.log")
    proc = spawn([env.args.python,
                  os.path.join(REPO_ROOT, "benchmarks", "twisted_relay.py"),
                  str(port), str(env.origin_port)], log_path, cwd=REPO_ROOT)
    wait_ready(proc, port, log_path)
    return Target("twisted-relay", port, proc, log_path)


def count_workers(proc: subprocess.Popen) -> int:
    """proxyframe's worker processes under proc (python -m proxyframe.worker).

    Waits up to WORKERS_TIMEOUT s for os.cpu_count() of them (workers = 0);
    returns 1 if there are none (a single process serves).
    """
    want = os.cpu_count() or 1
    deadline = time.monotonic() + WORKERS_TIMEOUT
    while True:
        found = sum(1 for pid in tree_pids(proc.pid)
                    if b"proxyframe.worker" in cmdline(pid))
        if found >= want or time.monotonic() > deadline:
            return found or 1
        time.sleep(0.1)


def start_proxyframe(env: Env, name: str) -> Target:
    """Start proxyframe (twistd plugin, --config FILE) on a free port.

    Every proxyframe target keeps the default workers (one process per
    core) and writes its access log, if any, to standard output: the
    target's log file.  The number of worker processes is in env.workers.
    """
    port = free_port()
    conf_dir = env.target_dir(name)
    log_path = os.path.join(conf_dir, "proxyframe.log")
    conf = os.path.join(conf_dir, "proxyframe.toml")
    with open(conf, "w") as f:
        f.write(PROXYFRAME_CONFS[name].format(
            host=HOST, port=port, tls_port=env.tls_port,
            htpasswd=env.htpasswd))
    argv = [env.args.python, "-c", TWISTD, "-n", "--pidfile=", "proxyframe",
            "--config", conf]
    proc = spawn(argv, log_path, cwd=REPO_ROOT)
    wait_ready(proc, port, log_path)
    env.workers[name] = count_workers(proc)
    return Target(name, port, proc, log_path)


def make_htpasswd(env: Env) -> str:
    """Write an htpasswd file with AUTH_USER (bcrypt, cost 10); return it.

    The hash is made with the bcrypt module of proxyframe's interpreter.
    """
    code = ("import bcrypt, sys; print(bcrypt.hashpw(sys.argv[1].encode(), "
            "bcrypt.gensalt(rounds=10)).decode())")
    try:
        hashed = run_bounded([env.args.python, "-c", code, AUTH_PASSWORD],
                             60).strip()
    except RuntimeError as exc:
        raise RuntimeError("bcrypt (in %s) for the htpasswd file: %s"
                           % (env.args.python, exc))
    path = os.path.join(env.tmp, "users.htpasswd")
    with open(path, "w") as f:
        f.write("%s:%s\n" % (AUTH_USER, hashed))
    return path


def start_target(env: Env, name: str) -> Target:
    """Start one target by name."""
    if name == "direct":
        return Target("direct", None, None, None)
    if name == "tinyproxy":
        return start_tinyproxy(env)
    if name in ("squid", "squid-cache"):
        return start_squid(env, name)
    if name == "proxypy":
        return start_proxypy(env)
    if name == "twisted-relay":
        return start_twisted_relay(env)
    return start_proxyframe(env, name)


def auth_user(target: Target) -> str | None:
    """The user:password target needs, or None."""
    if target.name == "proxyframe-filters":
        return "%s:%s" % (AUTH_USER, AUTH_PASSWORD)
    return None


def curl_argv(curl: str, target: Target, url: str) -> list:
    """Return a curl command line fetching url through target."""
    argv = [curl, "-sS", "--http1.1", "--max-time", str(int(CURL_TIMEOUT))]
    if target.port is None:
        argv += ["--noproxy", "*"]
    else:
        argv += ["-x", "http://%s:%d" % (HOST, target.port)]
        if auth_user(target):
            # Sent at once (curl's default scheme for a proxy is Basic).
            argv += ["--proxy-user", auth_user(target)]
    return argv + [url]


def check_relay(env: Env, target: Target, path: str = SMALL_PATH) -> None:
    """Fetch path (1 KiB) once through target; raise RuntimeError if wrong.

    For proxyframe-filters, also check that a request without credentials
    gets 407 (so test (f) does measure authentication).
    """
    url = "http://%s:%d%s" % (HOST, env.origin_port, path)
    curl = env.tools["curl"]
    body = run_bounded(curl_argv(curl, target, url), CURL_TIMEOUT + 10)
    if len(body) != SMALL_SIZE:
        raise RuntimeError("%s: GET %s returned %d bytes, not %d:\n%s"
                           % (target.name, path, len(body), SMALL_SIZE,
                              body[:300]))
    if auth_user(target):
        anonymous = target._replace(name="anonymous")
        argv = curl_argv(curl, anonymous, url)
        status = run_bounded(argv[:-1] + ["-o", os.devnull, "-w",
                                          "%{http_code}", url],
                             CURL_TIMEOUT + 10)
        if status != "407":
            raise RuntimeError("%s: GET %s without credentials got %s, "
                               "not 407" % (target.name, path, status))


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


def get_through(target: Target, origin_port: int, path: str) -> int:
    """GET path through target on a new connection; return the status."""
    authority = "%s:%d" % (HOST, origin_port)
    conn = http.client.HTTPConnection(HOST, target.port, timeout=10)
    try:
        conn.request("GET", "http://%s%s" % (authority, path),
                     headers={"Host": authority})
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException) as exc:
        raise RuntimeError("%s: GET %s: %s" % (target.name, path, exc))
    finally:
        conn.close()


def warm_cache(env: Env, target: Target) -> tuple:
    """Store /cacheable in every worker of target; return (GETs, origin
    requests they caused).

    The memory cache is per worker, and the kernel hands each new
    connection to one worker: GETs on new connections, WARM_BATCH at a
    time, until the origin has seen one request (one miss) per worker, or
    WARM_MAX_BATCHES batches.
    """
    workers = env.workers.get(target.name, 1)
    gets = origin = 0
    for _ in range(WARM_MAX_BATCHES):
        before = origin_count(env.origin_port)
        for _ in range(WARM_BATCH):
            status = get_through(target, env.origin_port, CACHEABLE_PATH)
            if status != 200:
                raise RuntimeError("%s: warm-up GET %s: status %d"
                                   % (target.name, CACHEABLE_PATH, status))
        gets += WARM_BATCH
        origin += origin_count(env.origin_port) - before - 1
        if origin >= workers:
            break
    return gets, origin


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

LUA_AUTH = """\
wrk.headers["Proxy-Authorization"] = "Basic {token}"
"""


def write_lua(tmp: str, origin_port: int) -> dict:
    """Write the wrk scripts; return {None: direct, path: proxy script,
    (path, "auth"): proxy script with credentials}.

    Direct requests take the path from wrk's URL; through a proxy, the
    script for each path sends it in absolute-form.  Both targets of test
    (f) get the script with Proxy-Authorization (proxyframe-bare ignores it
    and never forwards it).
    """
    token = base64.b64encode(("%s:%s" % (AUTH_USER, AUTH_PASSWORD))
                             .encode()).decode()
    scripts = {None: ("direct", LUA_DONE)}
    for path in (SMALL_PATH, CACHEABLE_PATH):
        scripts[path] = ("proxy-" + path.strip("/"), LUA_ABSOLUTE.format(
            host=HOST, port=origin_port, path=path) + LUA_DONE)
    scripts[(SMALL_PATH, "auth")] = ("proxy-small-auth", LUA_ABSOLUTE.format(
        host=HOST, port=origin_port, path=SMALL_PATH)
        + LUA_AUTH.format(token=token) + LUA_DONE)
    paths = {}
    for key, (name, text) in scripts.items():
        paths[key] = os.path.join(tmp, name + ".lua")
        with open(paths[key], "w") as f:
            f.write(text)
    return paths


def settle(origin_port: int) -> tuple:
    """Wait until no request reaches the origin for SETTLE_INTERVAL s.

    A proxy may still forward requests it received just before wrk
    stopped; they count in the run that sent them, not in the next.
    Returns (the origin's counter, how many times it was read).
    """
    last, reads = origin_count(origin_port), 1
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        time.sleep(SETTLE_INTERVAL)
        count, reads = origin_count(origin_port), reads + 1
        if count == last + 1 or time.monotonic() > deadline:
            return count, reads
        last = count


def test_wrk(env: Env, target: Target, path: str,
             duration: int | None = None) -> dict:
    """Run wrk for path through target (or direct) for duration s
    (default: args.duration).

    Returns wrk's counters (requests, bytes, socket errors connect/read/
    write/timeout, status = responses with status >= 400) plus "rps",
    requests per second; "origin", the requests that reached the origin
    meanwhile (by its counter, read before and after, once the origin has
    seen no request for SETTLE_INTERVAL s); and for a proxy "cpu", the CPU
    seconds of its process tree meanwhile, and "cpu_procs", the same per
    process.
    """
    args = env.args
    duration = duration or args.duration
    if target.port is None:
        script, port = env.lua[None], env.origin_port
    elif target.name in FILTER_TARGETS:
        script, port = env.lua[(path, "auth")], target.port
    else:
        script, port = env.lua[path], target.port
    url = "http://%s:%d%s" % (HOST, port, path)
    before = origin_count(env.origin_port)
    cpu_before = tree_cpu(target.proc.pid) if target.proc else None
    out = run_bounded([env.tools["wrk"], "-t1", "-c%d" % args.connections,
                       "-d%ds" % duration, "-s", script, url],
                      timeout=duration + 30)
    after, reads = settle(env.origin_port)
    cpu_after = tree_cpu(target.proc.pid) if target.proc else None
    origin = after - before - reads
    lines = [line for line in out.splitlines()
             if line.startswith('{"requests"')]
    if not lines:
        raise RuntimeError("no summary from wrk:\n" + out)
    result = json.loads(lines[-1])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["origin"] = origin
    if cpu_before is not None:
        procs = cpu_delta(cpu_before, cpu_after)
        result["cpu"] = sum(procs)
        result["cpu_procs"] = [round(x, 2) for x in procs]
    return result


def test_download(env: Env, target: Target, tls: bool) -> tuple:
    """Download /large once; return (MB/s, RSS growth in bytes or None).

    MB/s is 10**6 bytes per s of curl's time_total.  With tls, the URL is
    https:// on the origin's TLS port, so through a proxy curl opens a
    CONNECT tunnel (-k: the certificate is self-signed).  The RSS growth is
    the peak of the proxy tree's RSS, sampled every RSS_INTERVAL s during
    the download, minus its RSS just before.  Raises RuntimeError on a
    failed, short or corrupted download.
    """
    if tls:
        url = "https://%s:%d/large" % (HOST, env.tls_port)
    else:
        url = "http://%s:%d/large" % (HOST, env.origin_port)
    out_path = os.path.join(env.download_dir,
                            "proxyframe-bench-%d.bin" % os.getpid())
    argv = curl_argv(env.tools["curl"], target, url)[:-1] + [
        "-o", out_path, "-w", "%{http_code} %{size_download} %{time_total}"]
    if tls:
        argv.append("-k")
    argv.append(url)
    sampler = RssSampler(target.proc.pid) if target.proc else None
    growth = None
    try:
        try:
            status, size, seconds = run_bounded(argv,
                                                CURL_TIMEOUT + 10).split()
        finally:
            if sampler:
                growth = sampler.stop()
        if status != "200" or int(size) != LARGE_SIZE:
            raise RuntimeError("HTTP %s, %s bytes" % (status, size))
        if sha256_file(out_path) != env.sha256:
            raise RuntimeError("sha256 mismatch")
        return int(size) / float(seconds) / 1e6, growth
    finally:
        if os.path.exists(out_path):
            os.remove(out_path)


async def _idle_client(target: Target, request: bytes, counts: dict,
                       gate: asyncio.Semaphore):
    """Open one connection, GET once, return (reader, writer) or None."""
    async with gate:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(HOST, target.port), IDLE_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            counts["connect_errors"] += 1
            counts.setdefault("first_error", repr(exc))
            return None
        try:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"),
                                          IDLE_TIMEOUT)
            status = int(head.split(None, 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await asyncio.wait_for(reader.readexactly(length), IDLE_TIMEOUT)
            counts["ok" if status == 200 else "not_ok"] += 1
        except (OSError, ValueError, IndexError, asyncio.TimeoutError,
                asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            counts["request_errors"] += 1
            counts.setdefault("first_error", repr(exc))
        return reader, writer


async def _hold_idle_clients(env: Env, target: Target) -> dict:
    """Open args.idle_conns clients, each GET /small once (keep-alive),
    hold them args.hold s, read the proxy tree's RSS, close them."""
    authority = "%s:%d" % (HOST, env.origin_port)
    request = ("GET http://%s%s HTTP/1.1\r\nHost: %s\r\n\r\n"
               % (authority, SMALL_PATH, authority)).encode()
    counts = {"ok": 0, "not_ok": 0, "connect_errors": 0, "request_errors": 0}
    gate = asyncio.Semaphore(IDLE_CONCURRENCY)
    started = time.monotonic()
    clients = await asyncio.gather(*(
        _idle_client(target, request, counts, gate)
        for _ in range(env.args.idle_conns)))
    clients = [c for c in clients if c is not None]
    counts["open_seconds"] = round(time.monotonic() - started, 2)
    await asyncio.sleep(env.args.hold)
    counts["rss_procs"] = [rss_of(pid) for pid in tree_pids(target.proc.pid)]
    counts["rss"] = sum(counts["rss_procs"])
    counts["pss"] = sum(pss_of(pid) for pid in tree_pids(target.proc.pid))
    counts["still_open"] = sum(1 for reader, writer in clients
                               if not reader.at_eof()
                               and not writer.is_closing())
    for _, writer in clients:
        writer.close()
    await asyncio.sleep(0.2)
    return counts


def test_idle(env: Env, target: Target) -> dict:
    """Test (e) on a freshly started target that has relayed one GET.

    Returns "idle_rss" (bytes, before), "rss" (bytes, with the clients
    open and idle), "ok", "not_ok", "connect_errors", "request_errors",
    "still_open" (connections the proxy had not closed when "rss" was
    read), "processes" (in the tree).
    """
    time.sleep(IDLE_SETTLE)
    idle_rss = tree_rss(target.proc.pid)
    try:
        res = asyncio.run(asyncio.wait_for(_hold_idle_clients(env, target),
                                           IDLE_DEADLINE))
    except asyncio.TimeoutError:
        raise RuntimeError("1000 idle clients: no result after %.0f s"
                           % IDLE_DEADLINE)
    res["idle_rss"] = idle_rss
    res["processes"] = len(tree_pids(target.proc.pid))
    return res


# --------------------------------------------------------------------------
# report


def new_result() -> dict:
    """Return an empty per-target result record.

    "origin" holds the origin requests during each wrk run; "cpu10k" the
    CPU seconds per 10k requests of each wrk run; "growth" and
    "tunnel_growth" the RSS growth (bytes) of each download; "cpu_share"
    the busiest process's share of a multi-process proxy's CPU in each wrk
    run.
    """
    return {"rps": [], "requests": 0, "connect": 0, "read": 0, "write": 0,
            "timeout": 0, "status": 0, "origin": [], "cpu10k": [],
            "cpu_share": [], "noise": [], "dl_noise": [], "discarded": 0,
            "mbps": [], "downloads": 0, "growth": [],
            "tunnel_mbps": [], "tunnels": 0, "tunnel_growth": [],
            "idle_rss": [], "conns_rss": [], "conns_pss": [], "conns_ok": [],
            "conns_open": [], "notes": []}


def record_wrk(res: dict, small: dict) -> None:
    """Add one wrk result to a target's record."""
    res["rps"].append(small["rps"])
    res["origin"].append(small["origin"])
    for key in ("requests", "connect", "read", "write", "timeout", "status"):
        res[key] += small[key]
    if "cpu" in small and small["requests"]:
        res["cpu10k"].append(small["cpu"] / small["requests"] * 1e4)
    if len(small.get("cpu_procs", ())) > 1 and small["cpu"] > 0:
        res["cpu_share"].append(max(small["cpu_procs"]) / small["cpu"])


def median(values: list) -> float | None:
    """Median of values, or None when there are none."""
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 1) -> str:
    """Format a number, or '-' for a missing one."""
    return "-" if value is None else "%.*f" % (digits, value)


def mib(values: list, pick=median) -> str:
    """Format pick(values) (bytes) in MiB, or '-'."""
    return fmt(pick(values) / MIB) if values else "-"


SMALL_ROW = "%-11s %10s %9s %10s %18s %11s %10s %8s"
BIG_ROW = "%-11s %10s %9s %9s %11s %9s %9s %8s"
IDLE_ROW = "%-11s %9s %17s %9s %6s %10s %10s"
CACHE_ROW = "%-18s %10s %9s %18s %18s %11s %10s %8s"


def noise_text(values: list) -> str:
    """The largest foreign CPU % of the kept measurements, or '-'."""
    return "%.0f" % max(values) if values else "-"


def errors_text(res: dict) -> str:
    """wrk's socket errors connect/read/write/timeout, totals."""
    return "%d/%d/%d/%d" % (res["connect"], res["read"], res["write"],
                            res["timeout"])


def value(results: dict, name: str, key: str, pick=median) -> float | None:
    """pick(results[name][key]), or None when missing."""
    if name not in results or not results[name][key]:
        return None
    return pick(results[name][key])


def ratio_of(results: dict, key: str, ours: str, base: str) -> float | None:
    """median(results[ours][key]) / median(results[base][key]), or None."""
    mine = value(results, ours, key)
    theirs = value(results, base, key)
    return mine / theirs if mine and theirs else None


def ratio(results: dict, key: str, ours: str, base: str) -> str:
    """Format ratio_of(...) as "1.23", or '-'."""
    return fmt(ratio_of(results, key, ours, base), 2)


def print_header(info: list) -> None:
    """Print the conditions: machine, versions, commit, settings."""
    print("conditions")
    for key, text in info:
        print("  %-22s %s" % (key, text))


def print_small(relay: dict, results: dict) -> None:
    """Table of test (a), then its ratios."""
    print()
    print("(a) small: wrk for %s (1 KiB, keep-alive); CPU: the proxy's "
          "process tree" % SMALL_PATH)
    print(SMALL_ROW % ("target", "small r/s", "requests", "origin/req",
                       "sock err c/r/w/t", "non-2xx/3xx", "CPU s/10k",
                       "noise %"))
    for name, res in relay.items():
        print(SMALL_ROW % (name, fmt(median(res["rps"])), res["requests"],
                           fmt(sum(res["origin"]) / res["requests"], 3)
                           if res["requests"] else "-",
                           errors_text(res), res["status"],
                           fmt(median(res["cpu10k"]), 2),
                           noise_text(res["noise"])))
    print("r/s, CPU: medians over rounds; requests, errors: totals over all "
          "rounds;")
    print("origin/req: origin requests / wrk requests, totals (~1: every "
          "request relayed);")
    print("CPU s/10k: user+system CPU seconds of the proxy and all its "
          "processes per 10k requests")
    for name, res in relay.items():
        print("%s: r/s per round %s" % (
            name, "/".join("%.0f" % x for x in res["rps"]) or "-"))
    print_shares(relay)
    if "proxyframe" not in relay:
        return
    for base in ("proxypy", "squid", "tinyproxy", "direct"):
        if base in relay:
            print("proxyframe/%-9s small r/s %sx%s" % (
                base, ratio(results, "rps", "proxyframe", base),
                "" if base == "direct" else ", CPU/10k %sx"
                % ratio(results, "cpu10k", "proxyframe", base)))


def print_shares(group: dict) -> None:
    """For multi-process proxies: the busiest process's share of the CPU in
    each wrk run (0.5 with two even workers, near 1.0 when one worker got
    most of wrk's connections)."""
    for name, res in group.items():
        if res["cpu_share"]:
            print("%s: busiest process's share of the CPU per round %s" % (
                name, "/".join("%.2f" % x for x in res["cpu_share"])))


def print_big(relay: dict, results: dict, args) -> None:
    """Table of tests (b) and (d), then their ratios."""
    print()
    print("(b) large: curl 64 MiB over HTTP; (d) tunnel: the same over TLS "
          "through CONNECT; %d of each per round" % args.large_n)
    print(BIG_ROW % ("target", "large MB/s", "sha256 ok", "RSS+ MiB",
                     "tunnel MB/s", "sha256 ok", "RSS+ MiB", "noise %"))
    for name, res in relay.items():
        print(BIG_ROW % (name, fmt(median(res["mbps"])),
                         "%d/%d" % (len(res["mbps"]), res["downloads"]),
                         mib(res["growth"], max),
                         fmt(median(res["tunnel_mbps"])),
                         "%d/%d" % (len(res["tunnel_mbps"]), res["tunnels"]),
                         mib(res["tunnel_growth"], max),
                         noise_text(res["dl_noise"])))
    print("MB/s: medians over all good downloads (1 MB = 10^6 bytes); "
          "RSS+: the largest growth of")
    print("the proxy tree's RSS during one download over its RSS just before "
          "(sampled every %.1f s)" % RSS_INTERVAL)
    if "proxyframe" not in relay:
        return
    for base in ("proxypy", "squid", "tinyproxy", "direct"):
        if base in relay:
            print("proxyframe/%-9s large %sx, tunnel %sx" % (
                base, ratio(results, "mbps", "proxyframe", base),
                ratio(results, "tunnel_mbps", "proxyframe", base)))


def print_idle(idle: dict, results: dict, args) -> None:
    """Table of test (e), then its ratios."""
    print()
    print("(e) memory: %d keep-alive clients, one GET %s each, held idle "
          "%.0f s; proxy restarted first" % (args.idle_conns, SMALL_PATH,
                                              args.hold))
    print(IDLE_ROW % ("target", "idle MiB", "with clients MiB", "PSS MiB",
                      "ok", "still open", "processes"))
    for name, res in idle.items():
        print(IDLE_ROW % (name, mib(res["idle_rss"]), mib(res["conns_rss"]),
                          mib(res["conns_pss"]),
                          min(res["conns_ok"]) if res["conns_ok"] else "-",
                          min(res["conns_open"]) if res["conns_open"]
                          else "-",
                          res.get("processes", "-")))
    print("RSS (and PSS: shared pages counted 1/N) summed over the proxy's "
          "processes, medians over rounds;")
    print("idle: after one GET; ok, still open: lowest over rounds (still "
          "open: connections the proxy")
    print("had not closed when the RSS was read)")
    if "proxyframe" in idle:
        for base in ("squid", "proxypy", "tinyproxy"):
            if base in idle:
                print("proxyframe/%-9s RSS with clients %sx" % (
                    base, ratio(results, "conns_rss", "proxyframe", base)))


def print_wrk_table(title: str, group: dict, note: str, env: Env) -> None:
    """Table of a wrk test on cache or filter targets, then each round's
    r/s and the warm-up."""
    print()
    print(title)
    print(CACHE_ROW % ("target", "r/s", "requests", "origin req/round",
                       "sock err c/r/w/t", "non-2xx/3xx", "CPU s/10k",
                       "noise %"))
    for name, res in group.items():
        print(CACHE_ROW % (name, fmt(median(res["rps"])), res["requests"],
                           "/".join(map(str, res["origin"])) or "-",
                           errors_text(res), res["status"],
                           fmt(median(res["cpu10k"]), 2),
                           noise_text(res["noise"])))
    print(note)
    print_shares(group)
    for name, res in group.items():
        warm = env.warmups.get(name)
        gets = env.warm_gets.get(name)
        print("%s: r/s per round %s; warm-up%s%s" % (
            name, "/".join("%.0f" % x for x in res["rps"]) or "-",
            " %d GETs on new connections (%d origin requests)" % gets
            if gets else "",
            (", wrk %d s (%.0f r/s, %d origin requests)"
             % (env.args.warmup, warm["rps"], warm["origin"]))
            if warm else ""))


# Issue 5's targets: (label, measure, comparison, bound).  measure(results)
# returns the measured figure or None.
GOALS = (
    ("small r/s, proxyframe/proxypy",
     lambda r: ratio_of(r, "rps", "proxyframe", "proxypy"), ">=", 1.5),
    ("small r/s, proxyframe/squid",
     lambda r: ratio_of(r, "rps", "proxyframe", "squid"), ">=", 1.0),
    ("CPU per 10k requests, proxyframe/squid",
     lambda r: ratio_of(r, "cpu10k", "proxyframe", "squid"), "<=", 1.0),
    ("64 MiB download MB/s, proxyframe/direct",
     lambda r: ratio_of(r, "mbps", "proxyframe", "direct"), ">=", 0.8),
    ("CONNECT tunnel MB/s, proxyframe/direct",
     lambda r: ratio_of(r, "tunnel_mbps", "proxyframe", "direct"), ">=", 0.9),
    ("RSS with the idle clients, proxyframe/squid",
     lambda r: ratio_of(r, "conns_rss", "proxyframe", "squid"), "<=", 1.0),
    ("RSS growth in 64 MiB download, MiB",
     lambda r: (value(r, "proxyframe", "growth", max) / MIB
                if value(r, "proxyframe", "growth", max) is not None
                else None), "<=", 16.0),
    ("cache hit r/s, proxyframe-cache/squid-cache",
     lambda r: ratio_of(r, "rps", "proxyframe-cache", "squid-cache"),
     ">=", 1.0),
    ("acl+auth+accesslog r/s, filters/bare",
     lambda r: ratio_of(r, "rps", "proxyframe-filters", "proxyframe-bare"),
     ">=", 0.8),
)


def print_floor(floor: dict, results: dict, env: Env) -> None:
    """Table of test (g), then the floor's share of each proxy's CPU."""
    print_wrk_table(
        "(g) floor: wrk for %s through benchmarks/twisted_relay.py (one "
        "process copying bytes, no HTTP work)" % SMALL_PATH, floor,
        "the CPU a Twisted relay pays per exchange before doing anything; "
        "compare CPU s/10k with (a)", env)
    for base in ("squid", "proxyframe", "proxypy"):
        if base in results:
            print("twisted-relay/%-10s CPU/10k %sx" % (
                base, ratio(results, "cpu10k", "twisted-relay", base)))


def print_goals(results: dict) -> list:
    """Print issue 5's targets, each measured, met or not; return the rows
    as (label, measured, wanted, verdict)."""
    print()
    print("issue 5 targets (ratios of the medians of this run, to 3 "
          "decimals)")
    row = "%-44s %9s %8s  %s"
    print(row % ("target", "measured", "wanted", "result"))
    rows = []
    for label, measure, cmp, bound in GOALS:
        got = measure(results)
        if got is None:
            verdict, shown = "not measured", "-"
        else:
            met = got >= bound if cmp == ">=" else got <= bound
            verdict = "met" if met else "NOT met"
            shown = fmt(got, 1 if label.endswith("MiB") else 3)
        wanted = "%s %g" % (cmp, bound)
        print(row % (label, shown, wanted, verdict))
        rows.append((label, shown, wanted, verdict))
    return rows


def print_table(results: dict, args, env: Env) -> None:
    """Print every table, the targets, then notes."""
    relay = {n: r for n, r in results.items() if n in RELAY_TARGETS}
    idle = {n: r for n, r in results.items() if n in IDLE_TARGETS}
    cache = {n: r for n, r in results.items() if n in CACHE_TARGETS}
    filters = {n: r for n, r in results.items() if n in FILTER_TARGETS}
    floor = {n: r for n, r in results.items() if n in FLOOR_TARGETS}
    print()
    print("%d round(s); wrk -t1 -c%d -d%ds" % (args.rounds, args.connections,
                                               args.duration))
    print("noise %: the most CPU that processes not started by run.py (and "
          "other VMs) took during a kept")
    print("measurement, in %% of the machine (%d cores = 100 %%); a "
          "measurement over %g %% was made again" % (
              os.cpu_count() or 1, args.max_foreign))
    print("(up to %d times), keeping the quietest; discarded: %s" % (
        args.retries, ", ".join(
        "%s %d" % (name, res["discarded"]) for name, res in results.items()
        if res["discarded"]) or "none"))
    if relay:
        print_small(relay, results)
        print_big(relay, results, args)
    if idle:
        print_idle(idle, results, args)
    if cache:
        print_wrk_table(
            "(c) cache hits: wrk for %s (1 KiB, max-age=3600), stored in "
            "every worker before round 1" % CACHEABLE_PATH, cache,
            "origin req/round: requests that reached the origin during each "
            "round's wrk run (0: all hits)", env)
        if len(cache) == 2:
            print("proxyframe-cache/squid-cache hit r/s %sx, CPU/10k %sx" % (
                ratio(results, "rps", "proxyframe-cache", "squid-cache"),
                ratio(results, "cpu10k", "proxyframe-cache", "squid-cache")))
    if filters:
        print_wrk_table(
            "(f) filters: wrk for %s with Proxy-Authorization: Basic; bare: "
            "no filter; filters: acl, auth, accesslog" % SMALL_PATH, filters,
            "origin req/round: requests that reached the origin during each "
            "round's wrk run", env)
        if len(filters) == 2:
            print("proxyframe-filters/proxyframe-bare r/s %sx, CPU/10k %sx"
                  % (ratio(results, "rps", "proxyframe-filters",
                           "proxyframe-bare"),
                     ratio(results, "cpu10k", "proxyframe-filters",
                           "proxyframe-bare")))
    if floor:
        print_floor(floor, results, env)
    print_goals(results)
    for name, res in results.items():
        for note in res["notes"]:
            print("note: %s: %s" % (name, note))


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
                        help="64 MiB downloads per target per round, over "
                        "HTTP and again through a tunnel (default 3)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="seconds of an unmeasured wrk run for each "
                        "target of (c) and (f) before round 1 (default 5)")
    parser.add_argument("--max-foreign", type=float, default=10.0,
                        help="measure again when other processes took more "
                        "than this %% of the machine meanwhile (default 10)")
    parser.add_argument("--wait-quiet", type=float, default=30.0,
                        help="before each measurement, wait up to this many "
                        "seconds for other processes to go below "
                        "--max-foreign (default 30)")
    parser.add_argument("--retries", type=int, default=1,
                        help="measurements again at most, when noisy "
                        "(default 1)")
    parser.add_argument("--idle-conns", type=int, default=1000,
                        help="idle keep-alive clients in test (e) "
                        "(default 1000)")
    parser.add_argument("--hold", type=float, default=5.0,
                        help="seconds the idle clients are held before the "
                        "RSS is read (default 5)")
    parser.add_argument("--only", nargs="+", choices=TARGETS,
                        default=list(TARGETS), help="targets to measure")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the conditions and every raw "
                        "number to FILE, as JSON")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter that runs proxyframe "
                        "(default: this one)")
    return parser.parse_args(argv)


def log(msg: str) -> None:
    """Print progress to stderr."""
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr,
          flush=True)


def first_line(argv: list, cwd: str | None = None) -> str:
    """First line a version command prints (stdout or stderr), or '?'."""
    try:
        done = subprocess.run(argv, capture_output=True, timeout=60, cwd=cwd,
                              env=child_env())
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout + done.stderr).decode(errors="replace").strip()
    return text.splitlines()[0].strip() if text else "?"


def conditions(env: Env) -> list:
    """The conditions of this run, as (name, text) pairs."""
    tools, args = env.tools, env.args
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = [
        ("date", time.strftime("%Y-%m-%d %H:%M %Z")),
        ("machine", "%d cores (nproc %d), %s, Linux %s" % (
            os.cpu_count() or 0, len(os.sched_getaffinity(0)), model,
            os.uname().release)),
        ("proxyframe commit", first_line(["git", "rev-parse", "--short",
                                          "HEAD"], cwd=REPO_ROOT)),
        ("proxyframe Python", first_line([args.python, "-c",
                                          "import sys, twisted; print("
                                          "sys.version.split()[0], "
                                          "'Twisted', twisted.__version__)"])),
        ("run.py Python", sys.version.split()[0]),
        ("nginx", first_line([tools["nginx"], "-v"])),
        ("wrk", first_line([tools["wrk"], "-v"])),
        ("curl", first_line([tools["curl"], "--version"])),
    ]
    if "squid" in tools:
        info.append(("squid", first_line([tools["squid"], "-v"])))
    if "tinyproxy" in tools:
        info.append(("tinyproxy", first_line([tools["tinyproxy"], "-v"])))
    if env.proxypy:
        info.append(("proxy.py", first_line([env.proxypy, "--version"])
                     + " (%d acceptor processes, threadless)"
                     % PROXYPY_WORKERS))
    for name, count in env.workers.items():
        info.append((name, "%d worker process(es) + supervisor (workers = "
                     "0: one per core)" % count if count > 1
                     else "1 process"))
    info.append(("open files limit", str(resource.getrlimit(
        resource.RLIMIT_NOFILE)[0])))
    return info


def wrk_round(rnd: int, test: str, path: str, env: Env, targets: list,
              results: dict) -> None:
    """Run wrk for path once for each target, recording into results."""
    for t in targets:
        label = "round %d %s %s" % (rnd, test, t.name)
        try:
            small, busy, discarded = quietly(
                env.args, label, lambda: test_wrk(env, t, path))
        except RuntimeError as exc:
            results[t.name]["notes"].append("round %d wrk: %s" % (rnd, exc))
            continue
        record_wrk(results[t.name], small)
        results[t.name]["noise"].append(busy)
        results[t.name]["discarded"] += discarded
        log("round %d %-6s %-18s %8.1f r/s  foreign %.0f%%  %s" % (
            rnd, test, t.name, small["rps"], busy, json.dumps(small)))


def download_round(rnd: int, env: Env, targets: list, results: dict,
                   tls: bool) -> None:
    """Run test (b), or (d) with tls, args.large_n times for each target."""
    test, speeds, growths, count = (
        ("tunnel", "tunnel_mbps", "tunnel_growth", "tunnels") if tls
        else ("large", "mbps", "growth", "downloads"))
    for t in targets:
        res = results[t.name]
        label = "round %d %s %s" % (rnd, test, t.name)
        batch, busy, discarded = quietly(
            env.args, label, lambda: download_batch(env, t, tls))
        res["dl_noise"].append(busy)
        res["discarded"] += discarded
        for got in batch:
            res[count] += 1
            if isinstance(got, str):
                res["notes"].append("round %d %s: %s" % (rnd, test, got))
                continue
            mbps, growth = got
            res[speeds].append(mbps)
            if growth is not None:
                res[growths].append(growth)
            log("round %d %-6s %-18s %8.1f MB/s  RSS +%s MiB  foreign %.0f%%"
                % (rnd, test, t.name, mbps,
                   fmt(growth / MIB) if growth is not None else "-", busy))


def download_batch(env: Env, target: Target, tls: bool) -> list:
    """args.large_n downloads; each (MB/s, RSS growth) or an error text."""
    batch = []
    for _ in range(env.args.large_n):
        try:
            batch.append(test_download(env, target, tls))
        except RuntimeError as exc:
            batch.append(str(exc))
    return batch


def idle_round(rnd: int, env: Env, live: dict, names: list,
               results: dict) -> None:
    """Run test (e) for each target: restart it (so that the load of the
    other tests does not count), GET once, then hold the idle clients."""
    for name in names:
        res = results[name]
        try:
            stop_one(live[name].proc)
            live[name] = t = start_target(env, name)
            check_relay(env, t)
            idle = test_idle(env, t)
        except RuntimeError as exc:
            res["notes"].append("round %d idle: %s" % (rnd, exc))
            continue
        res["idle_rss"].append(idle["idle_rss"])
        res["conns_rss"].append(idle["rss"])
        res["conns_pss"].append(idle["pss"])
        res["conns_ok"].append(idle["ok"])
        res["conns_open"].append(idle["still_open"])
        res["processes"] = idle["processes"]
        log("round %d idle   %-18s %6.1f MiB idle, %6.1f MiB with clients  "
            "%s" % (rnd, name, idle["idle_rss"] / MIB, idle["rss"] / MIB,
                    json.dumps(idle)))


def drop_dead(live: dict, results: dict) -> None:
    """Forget the targets whose process exited, noting it."""
    for name, t in list(live.items()):
        if t.proc is not None and exited(t.proc):
            results[name]["notes"].append(
                "process exited; last log lines:\n" + tail(t.log))
            del live[name]


def in_order(live: dict, group: tuple, rnd: int) -> list:
    """The live targets of group, in an order rotated by one every round,
    so that no target always comes first (or after the same one)."""
    names = [n for n in TARGETS if n in group and n in live]
    if names:
        shift = (rnd - 1) % len(names)
        names = names[shift:] + names[:shift]
    return [live[n] for n in names]


def measure(env: Env) -> dict:
    """Start everything, run all rounds; return {target: result record}."""
    args = env.args
    env.sha256 = make_www(env.tmp)
    log("/large sha256 %s" % env.sha256)
    start_nginx(env)
    log("origin nginx on %s:%d (HTTP), %s:%d (TLS)" % (
        HOST, env.origin_port, HOST, env.tls_port))
    env.lua = write_lua(env.tmp, env.origin_port)
    if "proxyframe-filters" in args.only:
        env.htpasswd = make_htpasswd(env)
    if "proxypy" in args.only:
        env.proxypy = proxypy_path()
    live = {}
    for name in TARGETS:
        if name in args.only:
            live[name] = start_target(env, name)
            log("started %s%s" % (name, " (%d workers)" % env.workers[name]
                                  if name in env.workers else ""))
    for t in live.values():
        check_relay(env, t)
    for t in live.values():
        if t.name in CACHE_TARGETS:
            gets, origin = env.warm_gets[t.name] = warm_cache(env, t)
            log("warm %s: %d GETs of %s on new connections, %d origin "
                "request(s), %d worker(s)" % (t.name, gets, CACHEABLE_PATH,
                                              origin,
                                              env.workers.get(t.name, 1)))
    for t in live.values():
        if t.name in CACHE_TARGETS + FILTER_TARGETS and args.warmup:
            path = CACHEABLE_PATH if t.name in CACHE_TARGETS else SMALL_PATH
            warm = test_wrk(env, t, path, args.warmup)
            env.warmups[t.name] = warm
            log("warm %s: wrk %d s, %.1f r/s, %d origin request(s)  %s" % (
                t.name, args.warmup, warm["rps"], warm["origin"],
                json.dumps(warm)))
    results = {name: new_result() for name in live}
    for rnd in range(1, args.rounds + 1):
        wrk_round(rnd, "small", SMALL_PATH, env,
                  in_order(live, RELAY_TARGETS, rnd), results)
        wrk_round(rnd, "filter", SMALL_PATH, env,
                  in_order(live, FILTER_TARGETS, rnd), results)
        wrk_round(rnd, "floor", SMALL_PATH, env,
                  in_order(live, FLOOR_TARGETS, rnd), results)
        wrk_round(rnd, "hit", CACHEABLE_PATH, env,
                  in_order(live, CACHE_TARGETS, rnd), results)
        drop_dead(live, results)
        download_round(rnd, env, in_order(live, RELAY_TARGETS, rnd),
                       results, tls=False)
        download_round(rnd, env, in_order(live, RELAY_TARGETS, rnd),
                       results, tls=True)
        drop_dead(live, results)
        idle_round(rnd, env, live,
                   [t.name for t in in_order(live, IDLE_TARGETS, rnd)],
                   results)
        drop_dead(live, results)
    return results


def main(argv: list | None = None) -> int:
    """Entry point: set up, measure, print, clean up."""
    args = parse_args(argv)
    tools = find_tools(args.only)
    raise_fd_limit()
    tmp = tempfile.mkdtemp(prefix="proxyframe-bench-")
    os.chmod(tmp, 0o755)  # nginx workers may run as another user (root)
    env = Env(args, tools, tmp)
    if os.access("/dev/shm", os.W_OK):
        env.download_dir = "/dev/shm"

    def cleanup():
        stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    atexit.register(cleanup)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda num, frame: sys.exit(128 + num))
    try:
        results = measure(env)
        info = conditions(env)
    except RuntimeError as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        cleanup()
    print_header(info)
    print_table(results, args, env)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"conditions": dict(info), "options": vars(args),
                       "results": results, "warmups": env.warmups,
                       "warm_gets": env.warm_gets}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
