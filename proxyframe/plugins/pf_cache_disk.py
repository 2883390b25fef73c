"""
The ``cache`` filter's disk store, :class:`DiskStore`: stored responses in
one directory, through diskcache (https://grantjenks.com/docs/diskcache/):
a SQLite index, with values of 32 KiB and more in files of their own.

- **Crash-safe.** diskcache writes a value's file before it commits the
  index row that names it, so a process killed in the middle of a write
  leaves the old value or none, never half of one (at worst an orphan file
  that no row names and that the bound does not count).  Each value also
  carries the CRC of :func:`~proxyframe.plugins.pf_cache_store.encode_value`,
  so one damaged on disk later reads as absent and is deleted.
- **Process-safe.** The workers of ``workers = N`` may share one directory
  (SQLite locking); the bound then holds for all of them together.
- **Non-blocking.** Every diskcache call but the opening runs in the store's
  own thread pool; results come back through ``Deferred`` s.
"""

from __future__ import annotations

import pathlib
import sqlite3

import diskcache
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from proxyframe.config import ConfigError
from proxyframe.plugins.pf_cache_store import ICacheStore, LogLimiter, Value, decode_value, encode_value

__all__ = ()

_log = Logger(namespace="proxyframe.cache")

#: The most threads that run diskcache calls (SQLite and file I/O) at once.
MAX_THREADS = 4
#: Seconds between two log lines about the same kind of error.
LOG_INTERVAL = 60.0
#: What a full disk, missing permissions, a locked or damaged index raise;
#: anything else is a bug and is logged with its traceback.
_BACKEND_ERRORS = (OSError, sqlite3.Error, diskcache.Timeout)


class _DamagedValue(Exception):
    """A stored value failed to decode (and has been deleted)."""


