"""
Where the ``cache`` filter keeps stored responses: the :class:`ICacheStore`
contract every backend meets, the byte encoding that the disk and Redis
backends share, and the in-memory backend, :class:`MemoryStore`.

A store maps a cache key (``str``) to a value: an
:class:`~proxyframe.plugins.pf_cache_rules.Entry` (one stored response) or
a :class:`~proxyframe.plugins.pf_cache_rules.VaryIndex` (the field names
that select among a key's variants, RFC 9111 §4.1).  A store never fails
an exchange: a backend that is down or returns a damaged value answers
"not stored", and logs why.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections import OrderedDict

from twisted.logger import Logger
from zope.interface import Interface, implementer

from proxyframe.plugins.pf_cache_rules import Entry, VaryIndex

__all__ = ()

_log = Logger(namespace="proxyframe.cache")

Value = Entry | VaryIndex


class ICacheStore(Interface):
    """
    A backend of the ``cache`` filter.

    Methods that may need I/O return either their result at once or a
    ``Deferred`` firing with it: the in-memory store answers at once (a
    cache hit then costs no Deferred), the disk and Redis stores answer
    through Deferreds and never block the reactor.  No method's result
    fails: a backend error is logged and reported as a miss (``get``) or
    ignored (``put``, ``delete``), so the proxy keeps serving.
    """

    def get(key):
        """
        :param key: a cache key (``str``).
        :returns: the stored :class:`Entry` or :class:`VaryIndex`, or
            ``None`` (not stored, expired, damaged, or the backend is
            unavailable); or a ``Deferred`` firing with that.
        """

    def put(key, value, ttl):
        """
        Store *value* under *key* for at most *ttl* seconds (``float``),
        replacing what was there.  The store may evict it earlier to stay
        within its bounds.

        :returns: ``None`` or a ``Deferred`` firing with ``None`` once done.
        """

    def delete(key):
        """
        Remove *key* (nothing happens when it is absent).

        :returns: ``None`` or a ``Deferred`` firing with ``None`` once done.
        """

    def stats():
        """
        :returns: counters (``dict[str, int]``): ``lookups``, ``found``,
            ``stored``, ``evictions``, ``errors``, and where the backend
            knows them ``entries`` and ``bytes``.
        """

    def close():
        """
        Release the backend (connections, files) at shutdown.

        :returns: ``None`` or a ``Deferred`` firing when done.
        """


class LogLimiter:
    """
    Says whether an error of some kind should be logged now: at most once
    per *interval* seconds per kind, so that a backend that is down logs a
    line a minute, not one per request.

    :param clock: ``() -> float``, seconds (the reactor's ``seconds``).
    :param interval: seconds between two lines about one kind of error.
    """

    def __init__(self, clock, interval: float = 60.0) -> None:
        self.interval = interval
        self._clock = clock
        self._last: dict[object, float] = {}

    def allows(self, kind: object) -> bool:
        """:returns: whether to log an error of *kind* (any hashable) now."""
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            return False
        self._last[kind] = now
        return True


# -- the byte encoding (disk, Redis) -----------------------------------------------

# "PFC" and a format version, the CRC-32 of what follows, the length of the
# JSON head; then the head and the body.  The checksum makes a value torn
# by a crash, a full disk or a bad network read count as absent instead of
# being served.
_MAGIC = b"PFC1"
_PREFIX = struct.Struct("!4sII")


def _text(value: bytes) -> str:
    return value.decode("latin-1")


def _bytes(value: str) -> bytes:
    return value.encode("latin-1")


def encode_value(value: Value) -> bytes:
    """
    :returns: *value* as bytes for a backend that stores bytes.
    """
    if isinstance(value, VaryIndex):
        head = {"vary": [_text(n) for n in value.vary]}
        body = b""
    else:
        head = {
            "status": value.status,
            "reason": _text(value.reason),
            "headers": [[_text(n), _text(v)] for n, v in value.headers],
            "request_time": value.request_time,
            "response_time": value.response_time,
            "initial_age": value.initial_age,
            "lifetime": value.lifetime,
            "directives": {_text(k): None if v is None else _text(v) for k, v in value.directives.items()},
            "vary": [_text(n) for n in value.vary],
            "entry": True,
        }
        body = value.body
    encoded = json.dumps(head, separators=(",", ":")).encode("ascii")
    crc = zlib.crc32(body, zlib.crc32(encoded))
    return b"".join((_PREFIX.pack(_MAGIC, crc, len(encoded)), encoded, body))


def decode_value(data: bytes) -> Value:
    """
    :returns: the value :func:`encode_value` made.
    :raises ValueError: *data* is not such a value, or is damaged.
    """
    if len(data) < _PREFIX.size:
        raise ValueError("truncated stored value")
    magic, crc, head_length = _PREFIX.unpack_from(data)
    if magic != _MAGIC:
        raise ValueError("not a stored value of this format")
    view = memoryview(data)
    encoded = view[_PREFIX.size:_PREFIX.size + head_length]
    body = view[_PREFIX.size + head_length:]
    if zlib.crc32(body, zlib.crc32(encoded)) != crc:
        raise ValueError("stored value fails its checksum")
    head = json.loads(bytes(encoded))
    if not head.get("entry"):
        return VaryIndex(tuple(_bytes(n) for n in head["vary"]))
    return Entry(
        status=head["status"],
        reason=_bytes(head["reason"]),
        headers=[(_bytes(n), _bytes(v)) for n, v in head["headers"]],
        body=bytes(body),
        request_time=head["request_time"],
        response_time=head["response_time"],
        initial_age=head["initial_age"],
        lifetime=head["lifetime"],
        directives={_bytes(k): None if v is None else _bytes(v) for k, v in head["directives"].items()},
        vary=tuple(_bytes(n) for n in head["vary"]),
    )


# -- memory ---------------------------------------------------------------------------

@implementer(ICacheStore)
class MemoryStore:
    """
    Values in this process's memory, at most *max_bytes* in all (as
    counted by their ``size``), the least recently used evicted first.
    Every method answers at once.  Each process (worker) has its own.

    :param max_bytes: the bound on stored bytes (``int``).
    :param clock: ``() -> float``, seconds (the reactor's ``seconds``).
    """

    def __init__(self, max_bytes: int, clock) -> None:
        self._max_bytes = max_bytes
        self._clock = clock
        # key -> (value, size, expires), least recently used first.
        self._items: OrderedDict[str, tuple[Value, int, float]] = OrderedDict()
        self._bytes = 0
        self._counts = {"lookups": 0, "found": 0, "stored": 0, "evictions": 0, "errors": 0}

    def get(self, key: str) -> Value | None:
        self._counts["lookups"] += 1
        item = self._items.get(key)
        if item is None:
            return None
        if item[2] <= self._clock():
            self._remove(key)
            return None
        self._items.move_to_end(key)
        self._counts["found"] += 1
        return item[0]

    def put(self, key: str, value: Value, ttl: float) -> None:
        size = value.size + len(key)
        if key in self._items:
            self._remove(key)
        if size > self._max_bytes or ttl <= 0:
            return
        while self._bytes + size > self._max_bytes:
            self._remove(next(iter(self._items)))
            self._counts["evictions"] += 1
        self._items[key] = (value, size, self._clock() + ttl)
        self._bytes += size
        self._counts["stored"] += 1

    def delete(self, key: str) -> None:
        if key in self._items:
            self._remove(key)

    def _remove(self, key: str) -> None:
        _, size, _ = self._items.pop(key)
        self._bytes -= size

    def stats(self) -> dict[str, int]:
        return dict(self._counts, entries=len(self._items), bytes=self._bytes)

    def close(self) -> None:
        self._items.clear()
        self._bytes = 0
