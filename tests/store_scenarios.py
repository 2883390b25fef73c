"""
Scenarios for ``test_cache_stores.py``: each opens a real cache store on a
real reactor (``task.react``), drives it only through ``ICacheStore``, and
prints one ``RESULT <json>`` line for the test to assert on::

    python tests/store_scenarios.py SCENARIO SPEC_JSON

*SPEC_JSON* names the store: ``{"backend": "memory" | "disk" | "redis",
"max_bytes": int, "directory": str, "url": str, "prefix": str,
"timeout": float}`` plus what a scenario needs (``start``).  A scenario
that needs the test to act (stop Redis, ...) prints ``ASK <request>`` and
waits for a line on stdin.  The ``proxyframe.cache`` log lines are in the
result as ``logs``; every log line also goes to stderr.

Also used by the tests directly: :func:`sample_entry`, :func:`describe`
and :class:`RawRedis`.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from pathlib import Path

from twisted.internet import defer, task, threads
from twisted.logger import formatEvent, globalLogBeginner
from zope.interface.verify import verifyObject

from proxyframe.plugins.pf_cache_rules import Entry, VaryIndex
from proxyframe.plugins.pf_cache_store import ICacheStore, MemoryStore, decode_value, encode_value
from redistools import RawRedis

# -- values --------------------------------------------------------------------------


def sample_entry(body: bytes, status: int = 203) -> Entry:
    """An entry using every field, with bytes a codec could get wrong."""
    return Entry(
        status=status,
        reason=b"Non-Authoritative caf\xe9",
        headers=[(b"Content-Type", b"application/octet-stream"), (b"X-Latin-1", b"caf\xe9 \x80\xff"),
                 (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"),
                 (b"X-Body-SHA256", hashlib.sha256(body).hexdigest().encode("ascii"))],
        body=body,
        request_time=1712345678.123456,
        response_time=1712345678.987654321,
        initial_age=0.1 + 0.2,
        lifetime=86400.000001,
        directives={b"max-age": b"60", b"no-transform": None, b"private": b"set-cookie, x-y"},
        vary=(b"accept-encoding", b"x-variant"),
    )


def random_body(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def utf8_index() -> VaryIndex:
    """
    A VaryIndex whose whole encoding (checksum included) is valid UTF-8: a
    client that decodes replies as text would hand it back as a ``str``.
    """
    for n in range(10_000):
        index = VaryIndex((f"x-{n}".encode("ascii"),))
        try:
            encode_value(index).decode("utf-8")
        except UnicodeDecodeError:
            continue
        return index
    raise AssertionError("no such VaryIndex")


def describe(value: Entry | VaryIndex | None) -> dict | None:
    """*value* as JSON-able data: every field, the body by length and SHA-256."""
    if value is None:
        return None
    if isinstance(value, VaryIndex):
        return {"type": "VaryIndex", "vary": [n.decode("latin-1") for n in value.vary]}
    return {
        "type": "Entry",
        "status": value.status,
        "reason": value.reason.decode("latin-1"),
        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in value.headers],
        "body_length": len(value.body),
        "body_sha256": hashlib.sha256(value.body).hexdigest(),
        "request_time": value.request_time,
        "response_time": value.response_time,
        "initial_age": value.initial_age,
        "lifetime": value.lifetime,
        "directives": {k.decode("latin-1"): None if v is None else v.decode("latin-1")
                       for k, v in value.directives.items()},
        "vary": [n.decode("latin-1") for n in value.vary],
    }


def redis_key(prefix: str, key: str) -> bytes:
    """The Redis key :class:`RedisStore` uses for cache key *key*."""
    return (prefix + hashlib.sha256(key.encode("utf-8")).hexdigest()).encode("utf-8")


# -- the harness ------------------------------------------------------------------------


class Harness:
    """Opens the store a spec names and stands between the scenario and the test."""

    def __init__(self, reactor, spec: dict) -> None:
        self.reactor = reactor
        self.spec = spec
        self.backend = spec["backend"]
        self.clock = task.Clock()  # the memory store's clock
        self.logs: list[str] = []
        self._baseline: dict[str, int] = {}
        globalLogBeginner.beginLoggingTo([self._observe], redirectStandardIO=False)

    def _observe(self, event: dict) -> None:
        text = formatEvent(event)
        if event.get("log_failure") is not None:
            text += "\n" + event["log_failure"].getTraceback()
        sys.stderr.write(f"[{event.get('log_namespace')}#{event['log_level'].name}] {text}\n")
        if event.get("log_namespace") == "proxyframe.cache":
            self.logs.append(f"{event['log_level'].name}: {text}")

    async def open(self):
        """The store, ready for use (for Redis: once a round trip works)."""
        if self.backend == "memory":
            return MemoryStore(self.spec["max_bytes"], self.clock.seconds)
        if self.backend == "disk":
            from proxyframe.plugins.pf_cache_disk import DiskStore
            return DiskStore(Path(self.spec["directory"]), self.spec["max_bytes"], self.reactor)
        from proxyframe.plugins.pf_cache_redis import RedisStore
        store = RedisStore(self.spec["url"], self.spec["prefix"], self.spec["timeout"], self.reactor)
        if await self.until_working(store, 10.0) is None:
            raise RuntimeError("the Redis store never worked")
        await call(store.delete, "probe")
        self._baseline = store.stats()
        return store

    async def until_working(self, store, limit: float) -> float | None:
        """Seconds until a put and a get of a probe work; ``None`` past *limit*."""
        start = time.monotonic()
        probe = VaryIndex((b"probe",))
        while time.monotonic() - start < limit:
            await call(store.put, "probe", probe, 60)
            if await call(store.get, "probe") is not None:
                return time.monotonic() - start
            await task.deferLater(self.reactor, 0.1)
        return None

    def stats(self, store) -> dict[str, int]:
        """The store's counters since :meth:`open` returned."""
        return {k: v - self._baseline.get(k, 0) if k not in ("entries", "bytes") else v
                for k, v in store.stats().items()}

    async def advance(self, seconds: float) -> None:
        """Let *seconds* pass: on the memory store's clock, else in real time."""
        if self.backend == "memory":
            self.clock.advance(seconds)
        else:
            await task.deferLater(self.reactor, seconds)

    async def ask(self, request: str) -> None:
        """Ask the test to do *request*, and wait until it has."""
        print("ASK", request, flush=True)
        await threads.deferToThread(sys.stdin.readline)

    def raw_set(self, key: str, data: bytes) -> None:
        """Write *data* under *key* behind the store's back (disk, Redis)."""
        if self.backend == "disk":
            import diskcache
            with diskcache.Cache(self.spec["directory"]) as cache:
                cache.set(key, data)
        else:
            raw = self._raw_redis()
            raw.command("SET", redis_key(self.spec["prefix"], key), data)
            raw.close()

    def raw_exists(self, key: str) -> bool:
        if self.backend == "disk":
            import diskcache
            with diskcache.Cache(self.spec["directory"]) as cache:
                return key in cache
        raw = self._raw_redis()
        try:
            return raw.command("EXISTS", redis_key(self.spec["prefix"], key)) == 1
        finally:
            raw.close()

    def _raw_redis(self) -> RawRedis:
        return RawRedis(self.spec["port"], self.spec.get("password"), self.spec.get("db", 0))