@implementer(ICacheStore)
class DiskStore:
    """
    Values in files under *directory*, at most about *max_bytes* in all
    (diskcache's ``volume()``: the value files and the SQLite index), the
    least recently used evicted first; each expires *ttl* seconds after
    its ``put``.  A value larger than *max_bytes* is not kept.

    ``get``, ``put`` and ``delete`` return ``Deferred`` s that never fail:
    a disk or SQLite error is counted in ``errors``, logged (once per kind
    of error per :data:`LOG_INTERVAL`) and becomes a miss (``get``) or is
    ignored (``put``, ``delete``).  After :meth:`close` they return
    ``None`` and do nothing.

    :param directory: the cache directory (created when missing); several
        processes may share it.
    :param max_bytes: the bound on the directory's size (``int``, bytes).
    :param reactor: the reactor, for the thread pool's results and its
        shutdown (the pool stops during reactor shutdown).
    :raises ConfigError: the directory or its index cannot be opened
        (permissions, not a directory, a damaged SQLite file).
    """

    def __init__(self, directory: pathlib.Path, max_bytes: int, reactor) -> None:
        self._directory = directory
        self._max_bytes = max_bytes
        self._reactor = reactor
        # Opening happens once, before the store serves, and reports a
        # directory that cannot be used as a configuration error.
        try:
            self._cache = diskcache.Cache(str(directory), size_limit=max_bytes,
                                          eviction_policy="least-recently-used")
            entries, volume = len(self._cache), self._cache.volume()
        except _BACKEND_ERRORS as e:
            raise ConfigError(f"cache directory {directory}: cannot be used: {e}") from e
        self._counts = {"lookups": 0, "found": 0, "stored": 0, "evictions": 0, "errors": 0,
                        "entries": entries, "bytes": volume}
        # kind of error -> when it was last logged (reactor seconds)
        self._log_limit = LogLimiter(reactor.seconds, LOG_INTERVAL)
        self._closed = False
        self._pool = ThreadPool(minthreads=1, maxthreads=MAX_THREADS, name="proxyframe-cache-disk")
        self._pool.start()
        self._shutdown_trigger = reactor.addSystemEventTrigger("during", "shutdown", self._shutdown)

    # -- ICacheStore ---------------------------------------------------------------

    def get(self, key: str):
        """
        :returns: a ``Deferred`` firing with the :class:`Entry` or
            :class:`VaryIndex` stored under *key* (``str``), or ``None``
            (absent, expired, damaged, or the disk failed).
        """
        if self._closed:
            return None
        self._counts["lookups"] += 1
        d = deferToThreadPool(self._reactor, self._pool, self._read, key)
        return d.addCallbacks(self._found, self._failed, errbackArgs=("get",))

    def put(self, key: str, value: Value, ttl: float):
        """
        Store *value* under *key* for *ttl* seconds, replacing what was
        there; with *ttl* ≤ 0, or when the encoded value is larger than
        *max_bytes*, only remove what was there.

        :returns: a ``Deferred`` firing with ``None`` once written.
        """
        if self._closed:
            return None
        d = deferToThreadPool(self._reactor, self._pool, self._write, key, value, ttl)
        return d.addCallbacks(self._written, self._failed, errbackArgs=("put",))

    def delete(self, key: str):
        """
        Remove *key* (nothing happens when it is absent).

        :returns: a ``Deferred`` firing with ``None`` once done.
        """
        if self._closed:
            return None
        d = deferToThreadPool(self._reactor, self._pool, self._remove, key)
        return d.addCallbacks(self._written, self._failed, errbackArgs=("delete",))

    def stats(self) -> dict[str, int]:
        """
        :returns: this process's ``lookups``, ``found``, ``stored`` and
            ``errors``; ``entries`` and ``bytes`` of the whole directory (all
            processes) as of this process's last write; ``evictions`` is
            always 0 (diskcache does not report them).  Answers at once.
        """
        return dict(self._counts)

    def close(self) -> None:
        """
        Stop the thread pool (waiting for the calls in progress) and close
        the index.  Later calls do nothing; closing twice is harmless.
        """
        if self._closed:
            return
        self._closed = True
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        self._pool.stop()
        self._cache.close()

    def _shutdown(self) -> None:
        self._shutdown_trigger = None
        self.close()

    # -- in a pool thread ------------------------------------------------------------

    def _read(self, key: str) -> Value | None:
        data = self._cache.get(key)
        if data is None:
            return None
        try:
            if not isinstance(data, bytes):
                raise ValueError(f"a {type(data).__name__} where bytes were stored")
            return decode_value(data)
        except ValueError as e:
            self._cache.delete(key)
            raise _DamagedValue(f"damaged value deleted: {e}") from e

    def _write(self, key: str, value: Value, ttl: float) -> tuple[bool, int, int]:
        data = encode_value(value) if ttl > 0 else None
        if data is not None and len(data) <= self._max_bytes:
            self._cache.set(key, data, expire=ttl)
            stored = True
        else:
            self._cache.delete(key)
            stored = False
        return stored, len(self._cache), self._cache.volume()

    def _remove(self, key: str) -> tuple[bool, int, int]:
        self._cache.delete(key)
        return False, len(self._cache), self._cache.volume()

    # -- back in the reactor thread ----------------------------------------------

    def _found(self, value: Value | None) -> Value | None:
        if value is not None:
            self._counts["found"] += 1
        return value

    def _written(self, result: tuple[bool, int, int]) -> None:
        stored, self._counts["entries"], self._counts["bytes"] = result
        if stored:
            self._counts["stored"] += 1

    def _failed(self, failure: Failure, operation: str) -> None:
        self._counts["errors"] += 1
        error = failure.value
        if not self._log_limit.allows((type(error), getattr(error, "errno", None))):
            return None
        if failure.check(_DamagedValue, *_BACKEND_ERRORS):
            _log.warn("cache disk store {directory}: {operation} failed: {error}"
                      " (repeats of this error are not logged for {interval:.0f} s)",
                      directory=str(self._directory), operation=operation, error=error, interval=LOG_INTERVAL)
        else:
            _log.failure("cache disk store {directory}: {operation} failed", failure=failure,
                         directory=str(self._directory), operation=operation)
        return None
