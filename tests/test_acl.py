"""
The ``acl`` filter: ordered allow/deny rules, first match wins, with a
default.  Real proxy processes, a recording origin and http.client; a
denial is a 403 from the proxy (``Proxy-Status: ...; error=
http_request_denied``, RFC 9209 §2.3.13) and the origin sees nothing.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import re
import socket
import subprocess
import time

import pytest
from twisted.internet.task import Clock

from proxyframe.config import Config, ConfigError
from proxyframe.exchange import Exchange, Headers, Request
from proxyframe.filters import FilterContext
from proxyframe.plugins.pf_acl import acl
from support import REPO, ProxyProcess, proxy_config, read_response, twistd_command

USER_PLUGIN = '''
from twisted.plugin import IPlugin
from zope.interface import implementer
from proxyframe.filters import Filter
from proxyframe.interfaces import IFilterFactory

class SetUser(Filter):
    """Takes exchange.user from the request's X-Test-User field."""
    def request_received(self, exchange):
        user = exchange.request.headers.get(b"x-test-user")
        if user is not None:
            exchange.user = user.decode()
    connect_requested = request_received

@implementer(IPlugin, IFilterFactory)
class SetUserFactory:
    name = "test-set-user"
    description = "Set exchange.user from X-Test-User (tests only)"
    def build(self, options, context):
        return SetUser()

