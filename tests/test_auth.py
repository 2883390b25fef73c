"""
The ``auth`` filter (proxyframe/plugins/pf_auth.py): proxy authentication
(RFC 9110 §11.7, 407 §15.5.8) with Basic (RFC 7617) against htpasswd files
or a Squid-style helper, and Digest (RFC 7616) against htdigest files.

A real proxy process, a recording origin and real clients (curl, urllib,
http.client).  A small drop-in plugin (``auth-probe``, written by the tests)
copies ``exchange.user`` into an ``X-Auth-User`` response field so the
client can see whom the proxy authenticated.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from passlib.hash import apr_md5_crypt, bcrypt, sha256_crypt, sha512_crypt
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from proxyframe.config import Config, ConfigError
from proxyframe.exchange import Exchange, Headers, Request
from proxyframe.filters import FilterContext
from proxyframe.interfaces import IFilter
from proxyframe.plugins.pf_auth import Auth
from proxyframe.plugins.pf_auth import auth as auth_factory
from support import ProxyProcess, proxy_config

REALM = "proxy"

PROBE = '''
from twisted.plugin import IPlugin
from zope.interface import implementer
from proxyframe.filters import Filter
from proxyframe.interfaces import IFilterFactory

class Probe(Filter):
    def response_received(self, exchange):
        exchange.response.headers.set(b"X-Auth-User", (exchange.user or "-").encode("utf-8"))

@implementer(IPlugin, IFilterFactory)
class ProbeFactory:
    name = "auth-probe"
    description = "test: shows exchange.user"
    def build(self, options, context):
        return Probe()

probe = ProbeFactory()
'''

# Squid's basic helper protocol: "user password" URL-encoded in, OK/ERR out.
# Each check appends "pid user" to the file named by argv[1].
HELPER = r'''
import os, sys, time, urllib.parse
for line in sys.stdin:
    user, password = (urllib.parse.unquote(part) for part in line.split(" "))
    password = password.rstrip("\n")
    with open(sys.argv[1], "a") as log:
        log.write(f"{os.getpid()} {user}\n")
    if user == "crash":
        sys.exit(3)
    if user == "hang":
        time.sleep(30)
    if user == "slow":
        time.sleep(1)
    print("OK" if (user, password) in {("dave", "right pass%"), ("slow", "pw")} else "ERR no", flush=True)
'''


@pytest.fixture
def auth_proxy(tmp_path):
    """``auth_proxy(top={...}, **auth_options)``: a proxy with [auth-probe, auth]; stopped at teardown."""
    started: list[ProxyProcess] = []
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "pf_test_auth_probe.py").write_text(PROBE)

    def start(top=None, **options) -> ProxyProcess:
        options = {"realm": REALM, **options}
        text = (proxy_config(plugin_paths=["plugins"], **(top or {}))
                + '[[filter]]\nuse = "auth-probe"\n\n[[filter]]\nuse = "auth"\n'
                + "".join(f"{key} = {json.dumps(value)}\n" for key, value in options.items()))
        proc = ProxyProcess(text, tmp_path)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def run_curl(curl: str, proxy: ProxyProcess, url: str, *args: str) -> tuple[int, str]:
    """curl through *proxy*; returns (final status, everything printed with -i)."""
    result = subprocess.run([curl, "-sS", "-i", "--max-time", "20", "-x", proxy.url,
                             "-w", "\n%{http_code} %{http_connect}", *args, url],
                            capture_output=True, text=True, timeout=30)
    out, _, codes = result.stdout.rpartition("\n")
    code, connect = (int(c) for c in codes.split())
    return (code or connect), out


def ha1(algorithm: str, user: str, realm: str, password: str) -> str:
    h = hashlib.sha256 if algorithm == "SHA-256" else hashlib.md5
    return h(f"{user}:{realm}:{password}".encode()).hexdigest()


def write_htdigest(path, *lines: tuple[str, str, str]) -> None:
    """(algorithm, user, password) → ``user:realm:HA1`` lines as htdigest writes them."""
    path.write_text("".join(f"{u}:{REALM}:{ha1(a, u, REALM, p)}\n" for a, u, p in lines))


def challenges(response: http.client.HTTPResponse) -> list[str]:
    return response.headers.get_all("Proxy-Authenticate") or []


def params_of(challenge: str) -> dict[str, str]:
    return {k.lower(): v.strip('"') for k, v in re.findall(r'(\w+)=("[^"]*"|[^\s,]+)', challenge)}


def get(proxy: ProxyProcess, url: str, headers: dict[str, str] | None = None,
        conn: http.client.HTTPConnection | None = None) -> http.client.HTTPResponse:
    """GET *url* through *proxy* (absolute-form) with http.client; the body is read."""
    conn = conn or http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
    conn.request("GET", url, headers=headers or {})
    response = conn.getresponse()
    response.body = response.read()
    return response


def urllib_get(proxy: ProxyProcess, url: str, handler_class, password_uri: str, user: str,
               password: str) -> tuple[int, bytes, str]:
    """GET *url* with urllib through *proxy*, answering 407 with *handler_class*; (status, body, X-Auth-User)."""
    passwords = urllib.request.HTTPPasswordMgrWithDefaultRealm()
    passwords.add_password(None, password_uri, user, password)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url}), handler_class(passwords))
    with opener.open(url, timeout=20) as response:
        return response.status, response.read(), response.headers["X-Auth-User"]


def no_proxy_authorization(origin) -> bool:
    return all("proxy-authorization" not in r.header_names() for r in origin.requests)


# -- challenges -------------------------------------------------------------------

def test_no_credentials_get_407_with_every_challenge(auth_proxy, origin, tmp_path):
    """
    A request without Proxy-Authorization gets 407 with one
    Proxy-Authenticate per offered scheme (RFC 9110 §11.7.1, §15.5.8): a
    Digest challenge per algorithm, SHA-256 first (RFC 7616 §3.7), sharing
    one nonce, then Basic with charset="UTF-8" (RFC 7617 §2.1).  The origin
    sees nothing.
    """
    (tmp_path / "users.htpasswd").write_text(f"alice:{apr_md5_crypt.hash('wonder')}\n")
    write_htdigest(tmp_path / "users.htdigest", ("MD5", "carol", "pw"), ("SHA-256", "carol", "pw"))
    proxy = auth_proxy(htpasswd_file="users.htpasswd", digest_file="users.htdigest")
    response = get(proxy, origin.url("/x"))
    assert response.status == 407
    assert response.body == b"Proxy authentication required\n"
    sha, md5, basic = challenges(response)
    assert sha.startswith("Digest ") and md5.startswith("Digest ")
    assert params_of(sha)["algorithm"] == "SHA-256" and params_of(md5)["algorithm"] == "MD5"
    for digest in (sha, md5):
        assert params_of(digest)["realm"] == REALM and params_of(digest)["qop"] == "auth"
        assert "stale" not in params_of(digest)
    assert params_of(sha)["nonce"] == params_of(md5)["nonce"]
    assert basic == f'Basic realm="{REALM}", charset="UTF-8"'
    # An unknown scheme is refused the same way.
    response = get(proxy, origin.url("/x"), {"Proxy-Authorization": "Bearer abc"})
    assert response.status == 407 and len(challenges(response)) == 3
    assert origin.requests == []


# -- Basic --------------------------------------------------------------------------

HASHES = {
    "bcrypt-2y": lambda pw: bcrypt.using(rounds=5, ident="2y").hash(pw),
    "bcrypt-2b": lambda pw: bcrypt.using(rounds=5, ident="2b").hash(pw),
    "sha256-crypt": lambda pw: sha256_crypt.using(rounds=5000).hash(pw),
    "sha512-crypt": lambda pw: sha512_crypt.using(rounds=5000).hash(pw),
    "apr1": apr_md5_crypt.hash,
}


def test_basic_with_each_htpasswd_hash(auth_proxy, origin, tmp_path, curl):
    """
    curl --proxy-user gets through with Basic (RFC 7617) for a user of each
    hash Apache's htpasswd writes ($2y$/$2b$ bcrypt, $5$, $6$, $apr1$);
    exchange.user is the user; Proxy-Authorization never reaches the
    origin; a wrong password for any of them is 407 and is not forwarded.
    """
    (tmp_path / "users.htpasswd").write_text(
        "# users\n" + "".join(f"{name}:{make(f'pw-{name}')}\n" for name, make in HASHES.items()))
    proxy = auth_proxy(htpasswd_file="users.htpasswd")
    for name in HASHES:
        status, out = run_curl(curl, proxy, origin.url(f"/{name}"), "--proxy-user", f"{name}:pw-{name}")
        assert status == 200, (name, out)
        assert out.endswith("hello") and f"X-Auth-User: {name}" in out
    assert [r.target for r in origin.requests] == [f"/{name}" for name in HASHES]
    assert no_proxy_authorization(origin)
    for name in HASHES:
        status, out = run_curl(curl, proxy, origin.url("/wrong"), "--proxy-user", f"{name}:pw-{name}x")
        assert status == 407, (name, out)
        assert f'Proxy-Authenticate: Basic realm="{REALM}"' in out
    assert len(origin.requests) == len(HASHES)


def test_basic_failure_is_logged_without_the_password(auth_proxy, origin, tmp_path, curl):
    """
    A wrong password gets 407 with the Basic challenge, the origin sees
    nothing, and the log line names the user and the client's address but
    never contains the password.
    """
    (tmp_path / "users.htpasswd").write_text(f"alice:{sha512_crypt.hash('wonder')}\n")
    proxy = auth_proxy(htpasswd_file="users.htpasswd")
    status, out = run_curl(curl, proxy, origin.url("/"), "--proxy-user", "alice:Sesame-Guess-42")
    assert status == 407
    assert f'Proxy-Authenticate: Basic realm="{REALM}", charset="UTF-8"' in out
    assert origin.requests == []
    line = proxy.wait_for_line(r"proxy authentication failed for user 'alice' from 127\.0\.0\.1")
    assert "wrong password" in line
    proxy.stop()
    assert not any("Sesame-Guess-42" in line for line in proxy.lines)


def test_basic_with_urllib(auth_proxy, origin, tmp_path):
    """
    urllib's ProxyBasicAuthHandler answers the 407 challenge and gets the
    origin's response; the origin never sees Proxy-Authorization.
    """
    (tmp_path / "users.htpasswd").write_text(f"alice:{HASHES['bcrypt-2y']('wonder')}\n")
    proxy = auth_proxy(htpasswd_file="users.htpasswd")
    handler = urllib.request.ProxyBasicAuthHandler
    assert urllib_get(proxy, origin.url("/u"), handler, f"{proxy.host}:{proxy.port}", "alice", "wonder") \
        == (200, b"hello", "alice")
    assert [r.target for r in origin.requests] == ["/u"]
    assert no_proxy_authorization(origin)


def test_htpasswd_file_is_reloaded_when_it_changes(auth_proxy, origin, tmp_path, curl):
    """
    A user added to the htpasswd file while the proxy runs can log in once
    the proxy has looked at the file again (at most once per second).
    """
    path = tmp_path / "users.htpasswd"
    path.write_text(f"alice:{apr_md5_crypt.hash('wonder')}\n")
    proxy = auth_proxy(htpasswd_file="users.htpasswd")
    assert run_curl(curl, proxy, origin.url("/"), "--proxy-user", "erin:new")[0] == 407
    path.write_text(path.read_text() + f"erin:{apr_md5_crypt.hash('new')}\n")
    deadline = time.monotonic() + 10
    while run_curl(curl, proxy, origin.url("/e"), "--proxy-user", "erin:new")[0] != 200:
        assert time.monotonic() < deadline, "the new htpasswd entry was never loaded"
        time.sleep(0.2)
    proxy.wait_for_line(r"reloaded .*users\.htpasswd \(2 entries\)")
    assert [r.target for r in origin.requests] == ["/e"]


# -- Digest -------------------------------------------------------------------------

def test_digest_sha256_with_curl(auth_proxy, origin, tmp_path, curl):
    """
    curl --proxy-digest answers the SHA-256 challenge (RFC 7616) with a
    digest of the password: 200, exchange.user set, no Proxy-Authorization
    at the origin; with a wrong password, 407 and nothing forwarded.
    """
    write_htdigest(tmp_path / "users.htdigest", ("SHA-256", "carol", "secret"))
    proxy = auth_proxy(digest_file="users.htdigest")
    status, out = run_curl(curl, proxy, origin.url("/d"), "--proxy-digest", "--proxy-user", "carol:secret", "-v")
    assert status == 200, out
    assert "algorithm=SHA-256" in out and "algorithm=MD5" not in out
    assert out.endswith("hello") and "X-Auth-User: carol" in out
    status, out = run_curl(curl, proxy, origin.url("/bad"), "--proxy-digest", "--proxy-user", "carol:guess")
    assert status == 407
    assert [r.target for r in origin.requests] == ["/d"]
    assert no_proxy_authorization(origin)


def test_digest_md5_with_urllib(auth_proxy, origin, tmp_path):
    """
    urllib's ProxyDigestAuthHandler (MD5 only) gets through with an
    htdigest file as Apache's htdigest writes it; the origin never sees
    Proxy-Authorization.
    """
    write_htdigest(tmp_path / "users.htdigest", ("MD5", "carol", "secret"))
    proxy = auth_proxy(digest_file="users.htdigest")
    handler = urllib.request.ProxyDigestAuthHandler
    # urllib looks a proxy Digest password up by the request's URL, not the proxy's.
    assert urllib_get(proxy, origin.url("/m"), handler, origin.url("/"), "carol", "secret") \
        == (200, b"hello", "carol")
    assert [r.target for r in origin.requests] == ["/m"]
    assert no_proxy_authorization(origin)


def test_digest_both_algorithms_with_urllib_needs_md5_first(auth_proxy, origin, tmp_path):
    """
    docs/filters/auth.rst: with SHA-256 and MD5 both offered, urllib's
    ProxyDigestAuthHandler reads only the first challenge, so before Python
    3.14 the default order (SHA-256 first) makes it raise ValueError and
    nothing reaches the origin; ``digest_algorithms = ["MD5", "SHA-256"]``
    lets it in.
    """
    write_htdigest(tmp_path / "users.htdigest", ("MD5", "carol", "secret"), ("SHA-256", "carol", "secret"))
    handler = urllib.request.ProxyDigestAuthHandler
    if sys.version_info < (3, 14):
        proxy = auth_proxy(digest_file="users.htdigest")
        with pytest.raises(ValueError, match="Unsupported digest authentication algorithm 'SHA-256'"):
            urllib_get(proxy, origin.url("/default"), handler, origin.url("/"), "carol", "secret")
        assert origin.requests == []
    proxy = auth_proxy(digest_file="users.htdigest", digest_algorithms=["MD5", "SHA-256"])
    assert urllib_get(proxy, origin.url("/md5-first"), handler, origin.url("/"), "carol", "secret") \
        == (200, b"hello", "carol")
    assert [r.target for r in origin.requests] == ["/md5-first"]


def digest_authorization(challenge: str, method: str, uri: str, nc: int, password: str = "secret") -> str:
    """The Proxy-Authorization a client computes for *challenge* (RFC 7616 §3.4.1, qop=auth)."""
    p = params_of(challenge)
    h = hashlib.sha256 if p["algorithm"] == "SHA-256" else hashlib.md5
    cnonce, nc_value = "0a4f113b", f"{nc:08x}"
    ha2 = h(f"{method}:{uri}".encode()).hexdigest()
    response = h(f"{ha1(p['algorithm'], 'carol', p['realm'], password)}:{p['nonce']}:{nc_value}:{cnonce}:auth:{ha2}"
                 .encode()).hexdigest()
    return (f'Digest username="carol", realm="{p["realm"]}", nonce="{p["nonce"]}", uri="{uri}", '
            f'algorithm={p["algorithm"]}, qop=auth, nc={nc_value}, cnonce="{cnonce}", response="{response}"')


def test_digest_replay_is_refused_and_expired_nonce_is_stale(auth_proxy, origin, tmp_path):
    """
    RFC 7616 §3.3, §5.3: a nonce-count must grow for each use of a nonce,
    so a replayed request (same nc) gets 407 and is not forwarded; a higher
    nc goes through.  Once the nonce is older than nonce_ttl, even correct
    credentials get 407 with stale=true (and a fresh nonce, which works);
    so does a nonce the proxy never issued.  A wrong password is never
    "stale".
    """
    write_htdigest(tmp_path / "users.htdigest", ("SHA-256", "carol", "secret"))
    nonce_ttl = 3
    proxy = auth_proxy(digest_file="users.htdigest", nonce_ttl=nonce_ttl)
    url = origin.url("/r")
    first = get(proxy, url)
    issued = time.monotonic()
    (challenge,) = challenges(first)
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
    assert get(proxy, url, {"Proxy-Authorization": digest_authorization(challenge, "GET", url, 1)}, conn).status == 200
    replay = get(proxy, url, {"Proxy-Authorization": digest_authorization(challenge, "GET", url, 1)}, conn)
    assert replay.status == 407
    assert get(proxy, url, {"Proxy-Authorization": digest_authorization(challenge, "GET", url, 2)}, conn).status == 200
    assert len(origin.requests) == 2
    # A wrong password with a live nonce is not "stale".
    wrong = get(proxy, url, {"Proxy-Authorization": digest_authorization(challenge, "GET", url, 3, "guess")}, conn)
    assert wrong.status == 407 and "stale" not in params_of(challenges(wrong)[0])
    # The right password with a nonce the proxy never issued: stale, not forwarded.
    forged = challenge.replace(params_of(challenge)["nonce"], "bm90LWlzc3VlZC1oZXJl")
    unknown = get(proxy, url, {"Proxy-Authorization": digest_authorization(forged, "GET", url, 1)}, conn)
    assert unknown.status == 407 and params_of(challenges(unknown)[0])["stale"] == "true"
    # The nonce expires: no event to wait for but time itself.
    time.sleep(max(0.0, issued + nonce_ttl + 0.2 - time.monotonic()))
    expired = get(proxy, url, {"Proxy-Authorization": digest_authorization(challenge, "GET", url, 4)}, conn)
    assert expired.status == 407
    (fresh,) = challenges(expired)
    assert params_of(fresh)["stale"] == "true"
    assert params_of(fresh)["nonce"] != params_of(challenge)["nonce"]
    assert get(proxy, url, {"Proxy-Authorization": digest_authorization(fresh, "GET", url, 1)}, conn).status == 200
    assert len(origin.requests) == 3
    assert no_proxy_authorization(origin)


# -- CONNECT ------------------------------------------------------------------------

def test_connect_requires_auth(auth_proxy, tls_origin, tmp_path, curl):
    """
    CONNECT needs credentials too (RFC 9110 §9.3.6, §15.5.8): without them
    the tunnel is refused with 407 and the origin sees no connection; with
    Basic or Digest the tunnel opens and curl gets the origin's response.
    """
    (tmp_path / "users.htpasswd").write_text(f"alice:{sha256_crypt.hash('wonder')}\n")
    write_htdigest(tmp_path / "users.htdigest", ("MD5", "carol", "secret"), ("SHA-256", "carol", "secret"))
    proxy = auth_proxy(top={"connect_ports": [tls_origin.port]}, htpasswd_file="users.htpasswd",
                       digest_file="users.htdigest")
    url = f"https://127.0.0.1:{tls_origin.port}/t"
    status, out = run_curl(curl, proxy, url, "-k")
    assert status == 407, out
    assert 'Proxy-Authenticate: Basic realm="proxy"' in out and "algorithm=SHA-256" in out
    assert tls_origin.connections == 0
    status, out = run_curl(curl, proxy, url, "-k", "--proxy-user", "alice:wrong")
    assert status == 407 and tls_origin.connections == 0
    assert run_curl(curl, proxy, url, "-k", "--proxy-user", "alice:wonder")[0] == 200
    assert run_curl(curl, proxy, url, "-k", "--proxy-digest", "--proxy-user", "carol:secret")[0] == 200
    assert [r.target for r in tls_origin.requests] == ["/t", "/t"]
    assert no_proxy_authorization(tls_origin)


# -- helper ---------------------------------------------------------------------------

@pytest.fixture
def helper(tmp_path):
    """(argv, log path): the helper script above, run by this interpreter."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "helper.py"
    script.write_text(HELPER)
    log = tmp_path / "helper.log"
    return [sys.executable, str(script), str(log)], log


