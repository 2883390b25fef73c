"""
``auth``: proxy authentication (RFC 9110 §11.7).  A request or CONNECT
without valid ``Proxy-Authorization`` gets 407 with one
``Proxy-Authenticate`` challenge per offered scheme (§15.5.8); a valid one
sets ``exchange.user`` and goes on.  (The core never forwards
``Proxy-Authorization``.)

Schemes:

- ``basic`` (RFC 7617), checked against an htpasswd file (bcrypt,
  SHA-256/512-crypt, apr1) or an external helper program speaking Squid's
  basic helper protocol;
- ``digest`` (RFC 7616, ``qop=auth``, SHA-256 and MD5), checked against an
  htdigest file of HA1 values, with expiring nonces and replay protection.

::

    [[filter]]
    use = "auth"
    realm = "proxy"
    htpasswd_file = "users.htpasswd"
    digest_file = "users.htdigest"

Password hashing, file reads and helper answers never run on the reactor
thread; successful Basic checks are cached (keyed by a MAC of the
credentials under a random per-process key, never the password itself) for
``cache_ttl`` seconds, so a cache hit answers synchronously.  The options
are described in ``docs/filters/auth.rst``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
import re
import shutil

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from proxyframe.config import ConfigError
from proxyframe.exchange import Response
from proxyframe.filters import Filter, check_options, number_option
from proxyframe.interfaces import IFilterFactory
from proxyframe.plugins.pf_auth_digest import ALGORITHMS, ExpiringMap, Nonces, parse_params, response_value
from proxyframe.plugins.pf_auth_files import CredentialFile, parse_htdigest, parse_htpasswd, verify_password
from proxyframe.plugins.pf_auth_helper import BasicHelper

_log = Logger()

_OPTIONS = ("realm", "schemes", "htpasswd_file", "digest_file", "digest_algorithms", "helper",
            "helper_timeout", "cache_ttl", "nonce_ttl")
_SCHEMES = ("digest", "basic")
_BACKENDS = {"basic": "htpasswd_file or helper", "digest": "digest_file"}
_DIGEST_REQUIRED = (b"username", b"realm", b"nonce", b"uri", b"response", b"qop", b"nc", b"cnonce")
_CACHE_LIMIT = 65536
_NC = re.compile(rb"[0-9a-fA-F]{8}")  # nc = 8LHEX (RFC 7616 §3.4)


class Auth(Filter):
    """
    Demands proxy credentials (see the module docstring).

    :param basic_check: ``(user, password) -> Deferred[bool]``, or ``None``
        when Basic is not offered.
    :param digest_file: the htdigest :class:`CredentialFile`, or ``None``
        when Digest is not offered.
    """

    def __init__(self, reactor, realm: str, schemes: list[str], basic_check, digest_file: CredentialFile | None,
                 algorithms: list[str], cache_ttl: float, nonce_ttl: float) -> None:
        self._reactor = reactor
        self._realm = realm
        self._realm_bytes = realm.encode("ascii")
        self._schemes = schemes
        self._basic_check = basic_check
        self._digest_file = digest_file
        self._algorithms = algorithms
        # Successful Basic checks: MAC of the credentials -> user name.
        self._cache = ExpiringMap(reactor, cache_ttl, _CACHE_LIMIT) if cache_ttl > 0 else None
        self._cache_key = os.urandom(32)
        # Credentials (their cache key) being checked -> the requests waiting.
        self._checking: dict[bytes, list[Deferred]] = {}
        self._nonces = Nonces(reactor, nonce_ttl)

    def request_received(self, exchange):
        values = exchange.request.headers.get_all(b"proxy-authorization")
        if not values:
            return self._challenge()
        scheme, _, credentials = values[0].partition(b" ")
        scheme = scheme.lower()
        if scheme == b"basic" and self._basic_check is not None:
            return self._basic(exchange, credentials.strip())
        if scheme == b"digest" and self._digest_file is not None:
            return self._digest(exchange, credentials)
        return self._refuse(exchange, None, f"scheme {scheme[:20].decode('latin-1')!r} not offered")

    connect_requested = request_received

    # -- answers ------------------------------------------------------------

    def _challenge(self, stale: bool = False) -> Response:
        """
        407 with a challenge per offered scheme, in ``schemes`` order; for
        Digest, one per algorithm with a shared fresh nonce (RFC 7616 §3.7).
        """
        realm = self._realm_bytes
        headers = []
        for scheme in self._schemes:
            if scheme == "basic":
                headers.append(b'Basic realm="%s", charset="UTF-8"' % realm)
                continue
            nonce = self._nonces.issue()
            for algorithm in self._algorithms:
                headers.append(b'Digest realm="%s", qop="auth", algorithm=%s, nonce="%s"%s' % (
                    realm, algorithm.encode("ascii"), nonce, b", stale=true" if stale else b""))
        return Response.make(407, "Proxy authentication required\n",
                             headers=[(b"Proxy-Authenticate", value) for value in headers])

    def _refuse(self, exchange, user: str | None, reason: str) -> Response:
        """Log a failed attempt (user and client, never the password) and challenge again."""
        _log.warn("proxy authentication failed for user {user!r} from {client}: {reason}",
                  user=user, client=exchange.client_host, reason=reason)
        return self._challenge()

    def _accept(self, exchange, user: str) -> None:
        exchange.user = user
        return None

    # -- Basic (RFC 7617) ---------------------------------------------------

    def _basic(self, exchange, token: bytes):
        # The cache key is a MAC of the credentials as sent (keyed BLAKE2s,
        # RFC 7693 §2.9): an entry gives away nothing of the password, and
        # a hit needs neither base64 nor UTF-8 decoding.  One BLAKE2s of a
        # token runs about a quarter of the instructions of
        # hmac.digest(..., "sha256") (OpenSSL looks the digest up and
        # schedules the key on every call).
        key = hashlib.blake2s(token, key=self._cache_key).digest()
        if self._cache is not None:
            name = self._cache.get(key)
            if name is not None:
                exchange.user = name
                return None
        try:
            user, colon, password = base64.b64decode(token, validate=True).partition(b":")
            name = user.decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            colon = b""
        if not colon:
            return self._refuse(exchange, None, "malformed Basic credentials")
        # Requests with the same credentials while a check of them runs wait
        # for that check: when a cached success expires under load, one
        # bcrypt runs, not one per connection.
        # The request waits before the check starts: a check that answers at
        # once (or raises) still reaches it, and leaves nothing behind.
        d = Deferred()
        d.addCallback(self._basic_checked, exchange, name, key)
        waiting = self._checking.get(key)
        if waiting is None:
            self._checking[key] = [d]
            maybeDeferred(self._basic_check, user, password).addBoth(self._basic_done, key)
        else:
            waiting.append(d)
        return d

    def _basic_done(self, result, key: bytes) -> None:
        """The check of *key* is over: hand its result (or failure) to every request that waited."""
        for d in self._checking.pop(key):
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def _basic_checked(self, valid: bool, exchange, name: str, key: bytes):
        if not valid:
            return self._refuse(exchange, name, "wrong password or unknown user")
        if self._cache is not None:
            self._cache.add(key, name)
        return self._accept(exchange, name)

    # -- Digest (RFC 7616) --------------------------------------------------

    def _digest(self, exchange, credentials: bytes):
        params = parse_params(credentials)
        try:
            name = params[b"username"].decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            name = None
        algorithm = params.get(b"algorithm", b"MD5").decode("latin-1")
        if (name is None or any(k not in params for k in _DIGEST_REQUIRED) or params[b"qop"] != b"auth"
                or algorithm not in self._algorithms or not _NC.fullmatch(params[b"nc"])):
            return self._refuse(exchange, name, "malformed Digest credentials")
        if params[b"realm"] != self._realm_bytes:
            return self._refuse(exchange, name, "wrong realm")
        request = exchange.request
        if params[b"uri"] not in (request.target, request.path or request.target):
            # RFC 7616 §3.4.6; curl sends the origin-form, urllib the absolute-form.
            return self._refuse(exchange, name, "uri is not the request-target")
        d = _in_thread(self._reactor, self._digest_file.get, (name, self._realm, algorithm))
        d.addCallback(self._digest_checked, exchange, name, algorithm, params)
        return d

    def _digest_checked(self, ha1: bytes | None, exchange, name: str, algorithm: str, params: dict):
        expected = response_value(algorithm, ha1 or b"", exchange.request.method, params)
        if ha1 is None or not hmac.compare_digest(expected, params[b"response"].lower()):
            return self._refuse(exchange, name, "wrong password or unknown user")
        if not self._nonces.use(params[b"nonce"], int(params[b"nc"], 16)):
            # The password is right, the nonce is not (unknown, expired or
            # replayed): the client may retry with a fresh one (RFC 7616 §3.3).
            return self._challenge(stale=True)
        return self._accept(exchange, name)



def _in_thread(reactor, f, *args):
    """:returns: a ``Deferred`` of ``f(*args)`` run in the reactor's thread pool."""
    return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)