set_user = SetUserFactory()
'''


def acl_toml(*rules: dict, default: str | None = None, before: str = "", options: dict | None = None,
             **top) -> str:
    """A proxy config whose chain is *before* (TOML text) then one acl filter with *options* and *rules*."""
    lines = [proxy_config(**top), before, "[[filter]]", 'use = "acl"']
    options = {**(options or {}), **({"default": default} if default is not None else {})}
    lines += [f"{key} = {json.dumps(value)}" for key, value in options.items()]
    for rule in rules:
        # JSON strings, numbers, booleans and arrays are valid TOML values.
        lines += ["[[filter.rules]]", *(f"{key} = {json.dumps(value)}" for key, value in rule.items())]
    return "\n".join(lines) + "\n"


@pytest.fixture
def start_acl(tmp_path):
    """``start_acl(*rules, default=..., before=..., **top)``: a proxy with that acl, stopped at teardown."""
    started: list[ProxyProcess] = []

    def start(*rules: dict, **kwargs) -> ProxyProcess:
        started.append(ProxyProcess(acl_toml(*rules, **kwargs), tmp_path))
        return started[-1]

    yield start
    for proc in started:
        proc.stop()


def fetch(proxy: ProxyProcess, url: str, method: str = "GET", headers: dict | None = None,
          host: str | None = None, port: int | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request through the proxy with http.client: (status, lowercased headers, body)."""
    conn = http.client.HTTPConnection(host or proxy.host, port or proxy.port, timeout=10)
    try:
        conn.request(method, url, body=b"x" if method == "POST" else None, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def tunnel(proxy: ProxyProcess, authority: str, headers: dict | None = None):
    """
    Send ``CONNECT authority`` and read the response head.

    :returns: ``(status, lowercased headers, socket)``; the socket is the
        tunnel when the status is 2xx.
    """
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    fields = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{fields}\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        piece = sock.recv(1)
        assert piece, f"proxy closed after {head!r}"
        head += piece
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:] if line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}, sock


def assert_denied(status: int, headers: dict[str, str], body: bytes, rule: str) -> None:
    """A 403 made by the acl (not by an origin), naming *rule*."""
    assert status == 403
    assert headers["proxy-status"].startswith("proxyframe; error=http_request_denied;")
    assert f"Denied by acl {rule}" in headers["proxy-status"]
    assert f"Denied by acl {rule}".encode() in body


def clock_at(hour: int, minute: int, weekday: int) -> Clock:
    """A Clock whose local time is *hour*:*minute* on a day with *weekday* (0 is Monday)."""
    day = datetime.date(2024, 1, 1) + datetime.timedelta(days=weekday)  # 2024-01-01 is a Monday
    clock = Clock()
    clock.advance(time.mktime((day.year, day.month, day.day, hour, minute, 30, 0, 0, -1)))
    return clock


def build(options: dict, tmp_path, reactor=None):
    return acl.build(options, FilterContext(reactor or Clock(), Config(), tmp_path, 0))


def exchange(client: str = "127.0.0.1", method: bytes = b"GET", host: str = "example.com",
             port: int = 80) -> Exchange:
    request = Request(method, b"http://example.com/", b"1.1", Headers())
    request.scheme, request.host, request.port = (None if method == b"CONNECT" else b"http"), host, port
    return Exchange(f"{client}:5000", client, request, 0.0)


# -- clients ---------------------------------------------------------------------

def test_client_outside_the_cidr_is_denied_by_default(start_acl, origin):
    """A client (127.0.0.1) outside the only allowed range (10.0.0.0/8) gets the default deny; the origin sees nothing."""
    proxy = start_acl({"action": "allow", "clients": ["10.0.0.0/8"]})
    assert_denied(*fetch(proxy, origin.url("/")), "default")
    assert origin.requests == []


def test_client_inside_the_cidr_is_allowed(start_acl, origin):
    """A client inside an allowed range is forwarded."""
    proxy = start_acl({"action": "allow", "clients": ["10.0.0.0/8", "127.0.0.0/8"]})
    status, _, body = fetch(proxy, origin.url("/"))
    assert (status, body) == (200, b"hello")
    assert [r.target for r in origin.requests] == ["/"]


def test_ipv6_client_matches_ipv6_ranges_only(start_acl, origin):
    """With clients ["::1/128"] allowed, a client on ::1 is forwarded and one on 127.0.0.1 is denied."""
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    proxy = start_acl({"action": "allow", "clients": ["::1/128"]},
                      listen=["tcp:0:interface=127.0.0.1", "tcp6:0:interface=\\:\\:1"])
    v6_port = int(proxy.wait_for_line(r"listening on ::1:\d+").rsplit(":", 1)[1])
    status, _, body = fetch(proxy, origin.url("/"), host="::1", port=v6_port)
    assert (status, body) == (200, b"hello")
    assert_denied(*fetch(proxy, origin.url("/v4")), "default")
    assert [r.target for r in origin.requests] == ["/"]


# -- hosts -----------------------------------------------------------------------

HOST_RULE = {"action": "deny", "hosts": ["blocked.example", ".ads.example", "*.tracker.*",
                                         "~^bad[0-9]+\\.example$", "127.0.0.2"]}


@pytest.mark.parametrize("target", [
    "http://blocked.example/",         # exact
    "http://BLOCKED.example./",        # exact, any case, final dot
    "http://ads.example/",             # suffix: the name itself
    "http://x.y.ads.example/",         # suffix: names under it
    "http://a.tracker.example:8080/",  # wildcard
    "http://bad42.example/",           # regex
    "http://127.0.0.2:9/",             # IP literal
])
def test_denied_hosts(start_acl, target):
    """Each host entry form denies a matching target before any connection is made."""
    proxy = start_acl(HOST_RULE, default="allow")
    assert_denied(*fetch(proxy, target), r"rules[0] (deny hosts blocked.example, .ads.example, *.tracker.*, ...)")


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost"])
def test_hosts_that_do_not_match_are_allowed(start_acl, origin, name):
    """Targets no host entry matches (an IP literal, a name that is not under a suffix) reach the origin."""
    proxy = start_acl(HOST_RULE, {"action": "deny", "hosts": [".host", "~^local$", "notads.example"]},
                      default="allow")
    status, _, body = fetch(proxy, f"http://{name}:{origin.port}/x")
    assert (status, body) == (200, b"hello")
    assert [r.target for r in origin.requests] == ["/x"]


# -- ports, methods, schemes, CONNECT --------------------------------------------

def test_ports_and_ranges(start_acl, origin):
    """ports matches a listed port or a port in a "low-high" range; others pass."""
    p = origin.port
    proxy = start_acl({"action": "deny", "ports": [p]}, {"action": "deny", "ports": ["1-1023", f"{p + 1}-{p + 2}"]},
                      default="allow", connect_ports=[p + 1])
    assert_denied(*fetch(proxy, origin.url("/")), "rules[0]")
    assert_denied(*fetch(proxy, "http://127.0.0.1:80/"), "rules[1]")
    assert tunnel(proxy, f"127.0.0.1:{p + 1}")[0] == 403  # in the range, CONNECT too
    assert origin.requests == []
    proxy2 = start_acl({"action": "deny", "ports": [f"{p + 1}-65535", p - 1]}, default="allow")
    assert fetch(proxy2, origin.url("/"))[0] == 200


def test_methods(start_acl, origin):
    """methods matches the request method exactly: POST is denied, GET forwarded."""
    proxy = start_acl({"action": "deny", "methods": ["POST", "PUT"]}, default="allow")
    assert_denied(*fetch(proxy, origin.url("/p"), method="POST"), "rules[0] (deny methods POST, PUT)")
    assert fetch(proxy, origin.url("/g"))[0] == 200
    assert [(r.method, r.target) for r in origin.requests] == [("GET", "/g")]


def test_schemes_match_plain_requests_not_connect(start_acl, origin):
    """schemes ["http"] matches an http:// request; a CONNECT has no scheme, so the rule does not apply."""
    proxy = start_acl({"action": "deny", "schemes": ["http"]}, default="allow", connect_ports=[origin.port])
    assert_denied(*fetch(proxy, origin.url("/")), "rules[0] (deny schemes http)")
    status, _, sock = tunnel(proxy, f"127.0.0.1:{origin.port}")
    with sock:
        assert status == 200
        sock.sendall(b"GET /tunnelled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(sock)[0] == 200
    assert [r.target for r in origin.requests] == ["/tunnelled"]


def test_connect_condition(start_acl, origin):
    """connect = true denies every CONNECT (403, no tunnel) and lets plain requests through (RFC 9110 §9.3.6)."""
    proxy = start_acl({"action": "deny", "connect": True}, default="allow", connect_ports=[origin.port])
    status, headers, sock = tunnel(proxy, f"127.0.0.1:{origin.port}")
    with sock:
        body = sock.recv(65536)
    assert_denied(status, headers, body, "rules[0] (deny connect true)")
    assert origin.connections == 0
    assert fetch(proxy, origin.url("/plain"))[0] == 200
    assert [r.target for r in origin.requests] == ["/plain"]


def test_connect_false_matches_plain_requests_only(start_acl, origin):
    """connect = false applies to plain requests: they are denied while a CONNECT tunnel opens."""
    proxy = start_acl({"action": "deny", "connect": False}, default="allow", connect_ports=[origin.port])
    assert_denied(*fetch(proxy, origin.url("/")), "rules[0]")
    status, _, sock = tunnel(proxy, f"127.0.0.1:{origin.port}")
    sock.close()
    assert status == 200


# -- users, time -----------------------------------------------------------------

@pytest.fixture
def start_acl_with_users(start_acl, tmp_path):
    """``start_acl`` with the test-set-user filter (exchange.user from X-Test-User) before the acl."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "pf_test_acl_user.py").write_text(USER_PLUGIN)

    def start(*rules: dict, **kwargs) -> ProxyProcess:
        return start_acl(*rules, plugin_paths=["plugins"], before='[[filter]]\nuse = "test-set-user"', **kwargs)

    return start


def as_user(proxy: ProxyProcess, url: str, user: str | None):
    """One GET through *proxy* as *user* (None: unauthenticated)."""
    return fetch(proxy, url, headers={"X-Test-User": user} if user else None)


def test_users_and_authenticated(start_acl_with_users, origin):
    """users matches exchange.user as set by an earlier filter; authenticated matches any user."""
    proxy = start_acl_with_users({"action": "deny", "users": ["mallory"]}, {"action": "allow", "authenticated": True},
                                 connect_ports=[origin.port])
    assert fetch(proxy, origin.url("/alice"), headers={"X-Test-User": "alice"})[0] == 200
    assert_denied(*fetch(proxy, origin.url("/mallory"), headers={"X-Test-User": "mallory"}),
                  "rules[0] (deny users mallory)")
    assert_denied(*fetch(proxy, origin.url("/nobody")), "default")
    assert tunnel(proxy, f"127.0.0.1:{origin.port}", {"X-Test-User": "mallory"})[0] == 403
    assert [r.target for r in origin.requests] == ["/alice"]


def hhmm(minutes: int) -> str:
    minutes %= 24 * 60
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def test_time_window_including_and_excluding_now(start_acl, origin):
    """A time window around the current local time matches; one two hours ahead does not (windows may wrap midnight)."""
    now = datetime.datetime.now()
    minute = now.hour * 60 + now.minute
    around, ahead = f"{hhmm(minute - 60)}-{hhmm(minute + 60)}", f"{hhmm(minute + 120)}-{hhmm(minute + 180)}"
    today = now.strftime("%a").lower()
    proxy = start_acl({"action": "allow", "hosts": ["127.0.0.1"], "time": around, "days": [today]},
                      {"action": "allow", "hosts": ["localhost"], "time": ahead})
    assert fetch(proxy, origin.url("/now"))[0] == 200
    assert_denied(*fetch(proxy, f"http://localhost:{origin.port}/later"), "default")
    assert [r.target for r in origin.requests] == ["/now"]


@pytest.mark.parametrize("window, days, hour, minute, weekday, matches", [
    ("09:00-17:00", None, 9, 0, 0, True),
    ("09:00-17:00", None, 16, 59, 0, True),
    ("09:00-17:00", None, 17, 0, 0, False),   # the end is excluded
    ("09:00-17:00", None, 8, 59, 0, False),
    ("22:00-06:00", None, 23, 0, 0, True),    # wraps past midnight
    ("22:00-06:00", None, 5, 59, 0, True),
    ("22:00-06:00", None, 12, 0, 0, False),
    ("00:00-24:00", ["sat", "Sun"], 12, 0, 5, True),
    (None, ["sat", "sun"], 12, 0, 4, False),
])
def test_time_and_days_boundaries(tmp_path, window, days, hour, minute, weekday, matches):
    """time is start-inclusive, end-exclusive, local, and may wrap; days names weekdays (any case)."""
    rule = {"action": "deny", **({"time": window} if window else {}), **({"days": days} if days else {})}
    acl_filter = build({"default": "allow", "rules": [rule]}, tmp_path, clock_at(hour, minute, weekday))
    assert (acl_filter.request_received(exchange()) is not None) is matches


# -- order and default -----------------------------------------------------------

def test_first_match_wins(start_acl, origin):
    """The first matching rule decides: allow 127.0.0.1 before deny-all lets it through, after it does not."""
    allow_origin, deny_all = {"action": "allow", "hosts": ["127.0.0.1"]}, {"action": "deny"}
    proxy = start_acl(allow_origin, deny_all, default="allow")
    assert fetch(proxy, origin.url("/first"))[0] == 200
    assert_denied(*fetch(proxy, f"http://localhost:{origin.port}/"), "rules[1] (deny every request)")
    proxy2 = start_acl(deny_all, allow_origin, default="allow")
    assert_denied(*fetch(proxy2, origin.url("/second")), "rules[0]")
    assert [r.target for r in origin.requests] == ["/first"]


@pytest.mark.parametrize("default, status", [("allow", 200), ("deny", 403), (None, 403)])
def test_default_decides_when_no_rule_matches(start_acl, origin, default, status):
    """With no matching rule, default decides; left out, it is deny."""
    proxy = start_acl({"action": "deny", "hosts": ["blocked.example"]}, default=default)
    got, headers, body = fetch(proxy, origin.url("/"))
    assert got == status
    if status == 403:
        assert_denied(got, headers, body, "default (no rule matched)")
    assert len(origin.requests) == (status == 200)


# -- list files ------------------------------------------------------------------

def poll(request, until, timeout: float = 10.0):
    """
    Repeat *request* until ``until(result)`` holds.  List files are looked
    at when requests come, at most once a second, so a change shows after
    a few requests.
    """
    deadline = time.monotonic() + timeout
    while not until(result := request()):
        assert time.monotonic() < deadline, f"still {result} after {timeout} s"
        time.sleep(0.05)
    return result


def assert_rewrite_swaps(proxy: ProxyProcess, path, denied, allowed, text: str) -> None:
    """
    *denied()* gets 403 and *allowed()* 200; once *path* is rewritten with
    *text*, the other way round, and the reload is logged.
    """
    assert denied()[0] == 403
    assert allowed()[0] == 200
    path.write_text(text)
    poll(allowed, lambda result: result[0] == 403)
    assert denied()[0] == 200
    proxy.wait_for_line(rf"acl: reloaded .*{re.escape(path.name)}")


def assert_broken_rewrite_ignored(proxy: ProxyProcess, path, request, text: str) -> str:
    """
    Rewrite *path* with *text* (a bad line): *request()* keeps its status
    until the problem is logged.

    :returns: the log line.
    """
    before = request()[0]
    path.write_text(text)
    statuses = []
    poll(lambda: statuses.append(request()[0]),
         lambda _: any("acl: keeping the previous entries" in line for line in proxy.lines))
    assert set(statuses) == {before}
    return proxy.wait_for_line("acl: keeping the previous entries")


def test_hosts_file_is_read_and_reloaded_when_it_changes(start_acl, origin, tmp_path):
    """hosts_file entries (comments ignored) apply; rewriting the file changes the decision, with no restart."""
    blocked = tmp_path / "blocked-hosts.txt"
    blocked.write_text("# blocked for now\nlocalhost   # trailing comment\n\n")
    proxy = start_acl({"action": "deny", "hosts_file": "blocked-hosts.txt"}, default="allow")
    via_name = lambda: fetch(proxy, f"http://localhost:{origin.port}/name")
    via_address = lambda: fetch(proxy, origin.url("/address"))
    assert_denied(*via_name(), "rules[0] (deny hosts_file blocked-hosts.txt)")
    assert_rewrite_swaps(proxy, blocked, via_name, via_address, "127.0.0.1\n")


def test_broken_list_file_keeps_the_previous_entries(start_acl, origin, tmp_path):
    """A list file rewritten with a bad line is logged and ignored; the entries read before stay in force."""
    clients = tmp_path / "clients.txt"
    clients.write_text("10.0.0.0/8\n127.0.0.0/8\n")
    proxy = start_acl({"action": "allow", "clients_file": "clients.txt"})
    assert fetch(proxy, origin.url("/"))[0] == 200
    line = assert_broken_rewrite_ignored(proxy, clients, lambda: fetch(proxy, origin.url("/")),
                                         "10.0.0.0/8\nnot-a-network\n")
    assert "clients.txt line 2" in line and "not-a-network" in line
    clients.write_text("10.0.0.0/8\n")
    poll(lambda: fetch(proxy, origin.url("/")), lambda result: result[0] == 403)


# -- groups ----------------------------------------------------------------------

GROUPS = """\
# Apache AuthGroupFile format
admins: alice bob

staff: carol   # a comment
admins:dave
empty:
"""


def test_groups_match_members_of_a_listed_group(start_acl_with_users, origin, tmp_path):
    """groups matches when exchange.user is in any listed group of group_file (lines of a group add up)."""
    (tmp_path / "groups.txt").write_text(GROUPS)
    proxy = start_acl_with_users({"action": "allow", "groups": ["empty", "admins"]},
                                 options={"group_file": "groups.txt"}, connect_ports=[origin.port])
    for user in ("alice", "bob", "dave"):
        assert as_user(proxy, origin.url(f"/{user}"), user)[0] == 200
    for user in ("carol", "admins", "ALICE", None):
        assert_denied(*as_user(proxy, origin.url(f"/{user}"), user), "default")
    assert tunnel(proxy, f"127.0.0.1:{origin.port}", {"X-Test-User": "carol"})[0] == 403
    assert [r.target for r in origin.requests] == ["/alice", "/bob", "/dave"]


def test_group_file_is_reloaded_and_a_broken_one_ignored(start_acl_with_users, origin, tmp_path):
    """
    Rewriting group_file changes membership with no restart; a rewrite with
    a bad line is logged and the groups read before stay in force.
    """
    groups = tmp_path / "groups.txt"
    groups.write_text("admins: alice\n")
    proxy = start_acl_with_users({"action": "deny", "groups": ["admins"]}, default="allow",
                                 options={"group_file": "groups.txt"})
    alice, bob = (lambda user=user: as_user(proxy, origin.url(f"/{user}"), user) for user in ("alice", "bob"))
    assert_denied(*alice(), "rules[0] (deny groups admins)")
    assert_rewrite_swaps(proxy, groups, alice, bob, "admins: bob\n")
    line = assert_broken_rewrite_ignored(proxy, groups, bob, "admins: alice\nadmins bob\n")
    assert "groups.txt line 2" in line and "'admins bob'" in line
    assert bob()[0] == 403 and alice()[0] == 200


# -- configuration errors --------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"rule": []}, "unknown option 'rule'"),
    ({"default": "maybe"}, "default must be \"allow\" or \"deny\", not 'maybe'"),
    ({"rules": {"action": "deny"}}, "rules must be an array of tables"),
    ({"rules": [{"action": "permit"}]}, "rules[0].action must be \"allow\" or \"deny\""),
    ({"rules": [{"hosts": ["x"]}]}, "rules[0].action must be \"allow\" or \"deny\", not None"),
    ({"rules": [{"action": "deny"}, {"action": "deny", "host": ["x"]}]}, "rules[1]: unknown key 'host'"),
    ({"rules": [{"action": "deny", "clients": ["10.0.0.300/8"]}]},
     "rules[0].clients[0]: '10.0.0.300/8' does not appear to be an IPv4 or IPv6 network"),
    ({"rules": [{"action": "deny", "clients": ["10.0.0.0/8", "10.0.0.1/8"]}]},
     "rules[0].clients[1]: 10.0.0.1/8 has host bits set"),
    ({"rules": [{"action": "deny", "hosts": "example.com"}]}, "rules[0].hosts must be a list of strings"),
    ({"rules": [{"action": "deny", "hosts": ["~("]}]}, "rules[0].hosts[0]: '~(' is not a valid regular expression"),
    ({"rules": [{"action": "deny", "hosts": ["http://x/"]}]}, "rules[0].hosts[0]: 'http://x/' is not a host name"),
    ({"rules": [{"action": "deny", "ports": ["90-80"]}]}, "rules[0].ports[0]: '90-80' is not a port"),
    ({"rules": [{"action": "deny", "ports": [80, 65536]}]}, "rules[0].ports[1]: 65536 is not a port"),
    ({"rules": [{"action": "deny", "methods": ["GET POST"]}]}, "rules[0].methods[0]: 'GET POST' is not a valid method"),
    ({"rules": [{"action": "deny", "schemes": ["1http"]}]}, "rules[0].schemes[0]: '1http' is not a valid scheme"),
    ({"rules": [{"action": "deny", "connect": "yes"}]}, "rules[0].connect must be true or false, not 'yes'"),
    ({"rules": [{"action": "deny", "authenticated": 1}]}, "rules[0].authenticated must be true or false"),
    ({"rules": [{"action": "deny", "time": "9-17"}]}, "rules[0].time: '9-17' is not a window \"HH:MM-HH:MM\""),
    ({"rules": [{"action": "deny", "time": "09:00-09:00"}]}, "rules[0].time: '09:00-09:00' is not a window"),
    ({"rules": [{"action": "deny", "time": "23:00-24:01"}]}, "rules[0].time: '23:00-24:01' is not a window"),
    ({"rules": [{"action": "deny", "days": ["mon", "funday"]}]}, "rules[0].days[1]: 'funday' is not a day"),
    ({"rules": [{"action": "deny", "hosts_file": "absent.txt"}]},
     "rules[0].hosts_file: cannot read {tmp}/absent.txt: No such file or directory"),
    ({"rules": [{"action": "deny", "clients_file": "bad.txt"}]},
     "rules[0].clients_file ({tmp}/bad.txt line 3): 'nonsense' does not appear to be"),
    ({"rules": [{"action": "deny"}, {"action": "allow", "groups": ["admins"]}]},
     "rules[1].groups: needs the filter option group_file"),
    ({"group_file": "groups.txt", "rules": [{"action": "allow", "groups": "admins"}]},
     "rules[0].groups must be a list of strings"),
    ({"group_file": ""}, "group_file must be a file name (a string)"),
    ({"group_file": "absent.txt"}, "group_file: cannot read {tmp}/absent.txt: No such file or directory"),
    ({"group_file": "bad-groups.txt"},
     "group_file ({tmp}/bad-groups.txt line 3): 'admins alice' is not a line \"group: user1 user2 ...\""),
    ({"group_file": "bad-groups2.txt"}, "group_file ({tmp}/bad-groups2.txt line 1): 'my admins: alice'"),
    ({"group_file": "bad-groups3.txt"}, "group_file ({tmp}/bad-groups3.txt line 1): ': alice'"),
])
def test_bad_options_name_the_rule_and_key(tmp_path, options, message):
    """build refuses every bad value with a ConfigError naming the rule index, the key and the entry."""
    (tmp_path / "bad.txt").write_text("# clients\n127.0.0.1\nnonsense\n")
    (tmp_path / "groups.txt").write_text("admins: alice\n")
    (tmp_path / "bad-groups.txt").write_text("# groups\nstaff: carol\nadmins alice\n")
    (tmp_path / "bad-groups2.txt").write_text("my admins: alice\n")
    (tmp_path / "bad-groups3.txt").write_text(": alice\n")
    with pytest.raises(ConfigError) as info:
        build(options, tmp_path)
    assert message.format(tmp=tmp_path) in str(info.value)


def test_twistd_refuses_a_bad_acl_without_traceback(tmp_path):
    """twistd proxyframe with a bad acl rule exits 1, naming the filter, the rule and the key; no traceback."""
    path = tmp_path / "proxyframe.toml"
    path.write_text(acl_toml({"action": "allow"}, {"action": "deny", "clients": ["127.0.0.1/33"]}))
    out = subprocess.run(twistd_command() + ["-n", "--pidfile=", "proxyframe", "--config", str(path)],
                         cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=60)
    output = out.stdout + out.stderr
    assert out.returncode == 1, output
    assert f"{path}: filter[0] (acl): rules[1].clients[0]: '127.0.0.1/33' does not appear to be" in output
    assert "Traceback" not in output


# -- the hot path ----------------------------------------------------------------

def test_client_rule_matches_ipv4_mapped_and_unix_clients(tmp_path):
    """An IPv4-mapped IPv6 client matches IPv4 ranges; a client address that is not an IP matches no range."""
    acl_filter = build({"rules": [{"action": "allow", "clients": ["127.0.0.0/8"]}]}, tmp_path)
    assert acl_filter.request_received(exchange("::ffff:127.0.0.1")) is None
    assert acl_filter.request_received(exchange("/run/proxy.sock")).status == 403
    assert acl_filter.request_received(exchange("::1")).status == 403