def helper_calls(log) -> list[tuple[str, str]]:
    return [tuple(line.split(" ", 1)) for line in log.read_text().splitlines()] if log.exists() else []


def test_helper_ok_err_and_cache(auth_proxy, origin, helper, curl):
    """
    With a helper, Basic credentials are checked by the helper (Squid's
    protocol: URL-encoded "user password" lines, OK/ERR answers): OK lets
    the request through, ERR is 407.  A second request with the same
    credentials within cache_ttl is answered from the cache, as the same
    user: the helper is not asked again; a failure is never cached.
    """
    argv, log = helper
    proxy = auth_proxy(helper=argv, cache_ttl=300)
    good = ("--proxy-user", "dave:right pass%")
    status, out = run_curl(curl, proxy, origin.url("/1"), *good)
    assert status == 200 and "X-Auth-User: dave" in out
    status, out = run_curl(curl, proxy, origin.url("/2"), *good)
    assert status == 200 and "X-Auth-User: dave" in out
    assert [user for _, user in helper_calls(log)] == ["dave"]
    assert run_curl(curl, proxy, origin.url("/3"), "--proxy-user", "dave:wrong")[0] == 407
    assert run_curl(curl, proxy, origin.url("/4"), "--proxy-user", "dave:wrong")[0] == 407
    assert run_curl(curl, proxy, origin.url("/5"), *good)[0] == 200
    assert [user for _, user in helper_calls(log)] == ["dave", "dave", "dave"]
    assert len({pid for pid, _ in helper_calls(log)}) == 1
    assert [r.target for r in origin.requests] == ["/1", "/2", "/5"]
    assert no_proxy_authorization(origin)


