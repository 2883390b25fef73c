"""
The ``cache`` filter's Redis store, :class:`RedisStore`, through txredisapi
(https://github.com/IlyaSkriblovsky/txredisapi), an asynchronous Redis
client for Twisted.

- **Shared.** One Redis serves every worker of a proxy and every
  proxyframe node that points to it: a response stored by one is a hit
  for all.
- **Bounded by Redis.** Bound its memory with the server's own settings,
  ``maxmemory <bytes>`` and ``maxmemory-policy allkeys-lru`` (under the
  default ``noeviction`` a full Redis refuses writes, which the store
  counts as errors).  Each entry is written with ``SET key value PX ttl``,
  so Redis itself drops it when its time is up.
- **Never in the way.** Every call is bounded by the store's *timeout*;
  while no connection to Redis is up, calls answer "not stored" at once
  instead of waiting for one.  The client reconnects by itself (at most
  :data:`RECONNECT_MAX_DELAY` seconds between attempts), so the store works
  again as soon as Redis is back, with no restart.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from proxyframe.config import ConfigError
from proxyframe.plugins.pf_cache_store import ICacheStore, LogLimiter, Value, decode_value, encode_value

try:
    import txredisapi
except ModuleNotFoundError:
    # The [redis] extra is not installed.  This module must still import:
    # plugin discovery imports every module of proxyframe.plugins.
    txredisapi = None

__all__ = ()

_log = Logger(namespace="proxyframe.cache")

#: The port of a ``redis://`` URL that names none.
DEFAULT_PORT = 6379
#: Connections each store (each worker process) keeps to Redis.
POOL_SIZE = 2
#: The longest wait between two attempts to reconnect, seconds (txredisapi's
#: ``RedisFactory.maxDelay``; the first wait is 1 s).
RECONNECT_MAX_DELAY = 2.0
#: Seconds between two log lines about the same kind of error.
LOG_INTERVAL = 60.0
#: What an unreachable, slow, full or misconfigured Redis causes; anything
#: else is a bug and is logged with its traceback.
_BACKEND_ERRORS = (defer.TimeoutError,) if txredisapi is None else (txredisapi.RedisError, defer.TimeoutError)


class _NotConnected(Exception):
    """No connection to Redis is up."""


class _DamagedValue(Exception):
    """A stored value failed to decode (and is being deleted)."""


@dataclass(frozen=True, slots=True)
class _Server:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None

    def __str__(self) -> str:
        """The URL without its credentials, for logs."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/{self.db}"


def _parse_url(url: str) -> _Server:
    """
    :param url: ``redis://[[user]:password@]host[:port][/db]``.
    :raises ConfigError: naming what is wrong (never quoting the password).
    """
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise ConfigError(f"redis URL: the scheme must be redis://, not {parts.scheme or 'missing'}")
    if not parts.hostname:
        raise ConfigError("redis URL: no host (expected redis://host:port/db)")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ConfigError("redis URL: the port must be a number from 1 to 65535") from None
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ConfigError(f"redis URL: the path must be a database number, not /{path}")
    if parts.query or parts.fragment:
        raise ConfigError("redis URL: options (?...) and fragments (#...) are not supported")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return _Server(parts.hostname, port, int(path or 0), username, password)


