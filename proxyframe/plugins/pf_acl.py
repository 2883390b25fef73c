"""
``acl``: allow or deny requests by ordered rules; the first rule that
matches decides, and ``default`` decides when none does (Squid's
``http_access`` model)::

    [[filter]]
    use = "acl"
    default = "deny"

    [[filter.rules]]
    action = "deny"
    hosts = [".ads.example.com", "*.tracker.*", "~^bad[0-9]+\\\\.net$"]

    [[filter.rules]]
    action = "allow"
    clients = ["127.0.0.0/8", "::1/128"]

Rules on ``users`` and ``groups`` (from a ``group_file`` in Apache's
``AuthGroupFile`` format) test ``exchange.user``, set by an earlier filter.

Every condition of a rule must match (AND); within one condition's list,
any entry may (OR).  A denied request or CONNECT gets ``403`` with
``Proxy-Status: <via>; error=http_request_denied`` (RFC 9209 §2.3.13) and a
page naming the rule; it is never forwarded.  Everything is parsed and
compiled in ``build``; a request costs a few set lookups per rule.  The
config reference is ``docs/filters/acl.rst``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
from collections.abc import Callable
from functools import lru_cache

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from proxyframe.config import ConfigError
from proxyframe.exchange import Response
from proxyframe.filters import Filter, check_options
from proxyframe.interfaces import IFilterFactory

__all__ = ()

_log = Logger()

_OPTIONS = ("default", "group_file", "rules")
#: A rule's conditions, in the order they are tested (cheapest first).
_CONDITIONS = ("connect", "methods", "schemes", "ports", "authenticated", "users", "groups",
               "clients", "clients_file", "hosts", "hosts_file", "time", "days")
_ACTIONS = {"allow": True, "deny": False}
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
#: Seconds between two looks at a list file's modification time.
RECHECK_INTERVAL = 1.0

# RFC 9110 §5.6.2 token (a method, §9.1); RFC 3986 §3.1 scheme.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]*")
_HOST_NAME = re.compile(r"[a-z0-9_\-]+(?:\.[a-z0-9_\-]+)*")
_PORTS = re.compile(r"(\d{1,5})-(\d{1,5})")
_WINDOW = re.compile(r"(\d\d):(\d\d)-(\d\d):(\d\d)")

Test = Callable[[object], bool]
#: ``[(where, text), ...]``: list entries with their place for messages.
Entries = list[tuple[str, str]]


# -- values -------------------------------------------------------------------

def _strings(value: object, where: str) -> Entries:
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list of strings")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item or item != item.strip():
            raise ConfigError(f"{where}[{i}] must be a non-empty string without surrounding spaces, "
                              f"not {item!r}")
    return [(f"{where}[{i}]", item) for i, item in enumerate(value)]


def _boolean(value: object, where: str) -> bool:
    if type(value) is not bool:
        raise ConfigError(f"{where} must be true or false, not {value!r}")
    return value


@lru_cache(maxsize=4096)
def _client_address(host: str) -> tuple[int, int] | None:
    """
    ``(version, integer)`` of a client address; IPv4-mapped IPv6 counts as
    IPv4.  Memoized (a pure function of its argument: the cache holds no
    state that could differ between workers) because parsing costs more
    than the whole lookup.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.version, int(address)


def _target_host(host: str) -> str:
    """The request's host as the hosts entries are stored: lowercase, no final dot, IPv6 compressed."""
    host = host.lower().rstrip(".")
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host).compressed
        except ValueError:
            pass
    return host


# -- matchers: built from entries, answer `value in matcher` -----------------

class _Networks:
    """
    CIDR ranges (``10.0.0.0/8``, ``::1/128``, or a bare address): a client
    address is looked up in one set per distinct prefix length.
    """

    def __init__(self, entries: Entries) -> None:
        by_version: dict[int, dict[int, set[int]]] = {4: {}, 6: {}}
        for where, text in entries:
            try:
                network = ipaddress.ip_network(text)
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None
            shift = network.max_prefixlen - network.prefixlen
            by_version[network.version].setdefault(shift, set()).add(int(network.network_address) >> shift)
        self._shifts = {version: tuple(shifts.items()) for version, shifts in by_version.items()}

    def __contains__(self, address: tuple[int, int] | None) -> bool:
        if address is None:
            return False
        version, value = address
        for shift, prefixes in self._shifts[version]:
            if value >> shift in prefixes:
                return True
        return False