def test_cache_hits_keep_each_user_apart_on_one_connection(auth_proxy, origin, helper):
    """
    Two users' cached successes, used in turn on one persistent connection
    (as a downstream proxy would): each request is let through as its own
    user, and wrong credentials on that connection still get 407.
    """
    argv, log = helper
    proxy = auth_proxy(helper=argv, cache_ttl=300)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)

    def fetch(credentials: str, path: str) -> tuple[int, str | None]:
        token = base64.b64encode(credentials.encode()).decode()
        conn.request("GET", origin.url(path), headers={"Proxy-Authorization": f"Basic {token}"})
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("X-Auth-User")

    try:
        for round_ in range(3):
            assert fetch("dave:right pass%", f"/d{round_}") == (200, "dave")
            assert fetch("slow:pw", f"/s{round_}") == (200, "slow")
            assert fetch("dave:pw", f"/x{round_}")[0] == 407
    finally:
        conn.close()
    assert sorted(user for _, user in helper_calls(log)) == ["dave"] * 4 + ["slow"]
    assert [r.target for r in origin.requests] == ["/d0", "/s0", "/d1", "/s1", "/d2", "/s2"]


def test_cached_success_expires_after_cache_ttl(auth_proxy, origin, helper, curl):
    """
    A success is remembered for cache_ttl seconds, no longer: after that the
    same credentials are checked again (the helper is asked a second time).
    """
    argv, log = helper
    proxy = auth_proxy(helper=argv, cache_ttl=1)
    good = ("--proxy-user", "dave:right pass%")
    assert run_curl(curl, proxy, origin.url("/1"), *good)[0] == 200
    checked = time.monotonic()
    assert run_curl(curl, proxy, origin.url("/2"), *good)[0] == 200
    assert len(helper_calls(log)) == 1
    time.sleep(max(0.0, checked + 1.2 - time.monotonic()))
    status, out = run_curl(curl, proxy, origin.url("/3"), *good)
    assert status == 200 and "X-Auth-User: dave" in out
    assert [user for _, user in helper_calls(log)] == ["dave", "dave"]