@implementer(ICacheStore)
class RedisStore:
    """
    Values in Redis, each under *prefix* followed by the SHA-256 (hex) of
    its cache key, written with ``SET ... PX`` (milliseconds).

    ``get``, ``put`` and ``delete`` return a ``Deferred`` that never fails
    and fires within *timeout* seconds; or, while no connection is up,
    ``None`` at once.  A failure, a timeout or a damaged value is counted in
    ``errors``, logged (with the URL but never the password, once per kind
    of error per :data:`LOG_INTERVAL`) and becomes a miss (``get``) or is
    ignored (``put``, ``delete``).

    :param url: ``redis://[[user]:password@]host[:port][/db]`` (port 6379
        and database 0 by default; user and password percent-encoded).
    :param prefix: prepended to every key (``str``), so that several
        caches, or a cache and other data, can share a database.
    :param timeout: the bound on each call, seconds (``float``); it also
        bounds connecting, and a connection whose reply is that late is
        dropped and made again.
    :param reactor: the reactor, for the connections and the timeouts.
    :raises ConfigError: *url* or *timeout* is not usable.
    """

    def __init__(self, url: str, prefix: str, timeout: float, reactor) -> None:
        if txredisapi is None:
            raise ConfigError("store = \"redis\" needs the Redis client txredisapi, which is not installed: "
                              "pip install 'proxyframe[redis]'")
        self._server = _parse_url(url)
        if not timeout > 0:
            raise ConfigError(f"redis store: the timeout must be more than 0 seconds, not {timeout!r}")
        self._prefix = prefix
        self._timeout = timeout
        self._reactor = reactor
        self._counts = {"lookups": 0, "found": 0, "stored": 0, "evictions": 0, "errors": 0}
        # kind of error -> when it was last logged (reactor seconds)
        self._log_limit = LogLimiter(reactor.seconds, LOG_INTERVAL)
        self._closed = False
        self._connect()

    def _connect(self) -> None:
        """Start a pool of connections that reconnect by themselves."""
        server = self._server
        # charset=None and convertNumbers=False: values come back as the
        # bytes that were stored.  A database of 0 needs no SELECT.  Nothing
        # waits for the connections (the pool is lazy); isLazy=False only
        # keeps txredisapi from logging each refused password itself.
        factory = txredisapi.RedisFactory(
            str(server), server.db or None, POOL_SIZE, isLazy=False, charset=None,
            password=server.password, replyTimeout=self._timeout, convertNumbers=False,
            username=server.username)
        factory.maxDelay = RECONNECT_MAX_DELAY
        # Fails when Redis refuses the password or the database, or does not
        # answer them within the timeout; txredisapi then stops reconnecting
        # (see _send).
        factory.deferred.addErrback(self._log, "cannot use the server", True)
        factory.startConnecting(HostnameEndpoint(self._reactor, server.host, server.port, timeout=self._timeout))
        self._factory = factory
        self._connected_at = self._reactor.seconds()

    def _key(self, key: str) -> bytes:
        return (self._prefix + hashlib.sha256(key.encode("utf-8")).hexdigest()).encode("utf-8")

    # -- ICacheStore ---------------------------------------------------------------

    def get(self, key: str):
        """
        ``GET`` the value stored under *key*; a damaged one is deleted.

        :returns: ``None``, or a ``Deferred`` firing with the :class:`Entry`
            or :class:`VaryIndex` stored under *key*, or ``None`` (absent,
            expired, damaged, or Redis failed).
        """
        self._counts["lookups"] += 1
        redis_key = self._key(key)
        d = self._send("get", "get", redis_key)
        if d is None:
            return None
        return d.addCallback(self._decoded, redis_key).addErrback(self._failed, "get")

    def put(self, key: str, value: Value, ttl: float):
        """
        ``SET`` *value* under *key* with ``PX`` *ttl* (seconds, rounded up
        to milliseconds), replacing what was there; with *ttl* ≤ 0, only
        ``DEL`` what was there.

        :returns: ``None``, or a ``Deferred`` firing with ``None`` once done.
        """
        if ttl <= 0:
            return self.delete(key)
        d = self._send("put", "set", self._key(key), encode_value(value), pexpire=math.ceil(ttl * 1000))
        if d is None:
            return None
        return d.addCallback(self._stored).addErrback(self._failed, "put")

    def delete(self, key: str):
        """
        ``DEL`` *key*.

        :returns: ``None``, or a ``Deferred`` firing with ``None`` once done.
        """
        return self._delete(self._key(key))

    def stats(self) -> dict[str, int]:
        """
        :returns: this process's ``lookups``, ``found``, ``stored`` and
            ``errors``; ``evictions`` is always 0 (Redis evicts on its own,
            see ``INFO stats``: ``evicted_keys``).  Answers at once.
        """
        return dict(self._counts)

    def close(self) -> defer.Deferred:
        """
        Stop reconnecting and close the connections; later calls do nothing.

        :returns: a ``Deferred`` firing with ``None`` once all are closed.
        """
        self._closed = True
        return self._factory.disconnect().addCallback(lambda _: None)

    # -- the calls -------------------------------------------------------------------

    def _send(self, operation: str, command: str, *args, **kwargs) -> defer.Deferred | None:
        """Send *command*, bounded by the timeout; ``None`` when closed or not connected."""
        if self._closed:
            return None
        if self._factory.size == 0:
            # txredisapi gives up for good when the password or the database
            # failed, even by a timeout: start afresh, now and then.
            if self._factory.stopped and self._reactor.seconds() - self._connected_at >= RECONNECT_MAX_DELAY:
                self._factory.disconnect().addErrback(self._log, "closing the connections", False)
                self._connect()
            # Waiting for a connection would only delay the miss.
            self._failed(Failure(_NotConnected("no connection to Redis is up")), operation)
            return None
        d = getattr(self._factory.handler, command)(*args, **kwargs)
        return d.addTimeout(self._timeout, self._reactor)

    def _delete(self, redis_key: bytes) -> defer.Deferred | None:
        d = self._send("delete", "delete", redis_key)
        if d is None:
            return None
        return d.addCallback(lambda _: None).addErrback(self._failed, "delete")

    def _decoded(self, data: bytes | None, redis_key: bytes) -> Value | None:
        if data is None:
            return None
        try:
            value = decode_value(data)
        except ValueError as e:
            self._delete(redis_key)
            raise _DamagedValue(f"damaged value, deleting it: {e}") from e
        self._counts["found"] += 1
        return value

    def _stored(self, reply) -> None:
        self._counts["stored"] += 1

    def _failed(self, failure: Failure, operation: str) -> None:
        self._counts["errors"] += 1
        expected = failure.check(_NotConnected, _DamagedValue, *_BACKEND_ERRORS) is not None
        self._log(failure, f"{operation} failed", expected)

    def _log(self, failure: Failure, what: str, expected: bool) -> None:
        """
        Log *failure* (with its traceback unless *expected*), unless one of
        its kind was logged less than :data:`LOG_INTERVAL` ago.
        """
        if not self._log_limit.allows(type(failure.value)):
            return
        if expected:
            _log.warn("cache redis store {url}: {what}: {error}"
                      " (repeats of this error are not logged for {interval:.0f} s)",
                      url=str(self._server), what=what, error=failure.getErrorMessage(), interval=LOG_INTERVAL)
        else:
            _log.failure("cache redis store {url}: {what}", failure=failure, url=str(self._server), what=what)