class _Hosts:
    """
    Host entries: ``name`` (exact), ``.name`` (the name and every name under
    it), a wildcard with ``*`` and ``?``, or ``~regex`` (searched, case
    ignored).  IP literals match exactly.
    """

    def __init__(self, entries: Entries) -> None:
        self._exact: set[str] = set()
        self._suffixes: set[str] = set()
        wildcards: list[str] = []
        self._regexes: list[re.Pattern] = []
        for where, text in entries:
            if text.startswith("~"):
                try:
                    self._regexes.append(re.compile(text[1:], re.IGNORECASE))
                except re.error as e:
                    raise ConfigError(f"{where}: {text!r} is not a valid regular expression: {e}") from None
            elif "*" in text or "?" in text:
                wildcards.append("".join(".*" if c == "*" else "." if c == "?" else re.escape(c)
                                         for c in text.lower()))
            elif text.startswith("."):
                self._suffixes.add(self._name(text[1:], where))
            else:
                self._exact.add(self._name(text, where))
        self._wildcards = re.compile("|".join(wildcards)) if wildcards else None

    @staticmethod
    def _name(text: str, where: str) -> str:
        try:
            return ipaddress.ip_address(text.strip("[]")).compressed
        except ValueError:
            pass
        name = text.lower().rstrip(".")
        if not _HOST_NAME.fullmatch(name):
            raise ConfigError(f"{where}: {text!r} is not a host name, an IP address, .suffix, "
                              f"a wildcard or ~regex")
        return name

    def __contains__(self, host: str) -> bool:
        if host in self._exact:
            return True
        if self._suffixes:
            rest = host
            while True:
                if rest in self._suffixes:
                    return True
                dot = rest.find(".")
                if dot < 0:
                    break
                rest = rest[dot + 1:]
        if self._wildcards is not None and self._wildcards.fullmatch(host):
            return True
        return any(regex.search(host) for regex in self._regexes)


class _Groups:
    """
    Apache ``AuthGroupFile`` lines, ``group: user1 user2 ...``: the groups of
    each user.  A group on several lines has the members of all of them.
    """

    def __init__(self, entries: Entries) -> None:
        self._of: dict[str, frozenset[str]] = {}
        for where, text in entries:
            group, colon, members = text.partition(":")
            group = group.strip()
            if not colon or not group or len(group.split()) != 1:
                raise ConfigError(f"{where}: {text!r} is not a line \"group: user1 user2 ...\"")
            for user in members.split():
                self._of[user] = self._of.get(user, frozenset()) | {group}

    def of(self, user: str | None) -> frozenset[str]:
        """:returns: the groups *user* is a member of (none for ``None``)."""
        return self._of.get(user, frozenset())


class _ListFile:
    """
    A matcher's entries (or a :class:`_Groups`'s lines) in a file: one a
    line, ``#`` starts a comment.  Read in ``build``; afterwards, at most
    once per :data:`RECHECK_INTERVAL` and only when a request asks, a thread
    looks at the file and re-reads it if it changed.  A file that cannot be read or parsed any more leaves the
    previous entries in force (and is logged once per distinct problem).
    """

    def __init__(self, path, make: type, reactor, where: str) -> None:
        self._path = path
        self._make = make
        self._reactor = reactor
        self._where = where
        try:
            self._stamp, self._matcher = self._load(None)
        except OSError as e:
            raise ConfigError(f"{where}: cannot read {path}: {e.strerror}") from None
        self._next_check = reactor.seconds() + RECHECK_INTERVAL
        self._checking = False
        self._problem: str | None = None

    def _load(self, stamp: tuple | None) -> tuple[tuple, object] | None:
        """:returns: ``(stamp, matcher)``, or ``None`` when the file's stamp is still *stamp*."""
        st = os.stat(self._path)
        new = (st.st_mtime_ns, st.st_size, st.st_ino)
        if new == stamp:
            return None
        with open(self._path, encoding="utf-8") as f:
            entries = [(f"{self._where} ({self._path} line {number})", entry)
                       for number, line in enumerate(f, 1) if (entry := line.split("#", 1)[0].strip())]
        return new, self._make(entries)

    def current(self):
        """:returns: the matcher in force (first starting a look at the file, when it is time)."""
        if not self._checking and self._reactor.seconds() >= self._next_check:
            self._checking = True
            d = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._load, self._stamp)
            d.addCallbacks(self._loaded, self._failed)
        return self._matcher

    def __contains__(self, value: object) -> bool:
        return value in self.current()

    def _checked(self, problem: str | None) -> None:
        self._checking = False
        self._next_check = self._reactor.seconds() + RECHECK_INTERVAL
        if problem is not None and problem != self._problem:
            _log.warn("acl: keeping the previous entries of {path}: {problem}", path=str(self._path),
                      problem=problem)
        self._problem = problem

    def _loaded(self, result: tuple[tuple, object] | None) -> None:
        self._checked(None)
        if result is not None:
            self._stamp, self._matcher = result
            _log.info("acl: reloaded {path}", path=str(self._path))

    def _failed(self, failure) -> None:
        self._checked(failure.getErrorMessage())