def test_the_cache_holds_no_credentials():
    """
    The cache of successful Basic checks keeps neither the password nor the
    credentials as sent (base64 is not a secret): its keys are MACs under a
    per-process key.  Entries expire cache_ttl seconds after the check.
    """
    clock = Clock()
    checks = []

    def check(user: bytes, password: bytes):
        checks.append(user)
        return succeed(True)

    auth = Auth(clock, REALM, ["basic"], check, None, [], cache_ttl=10, nonce_ttl=60)
    token = base64.b64encode(b"erin:s3cret-pass")

    def request() -> Exchange:
        """One request with the credentials; :returns: its exchange, once the filter let it through."""
        exchange = Exchange("127.0.0.1:5000", "127.0.0.1", Request(
            b"GET", b"http://example.com/", b"1.1", Headers([(b"Proxy-Authorization", b"Basic " + token)])), 0.0)
        answers = []
        result = auth.request_received(exchange)
        if isinstance(result, Deferred):
            result.addBoth(answers.append)
        else:
            answers.append(result)
        assert answers == [None] and exchange.user == "erin"
        return exchange

    request()
    request()
    assert checks == [b"erin"]
    stored = repr(auth._cache._entries)
    assert len(auth._cache._entries) == 1
    assert "s3cret" not in stored and token.decode() not in stored and repr(token) not in stored
    clock.advance(9.9)
    request()
    assert checks == [b"erin"]
    clock.advance(0.1)
    request()
    assert checks == [b"erin", b"erin"]