def _check_htpasswd(htpasswd: CredentialFile, user: bytes, password: bytes) -> bool:
    """In a thread: look the user up (reloading the file if it changed) and verify."""
    hashed = htpasswd.get(user.decode("utf-8"))
    return hashed is not None and verify_password(password, hashed)


# -- options ----------------------------------------------------------------

def _strings(options: dict, key: str, default: list[str], allowed: tuple[str, ...] | None = None) -> list[str]:
    value = options.get(key, default)
    if (not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value)
            or len(set(value)) != len(value)):
        raise ConfigError(f"{key} must be a non-empty list of distinct strings, not {value!r}")
    for item in value:
        if allowed is not None and item not in allowed:
            raise ConfigError(f"{key}: unknown value {item!r} (expected: {', '.join(allowed)})")
    return value


def _realm(options: dict) -> str:
    realm = options.get("realm", "proxyframe")
    if not isinstance(realm, str) or not realm or not realm.isascii() or not realm.isprintable() \
            or any(c in realm for c in '"\\'):
        raise ConfigError(f"realm must be printable ASCII without '\"' or '\\', not {realm!r}")
    return realm


def _credential_file(options: dict, key: str, parse, context) -> CredentialFile | None:
    value = options.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a file name, not {value!r}")
    path = context.path(value)
    try:
        return CredentialFile(path, parse)
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {str(path)!r}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"{key}: {str(path)!r}: {e}") from None