async def call(method, *args):
    """Call a store method and wait for its result, immediate or a Deferred."""
    result = method(*args)
    if isinstance(result, defer.Deferred):
        result = await result
    return result


# -- scenarios for every backend ---------------------------------------------------------

BIG_BODY = bytes(range(256)) * 400 + b"\r\n\0"
KEY = "http://example.test/caf\u00e9?q=1&r=\u00ff"


async def roundtrip(h: Harness, store) -> dict:
    await call(store.put, KEY, sample_entry(BIG_BODY), 60)
    await call(store.put, KEY + "#index", VaryIndex((b"accept-encoding", b"x-variant")), 60)
    await call(store.put, KEY + "#empty", sample_entry(b"", status=204), 60)
    await call(store.put, KEY + "#utf-8", utf8_index(), 60)
    return {"entry": describe(await call(store.get, KEY)),
            "index": describe(await call(store.get, KEY + "#index")),
            "utf8_index": describe(await call(store.get, KEY + "#utf-8")),
            "empty": describe(await call(store.get, KEY + "#empty")),
            "stats": h.stats(store)}


async def absent(h: Harness, store) -> dict:
    return {"value": describe(await call(store.get, "http://never.stored/")), "stats": h.stats(store)}


async def delete(h: Harness, store) -> dict:
    await call(store.put, "a", sample_entry(b"a"), 60)
    await call(store.put, "b", sample_entry(b"b"), 60)
    await call(store.delete, "a")
    await call(store.delete, "never stored")
    return {"a": describe(await call(store.get, "a")), "b": describe(await call(store.get, "b")),
            "stats": h.stats(store)}