def test_a_check_that_raises_fails_only_its_request():
    """
    A Basic check that raises (instead of failing its Deferred) fails that
    request, and leaves no check in progress behind: the next request with
    the same credentials gets a check of its own.
    """
    outcomes = [RuntimeError("backend down"), True]

    def check(user: bytes, password: bytes):
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return succeed(outcome)

    auth = Auth(Clock(), REALM, ["basic"], check, None, [], cache_ttl=10, nonce_ttl=60)
    header = b"Basic " + base64.b64encode(b"erin:pw")
    results = []
    for _ in range(2):
        exchange = Exchange("127.0.0.1:5000", "127.0.0.1", Request(
            b"GET", b"http://example.com/", b"1.1", Headers([(b"Proxy-Authorization", header)])), 0.0)
        auth.request_received(exchange).addBoth(results.append)
    assert isinstance(results[0], Failure) and results[0].check(RuntimeError)
    assert results[1:] == [None] and outcomes == []


def test_concurrent_requests_with_the_same_credentials_share_one_check(auth_proxy, origin, helper):
    """
    Ten requests with the same new credentials at once (as when a cached
    success expires under load): one check runs (the helper is asked once)
    and all ten are answered by it; wrong credentials in parallel are all
    refused, by their own single check.
    """
    argv, log = helper
    proxy = auth_proxy(helper=argv, cache_ttl=300)
    results: list[int] = []

    def fetch(credentials: str) -> None:
        token = base64.b64encode(credentials.encode()).decode()
        results.append(get(proxy, origin.url("/c"), {"Proxy-Authorization": f"Basic {token}"}).status)

    threads = [threading.Thread(target=fetch, args=("slow:pw",)) for _ in range(10)]
    threads += [threading.Thread(target=fetch, args=("slow:bad",)) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results) == [200] * 10 + [407] * 5
    assert sorted(user for _, user in helper_calls(log)) == ["slow", "slow"]