def _helper_argv(options: dict, context) -> list[str] | None:
    if "helper" not in options:
        return None
    argv = _strings(options, "helper", [])
    program = str(context.path(argv[0])) if "/" in argv[0] else shutil.which(argv[0])
    if program is None or not os.access(program, os.X_OK) or os.path.isdir(program):
        raise ConfigError(f"helper: {argv[0]!r} is not an executable program")
    return [program, *argv[1:]]


@implementer(IPlugin, IFilterFactory)
class AuthFactory:
    name = "auth"
    description = "Proxy authentication (407): Basic against htpasswd or a helper, Digest against htdigest"

    def build(self, options: dict, context) -> Auth:
        check_options(options, _OPTIONS)
        realm = _realm(options)
        cache_ttl = number_option(options, "cache_ttl", 300.0, unit="seconds")
        nonce_ttl = number_option(options, "nonce_ttl", 300.0, minimum=1.0, unit="seconds")
        helper_timeout = number_option(options, "helper_timeout", 5.0, minimum=0.1, unit="seconds")
        htpasswd = _credential_file(options, "htpasswd_file", parse_htpasswd, context)
        digest_file = _credential_file(options, "digest_file", parse_htdigest, context)
        argv = _helper_argv(options, context)
        if htpasswd is not None and argv is not None:
            raise ConfigError("htpasswd_file and helper both check Basic credentials: set only one")
        backends = {"basic": htpasswd is not None or argv is not None, "digest": digest_file is not None}
        default = [scheme for scheme in _SCHEMES if backends[scheme]]
        if not default:
            raise ConfigError("no credentials to check against: set htpasswd_file, helper or digest_file")
        schemes = _strings(options, "schemes", default, _SCHEMES)
        for scheme in schemes:
            if not backends[scheme]:
                raise ConfigError(f"schemes: {scheme!r} needs {_BACKENDS[scheme]}")
        for scheme in set(default) - set(schemes):
            raise ConfigError(f"{_BACKENDS[scheme]} is set but schemes does not offer {scheme!r}")
        if digest_file is not None:
            present = {algorithm for _, _, algorithm in digest_file.entries}
            algorithms = _strings(options, "digest_algorithms", [a for a in ALGORITHMS if a in present] or ["MD5"],
                                  tuple(ALGORITHMS))
        elif "digest_algorithms" in options:
            raise ConfigError("digest_algorithms needs digest_file")
        else:
            algorithms = []
        reactor = context.reactor
        if argv is not None:
            basic_check = BasicHelper(reactor, argv, helper_timeout).check
        elif htpasswd is not None:
            basic_check = functools.partial(_in_thread, reactor, _check_htpasswd, htpasswd)
        else:
            basic_check = None
        return Auth(reactor, realm, schemes, basic_check, digest_file, algorithms, cache_ttl, nonce_ttl)


auth = AuthFactory()