class _Ports:
    """Ports (``80``) and inclusive ranges (``"8000-8099"``)."""

    def __init__(self, value: object, where: str) -> None:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list of ports and \"low-high\" ranges")
        self._single: set[int] = set()
        ranges = []
        for i, item in enumerate(value):
            m = _PORTS.fullmatch(item) if isinstance(item, str) else None
            if type(item) is int and 0 < item < 65536:
                self._single.add(item)
            elif m and 0 < int(m[1]) <= int(m[2]) < 65536:
                ranges.append((int(m[1]), int(m[2])))
            else:
                raise ConfigError(f"{where}[{i}]: {item!r} is not a port (1-65535) "
                                  f"or a range \"low-high\" of them")
        self._ranges = tuple(ranges)

    def __contains__(self, port: int) -> bool:
        return port in self._single or any(low <= port <= high for low, high in self._ranges)


# -- conditions: rule table → tests ---------------------------------------------

def _list_file(path: object, make: type, context, where: str) -> _ListFile:
    """The option *where*'s file name *path*, read into a watched :class:`_ListFile`."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where} must be a file name (a string)")
    return _ListFile(context.path(path), make, context.reactor, where)


def _list_test(table: dict, key: str, make: type, value_of: Callable, where: str, context) -> Test | None:
    """``key`` (inline entries) and ``key_file`` (a list file) together: either may match."""
    matchers = []
    if key in table:
        matchers.append(make(_strings(table[key], f"{where}.{key}")))
    if f"{key}_file" in table:
        matchers.append(_list_file(table[f"{key}_file"], make, context, f"{where}.{key}_file"))
    if len(matchers) == 1:
        (matcher,) = matchers
        return lambda exchange: value_of(exchange) in matcher
    if matchers:
        return lambda exchange: any(value_of(exchange) in m for m in matchers)
    return None


def _set_test(table: dict, key: str, pattern: re.Pattern, value_of: Callable, where: str,
              normalize: Callable[[str], str] = str) -> Test | None:
    if key not in table:
        return None
    values = set()
    for item_where, text in _strings(table[key], f"{where}.{key}"):
        if not pattern.fullmatch(normalize(text)):
            raise ConfigError(f"{item_where}: {text!r} is not a valid {key[:-1]}")
        values.add(normalize(text).encode("ascii"))
    return lambda exchange: value_of(exchange) in values


def _minutes(hours: str, minutes: str) -> int:
    return int(hours) * 60 + int(minutes)


def _time_test(table: dict, where: str, reactor) -> Test | None:
    """``time = "HH:MM-HH:MM"`` (local, may wrap past midnight) and ``days``."""
    if "time" not in table and "days" not in table:
        return None
    start, end = 0, 24 * 60
    if "time" in table:
        m = _WINDOW.fullmatch(table["time"]) if isinstance(table["time"], str) else None
        if m:
            start, end = _minutes(m[1], m[2]), _minutes(m[3], m[4])
        if not m or start >= 24 * 60 or end > 24 * 60 or int(m[2]) > 59 or int(m[4]) > 59 or start == end:
            raise ConfigError(f"{where}.time: {table['time']!r} is not a window \"HH:MM-HH:MM\" "
                              f"(00:00 to 24:00, start and end differ)")
    days = set(range(7))
    if "days" in table:
        days = set()
        for item_where, text in _strings(table["days"], f"{where}.days"):
            if text.lower() not in _DAYS:
                raise ConfigError(f"{item_where}: {text!r} is not a day ({', '.join(_DAYS)})")
            days.add(_DAYS.index(text.lower()))

    def test(exchange) -> bool:
        now = time.localtime(reactor.seconds())
        minute = now.tm_hour * 60 + now.tm_min
        inside = start <= minute < end if start < end else (minute >= start or minute < end)
        return inside and now.tm_wday in days

    return test


def _tests(table: dict, where: str, context, group_file: _ListFile | None) -> list[Test]:
    """The rule's conditions as tests of an exchange, cheapest first."""
    tests: list[Test | None] = []
    if "connect" in table:
        connect = _boolean(table["connect"], f"{where}.connect")
        tests.append(lambda exchange: (exchange.request.method == b"CONNECT") is connect)
    tests.append(_set_test(table, "methods", _TOKEN, lambda exchange: exchange.request.method, where))
    tests.append(_set_test(table, "schemes", _SCHEME, lambda exchange: exchange.request.scheme, where,
                           str.lower))
    if "ports" in table:
        ports = _Ports(table["ports"], f"{where}.ports")
        tests.append(lambda exchange: exchange.request.port in ports)
    if "authenticated" in table:
        authenticated = _boolean(table["authenticated"], f"{where}.authenticated")
        tests.append(lambda exchange: (exchange.user is not None) is authenticated)
    if "users" in table:
        users = {text for _, text in _strings(table["users"], f"{where}.users")}
        tests.append(lambda exchange: exchange.user in users)
    if "groups" in table:
        groups = {text for _, text in _strings(table["groups"], f"{where}.groups")}
        if group_file is None:
            raise ConfigError(f"{where}.groups: needs the filter option group_file (the file of groups)")
        tests.append(lambda exchange: not groups.isdisjoint(group_file.current().of(exchange.user)))
    tests.append(_list_test(table, "clients", _Networks, lambda exchange: _client_address(exchange.client_host),
                            where, context))
    tests.append(_list_test(table, "hosts", _Hosts, lambda exchange: _target_host(exchange.request.host),
                            where, context))
    tests.append(_time_test(table, where, context.reactor))
    return [test for test in tests if test is not None]