def test_helper_restarted_after_death_and_timeout(auth_proxy, origin, helper, curl):
    """
    A helper that dies fails the check in progress (500, not a 407 "wrong
    password") and is started again for the next check; so is one that
    does not answer within helper_timeout, which is killed.
    """
    argv, log = helper
    proxy = auth_proxy(helper=argv, helper_timeout=1, cache_ttl=0)
    good = ("--proxy-user", "dave:right pass%")
    assert run_curl(curl, proxy, origin.url("/1"), *good)[0] == 200
    assert run_curl(curl, proxy, origin.url("/x"), "--proxy-user", "crash:x")[0] == 500
    assert run_curl(curl, proxy, origin.url("/2"), *good)[0] == 200
    assert run_curl(curl, proxy, origin.url("/y"), "--proxy-user", "hang:x")[0] == 500
    proxy.wait_for_line(r"auth helper \d+ did not answer in time")
    assert run_curl(curl, proxy, origin.url("/3"), *good)[0] == 200
    calls = helper_calls(log)
    assert [user for _, user in calls] == ["dave", "crash", "dave", "hang", "dave"]
    pids = [pid for pid, _ in calls]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]
    assert [r.target for r in origin.requests] == ["/1", "/2", "/3"]


# -- configuration --------------------------------------------------------------------