async def expiry(h: Harness, store) -> dict:
    await call(store.put, "short", sample_entry(b"short"), 1.0)
    await call(store.put, "long", sample_entry(b"long"), 60.0)
    before = describe(await call(store.get, "short"))
    await h.advance(1.5)
    return {"before": before, "short": describe(await call(store.get, "short")),
            "long": describe(await call(store.get, "long"))}


async def overwrite(h: Harness, store) -> dict:
    await call(store.put, "k", sample_entry(b"first"), 60)
    await call(store.put, "k", sample_entry(b"second"), 60)
    second = describe(await call(store.get, "k"))
    await call(store.put, "k", sample_entry(b"third"), 0)
    return {"second": second, "after_ttl_0": describe(await call(store.get, "k"))}


async def interface(h: Harness, store) -> dict:
    return {"provides": verifyObject(ICacheStore, store)}


# -- bounded backends (memory, disk) -------------------------------------------------------

async def too_big(h: Harness, store) -> dict:
    bound = h.spec["max_bytes"]
    await call(store.put, "small", sample_entry(b"small"), 60)
    await call(store.put, "big", sample_entry(b"was small"), 60)
    await call(store.put, "big", sample_entry(random_body(bound + 1, 1)), 60)
    return {"big": describe(await call(store.get, "big")), "small": describe(await call(store.get, "small")),
            "stats": h.stats(store)}


async def eviction(h: Harness, store) -> dict:
    count, size = h.spec["count"], h.spec["body_size"]
    for i in range(count):
        await call(store.put, f"k{i}", sample_entry(random_body(size, i)), 60)
    present = {}
    for i in range(count):
        value = await call(store.get, f"k{i}")
        if value is not None:
            present[i] = len(value.body)
    return {"present": present, "stats": h.stats(store)}


# -- backends that store bytes (disk, Redis) ------------------------------------------------

async def damaged(h: Harness, store) -> dict:
    await call(store.put, "garbage", sample_entry(b"x" * 100_000), 60)
    await call(store.put, "flipped", sample_entry(b"y" * 100_000), 60)
    h.raw_set("garbage", b"garbage")
    data = bytearray(encode_value(sample_entry(b"y" * 100_000)))
    data[-5000] ^= 0x01
    h.raw_set("flipped", bytes(data))
    got = {"garbage": describe(await call(store.get, "garbage")),
           "flipped": describe(await call(store.get, "flipped"))}
    # The store deletes a damaged value; Redis may take a moment.
    for _ in range(20):
        left = [k for k in ("garbage", "flipped") if h.raw_exists(k)]
        if not left:
            break
        await task.deferLater(h.reactor, 0.1)
    return {"got": got, "left": left, "stats": h.stats(store), "logs": h.logs}


# -- disk only -----------------------------------------------------------------------------