def _summary(table: dict) -> str:
    """``deny hosts .ads.example.com, *.tracker.*; ports 80``: the rule, shortly."""
    parts = []
    for key, value in table.items():
        if key != "action":
            if isinstance(value, list):
                value = ", ".join(map(str, value[:3])) + (", ..." if len(value) > 3 else "")
            elif isinstance(value, bool):
                value = "true" if value else "false"
            parts.append(f"{key} {value}")
    return f"{table['action']} {'; '.join(parts) if parts else 'every request'}"


# -- the filter -----------------------------------------------------------------

class _Rule:
    """One decision: its tests, whether it allows, and, if it denies, its page."""

    __slots__ = ("name", "tests", "allow", "body", "headers")

    def __init__(self, name: str, tests: list[Test], allow: bool, detail: str, pseudonym: bytes) -> None:
        self.name = name
        self.tests = tuple(tests)
        self.allow = allow
        self.body = f"403 Forbidden: {detail}\n"
        # RFC 9209 §2.1.1: details is a quoted sf-string (printable ASCII).
        quoted = detail.replace("\\", "\\\\").replace('"', '\\"').encode("ascii", "replace")
        self.headers = ((b"Cache-Control", b"no-store"),
                        (b"Proxy-Status", b'%s; error=http_request_denied; details="%s"' % (pseudonym, quoted)))

    def decide(self, exchange) -> Response | None:
        exchange.notes["acl.rule"] = self.name
        return None if self.allow else Response.make(403, self.body, self.headers)


class Acl(Filter):
    """
    Tests the rules in order for every request and CONNECT; the first one
    whose conditions all match allows (``None``) or denies (403), and the
    default decides when none does.  Leaves the deciding rule's name
    (``"rules[1]"`` or ``"default"``) in ``exchange.notes["acl.rule"]``.
    """

    def __init__(self, rules: list[_Rule], default: _Rule) -> None:
        self._rules = tuple(rules)
        self._default = default

    def request_received(self, exchange) -> Response | None:
        for rule in self._rules:
            for test in rule.tests:
                if not test(exchange):
                    break
            else:
                return rule.decide(exchange)
        return self._default.decide(exchange)

    connect_requested = request_received


def _action(value: object, where: str) -> bool:
    if value not in _ACTIONS:
        raise ConfigError(f"{where} must be \"allow\" or \"deny\", not {value!r}")
    return _ACTIONS[value]


@implementer(IPlugin, IFilterFactory)
class AclFactory:
    name = "acl"
    description = "Allow or deny requests by ordered rules (client, host, port, method, user, group, time)"

    def build(self, options: dict, context) -> Acl:
        check_options(options, _OPTIONS)
        pseudonym = context.config.via.encode("ascii")
        tables = options.get("rules", [])
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise ConfigError("rules must be an array of tables ([[filter.rules]])")
        group_file = None
        if "group_file" in options:
            group_file = _list_file(options["group_file"], _Groups, context, "group_file")
        rules = []
        for index, table in enumerate(tables):
            where = f"rules[{index}]"
            unknown = sorted(set(table) - {"action", *_CONDITIONS})
            if unknown:
                raise ConfigError(f"{where}: unknown key {unknown[0]!r} "
                                  f"(expected: action, {', '.join(_CONDITIONS)})")
            allow = _action(table.get("action"), f"{where}.action")
            rules.append(_Rule(where, _tests(table, where, context, group_file), allow,
                               f"Denied by acl {where} ({_summary(table)})", pseudonym))
        allow = _action(options.get("default", "deny"), "default")
        return Acl(rules, _Rule("default", [], allow, "Denied by acl default (no rule matched)", pseudonym))


acl = AclFactory()