@pytest.mark.parametrize(("options", "message"), [
    ({"htpasswd_file": "users.htpasswd", "colour": "red"}, "unknown option 'colour'"),
    ({}, "no credentials"),
    ({"htpasswd_file": "missing.htpasswd"}, "htpasswd_file: cannot read"),
    ({"digest_file": "missing.htdigest"}, "digest_file: cannot read"),
    ({"htpasswd_file": "bad.htpasswd"}, "htpasswd_file: .*line 2: user 'bob': unsupported hash"),
    ({"digest_file": "users.htpasswd"}, "digest_file: .*line 1: not 'user:realm:HA1'"),
    ({"htpasswd_file": "users.htpasswd", "schemes": ["digest"]}, "schemes: 'digest' needs digest_file"),
    ({"htpasswd_file": "users.htpasswd", "schemes": ["basic", "ntlm"]}, "schemes: unknown value 'ntlm'"),
    ({"htpasswd_file": "users.htpasswd", "digest_algorithms": ["MD5"]}, "digest_algorithms needs digest_file"),
    ({"digest_file": "users.htdigest", "digest_algorithms": ["SHA-1"]}, "digest_algorithms: unknown value"),
    ({"htpasswd_file": "users.htpasswd", "helper": ["true"]}, "set only one"),
    ({"helper": ["/nonexistent/helper"]}, "helper: '/nonexistent/helper' is not an executable"),
    ({"helper": "/bin/true"}, "helper must be a non-empty list"),
    ({"htpasswd_file": "users.htpasswd", "cache_ttl": -1}, "cache_ttl must be a number"),
    ({"htpasswd_file": "users.htpasswd", "nonce_ttl": 0}, "nonce_ttl must be a number"),
    ({"htpasswd_file": "users.htpasswd", "helper_timeout": "5"}, "helper_timeout must be a number"),
    ({"htpasswd_file": "users.htpasswd", "realm": 'a"b'}, "realm must be"),
])
def test_build_rejects_bad_options(tmp_path, options, message):
    """Every option is checked at start: a bad one is a ConfigError naming it."""
    (tmp_path / "users.htpasswd").write_text(f"alice:{apr_md5_crypt.hash('x')}\n")
    sha1 = "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g="  # htpasswd -s: not accepted
    (tmp_path / "bad.htpasswd").write_text(f"alice:{apr_md5_crypt.hash('x')}\nbob:{sha1}\n")
    write_htdigest(tmp_path / "users.htdigest", ("MD5", "carol", "x"))
    with pytest.raises(ConfigError, match=message):
        auth_factory.build(options, FilterContext(reactor, Config(), tmp_path, 0))


def test_build_accepts_a_full_config(tmp_path):
    """Every option at once builds an IFilter provider."""
    (tmp_path / "users.htdigest").write_text(f"carol:{REALM}:{ha1('MD5', 'carol', REALM, 'x')}\n")
    options = {"realm": REALM, "schemes": ["digest", "basic"], "helper": ["cat"], "helper_timeout": 2,
               "digest_file": "users.htdigest", "digest_algorithms": ["SHA-256", "MD5"], "cache_ttl": 0,
               "nonce_ttl": 60}
    verifyObject(IFilter, auth_factory.build(options, FilterContext(reactor, Config(), tmp_path, 0)))