async def restart(h: Harness, store) -> dict:
    await call(store.put, KEY, sample_entry(BIG_BODY), 60)
    await call(store.put, "small", VaryIndex((b"accept",)), 60)
    await call(store.close)
    reopened = await h.open()
    try:
        return {"entry": describe(await call(reopened.get, KEY)),
                "small": describe(await call(reopened.get, "small")),
                "entries": reopened.stats()["entries"]}
    finally:
        await call(reopened.close)


WRITER_KEYS = 4


async def writer(h: Harness, store) -> dict:
    """Put large values forever (until killed), announcing each."""
    i = h.spec["start"]
    while True:
        entry = sample_entry(random_body(h.spec["body_size"], i))
        print("PUTTING", i, flush=True)
        await call(store.put, f"w{i % WRITER_KEYS}", entry, 3600)
        print("PUT", i, flush=True)
        i += 1


async def check(h: Harness, store) -> dict:
    """What killed writers left: each value absent or whole."""
    import diskcache
    undecodable = 0
    with diskcache.Cache(h.spec["directory"]) as cache:
        for key in list(cache):
            try:
                decode_value(cache.get(key))
            except ValueError:
                undecodable += 1
    values = {}
    for n in range(WRITER_KEYS):
        value = await call(store.get, f"w{n}")
        if value is None:
            values[n] = None
        else:
            claimed = dict(value.headers)[b"X-Body-SHA256"].decode()
            values[n] = "whole" if hashlib.sha256(value.body).hexdigest() == claimed else "wrong body"
    return {"undecodable": undecodable, "values": values, "stats": h.stats(store)}


# -- Redis only ------------------------------------------------------------------------------

async def outage(h: Harness, store) -> dict:
    """Redis stops (or pauses, with ``pause``): calls stay bounded; it comes back by itself."""
    await call(store.put, "k", sample_entry(b"before"), 60)
    await h.ask(h.spec["trouble"])
    timings = []
    results = []
    for i in range(h.spec["calls"]):
        start = time.monotonic()
        results.append(describe(await call(store.get, "k")))
        await call(store.put, f"down{i}", sample_entry(b"down"), 60)
        timings.append(time.monotonic() - start)
    await h.ask("recover")
    recovered = await h.until_working(store, 20.0)
    await call(store.put, "k", sample_entry(b"after"), 60)
    after = describe(await call(store.get, "k"))
    return {"results": results, "timings": timings, "recovered": recovered, "after": after,
            "stats": h.stats(store), "logs": h.logs}


async def unusable(h: Harness, store) -> dict:
    """A store that cannot get in (wrong password): every call answers, none fails."""
    timings, results = [], []
    for _ in range(30):
        start = time.monotonic()
        await call(store.put, "k", sample_entry(b"x"), 60)
        results.append(describe(await call(store.get, "k")))
        timings.append(time.monotonic() - start)
        await task.deferLater(h.reactor, 0.1)
    return {"results": results, "timings": timings, "stats": h.stats(store), "logs": h.logs}


async def wire(h: Harness, store) -> dict:
    """Leave one entry in Redis for the test to look at."""
    await call(store.put, KEY, sample_entry(BIG_BODY), 30)
    return {}


SCENARIOS = {f.__name__: f for f in (roundtrip, absent, delete, expiry, overwrite, interface, too_big, eviction,
                                     damaged, restart, writer, check, outage, unusable, wire)}
#: Scenarios that open the store without waiting for it to work.
_UNREADY = {"unusable"}


async def run(reactor, name: str, spec: dict) -> None:
    h = Harness(reactor, spec)
    if name in _UNREADY:
        from proxyframe.plugins.pf_cache_redis import RedisStore
        store = RedisStore(spec["url"], spec["prefix"], spec["timeout"], reactor)
    else:
        store = await h.open()
    try:
        result = await SCENARIOS[name](h, store)
    finally:
        await call(store.close)
    print("RESULT", json.dumps(result), flush=True)


def main(reactor, name: str, spec: str):
    return defer.ensureDeferred(run(reactor, name, json.loads(spec)))


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
