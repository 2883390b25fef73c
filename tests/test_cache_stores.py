"""
The cache stores (``ICacheStore``): one suite run against every backend,
memory, disk (diskcache) and Redis (txredisapi against a real
``redis-server`` started per test), then what only some backends promise.

Each scenario runs in its own process on a real reactor
(``store_scenarios.py``) and reports JSON; the assertions are here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from proxyframe.config import ConfigError
from proxyframe.plugins.pf_cache_store import decode_value
from store_scenarios import BIG_BODY, KEY, describe, redis_key, sample_entry, utf8_index

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = Path(__file__).resolve().parent / "store_scenarios.py"
MiB = 1024 * 1024
#: Each Redis call's bound in these tests, seconds, and what a reply may take beyond it.
TIMEOUT = 0.5
SLACK = 0.5


# -- running scenarios ----------------------------------------------------------------


def run_scenario(name: str, spec: dict, tmp_path: Path, on_ask=None, timeout: float = 90) -> dict:
    """Run scenario *name* in a new process; answer its ASK lines with *on_ask*; return its RESULT."""
    stderr_path = tmp_path / f"{name}.stderr"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(SCENARIOS), name, json.dumps(spec)], env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
        result = None
        try:
            for line in proc.stdout:
                if line.startswith("ASK "):
                    on_ask(line[4:].strip())
                    proc.stdin.write("done\n")
                    proc.stdin.flush()
                elif line.startswith("RESULT "):
                    result = json.loads(line[7:])
            proc.wait(timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0 and result is not None, \
        f"scenario {name} failed ({proc.returncode}):\n{stderr_path.read_text()[-5000:]}"
    return result


# -- Redis -------------------------------------------------------------------------------


def redis_spec(server, db: int = 0, password: str | None = None) -> dict:
    """What a store scenario needs to reach *server* (a ``RedisServer``)."""
    password = server.password if password is None else password
    auth = f":{password}@" if password is not None else ""
    return {"backend": "redis", "url": f"redis://{auth}127.0.0.1:{server.port}/{db}", "prefix": "pf-test:",
            "timeout": TIMEOUT, "port": server.port, "password": server.password, "db": db}


# -- the backends ----------------------------------------------------------------------------


def make_spec(backend: str, tmp_path: Path, start_redis, max_bytes: int = 64 * MiB) -> dict:
    if backend == "memory":
        return {"backend": "memory", "max_bytes": max_bytes}
    if backend == "disk":
        return {"backend": "disk", "max_bytes": max_bytes, "directory": str(tmp_path / "cache")}
    return redis_spec(start_redis())


@pytest.fixture(params=["memory", "disk", "redis"])
def backend(request, tmp_path, start_redis) -> dict:
    """Every backend: what ``ICacheStore`` promises."""
    return make_spec(request.param, tmp_path, start_redis)


@pytest.fixture(params=["memory", "disk"])
def bounded(request, tmp_path, start_redis) -> dict:
    """The backends that enforce a size bound themselves (Redis leaves it to ``maxmemory``)."""
    return make_spec(request.param, tmp_path, start_redis, max_bytes=MiB)


@pytest.fixture(params=["disk", "redis"])
def encoded(request, tmp_path, start_redis) -> dict:
    """The backends that hold encoded bytes, which can be damaged."""
    return make_spec(request.param, tmp_path, start_redis)


# -- every backend ---------------------------------------------------------------------------


def test_roundtrip(backend, tmp_path):
    """
    An Entry (body byte for byte, fields, float times, directives, vary) and
    a VaryIndex come back as stored, as bytes even when they are valid UTF-8.
    """
    result = run_scenario("roundtrip", backend, tmp_path)
    assert result["entry"] == describe(sample_entry(BIG_BODY))
    assert result["index"] == {"type": "VaryIndex", "vary": ["accept-encoding", "x-variant"]}
    assert result["empty"] == describe(sample_entry(b"", status=204))
    assert result["utf8_index"] == describe(utf8_index())
    stats = result["stats"]
    assert (stats["lookups"], stats["found"], stats["stored"], stats["errors"]) == (4, 4, 4, 0)


def test_absent(backend, tmp_path):
    """A key never stored reads as None, counted as a lookup that found nothing, not as an error."""
    result = run_scenario("absent", backend, tmp_path)
    assert result["value"] is None
    assert (result["stats"]["lookups"], result["stats"]["found"], result["stats"]["errors"]) == (1, 0, 0)


def test_delete(backend, tmp_path):
    """delete removes its key only; deleting an absent key is harmless."""
    result = run_scenario("delete", backend, tmp_path)
    assert result["a"] is None
    assert result["b"] == describe(sample_entry(b"b"))
    assert result["stats"]["errors"] == 0


def test_expiry(backend, tmp_path):
    """A value is there until its ttl is over, then reads as None; a longer-lived one stays."""
    result = run_scenario("expiry", backend, tmp_path)
    assert result["before"] == describe(sample_entry(b"short"))
    assert result["short"] is None
    assert result["long"] == describe(sample_entry(b"long"))


def test_overwrite(backend, tmp_path):
    """put replaces the value under a key; a put with ttl 0 stores nothing and removes the old value."""
    result = run_scenario("overwrite", backend, tmp_path)
    assert result["second"] == describe(sample_entry(b"second"))
    assert result["after_ttl_0"] is None


def test_provides_interface(backend, tmp_path):
    """The store provides ICacheStore (zope.interface verifyObject)."""
    assert run_scenario("interface", backend, tmp_path) == {"provides": True}


# -- memory and disk: the size bound ---------------------------------------------------------------


def test_too_big_not_kept(bounded, tmp_path):
    """A value larger than the bound is not kept, and the value it was to replace is gone; others stay."""
    result = run_scenario("too_big", bounded, tmp_path)
    assert result["big"] is None
    assert result["small"] == describe(sample_entry(b"small"))
    assert result["stats"]["stored"] == 2


def test_eviction_keeps_under_bound(bounded, tmp_path):
    """Storing three times the bound evicts the least recently used values and keeps the total within it."""
    spec = dict(bounded, count=48, body_size=64 * 1024)
    result = run_scenario("eviction", spec, tmp_path)
    present = {int(k): v for k, v in result["present"].items()}
    assert 0 < len(present) < 48
    assert 47 in present and 0 not in present
    assert sum(present.values()) <= MiB
    assert result["stats"]["bytes"] <= MiB
    assert result["stats"]["entries"] == len(present)


# -- disk and Redis: damaged values ------------------------------------------------------------------


def test_damaged_value_reads_as_none(encoded, tmp_path):
    """A damaged stored value (garbage, or one flipped bit) reads as None, is deleted, counted, and logged once."""
    result = run_scenario("damaged", encoded, tmp_path)
    assert result["got"] == {"garbage": None, "flipped": None}
    assert result["left"] == []
    assert result["stats"]["errors"] == 2
    damaged_logs = [line for line in result["logs"] if "damaged value" in line]
    assert len(damaged_logs) == 1, result["logs"]


# -- disk only -------------------------------------------------------------------------------------


def test_disk_values_survive_restart(tmp_path):
    """Values on disk are there for a new store opened on the same directory."""
    result = run_scenario("restart", make_spec("disk", tmp_path, None), tmp_path)
    assert result["entry"] == describe(sample_entry(BIG_BODY))
    assert result["small"] == {"type": "VaryIndex", "vary": ["accept"]}
    assert result["entries"] == 2


def test_disk_kill_during_put_leaves_no_damaged_value(tmp_path):
    """A process killed (SIGKILL) in the middle of large puts leaves each value whole or absent, never damaged."""
    spec = dict(make_spec("disk", tmp_path, None, max_bytes=512 * MiB), body_size=8 * MiB)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for round_ in range(4):
        target = 2 + 3 * round_
        proc = subprocess.Popen([sys.executable, str(SCENARIOS), "writer", json.dumps(dict(spec, start=10 * round_))],
                                env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            for line in proc.stdout:
                if line.strip() == f"PUTTING {10 * round_ + target}":
                    time.sleep(0.005 * round_)
                    break
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
    result = run_scenario("check", spec, tmp_path)
    assert result["undecodable"] == 0
    assert "wrong body" not in result["values"].values()
    assert list(result["values"].values()).count("whole") >= 2
    assert result["stats"]["errors"] == 0


def test_disk_unusable_directory_is_a_config_error(tmp_path):
    """A cache directory that cannot be created is a ConfigError naming it."""
    from proxyframe.plugins.pf_cache_disk import DiskStore

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="a-file"):
        DiskStore(blocker / "cache", MiB, MemoryReactorClock())


# -- Redis only ------------------------------------------------------------------------------------


def test_redis_wire(start_redis, tmp_path):
    """
    The store writes prefix + sha256(key) in the URL's database (after the
    password), with a PX expiry and the encoded value.
    """
    server = start_redis(password="s3cret")
    run_scenario("wire", redis_spec(server, db=2), tmp_path)
    key = redis_key("pf-test:", KEY)
    raw = server.raw(db=2)
    assert raw.command("EXISTS", key) == 1
    assert 25_000 < raw.command("PTTL", key) <= 30_000
    assert describe(decode_value(raw.command("GET", key))) == describe(sample_entry(BIG_BODY))
    raw.close()
    raw = server.raw(db=0)
    assert raw.command("EXISTS", key) == 0
    raw.close()


def test_redis_down_then_back(start_redis, tmp_path):
    """With Redis stopped, every call answers None within the timeout; restarted on its port, the store works again."""
    server = start_redis(password="s3cret")
    asks = []

    def on_ask(request: str) -> None:
        asks.append(request)
        if request == "stop":
            server.stop()
        elif request == "recover":
            server.start()

    result = run_scenario("outage", dict(redis_spec(server), trouble="stop", calls=10), tmp_path, on_ask)
    assert asks == ["stop", "recover"]
    assert result["results"] == [None] * 10
    assert max(result["timings"]) <= 2 * TIMEOUT + SLACK  # a get and a put
    assert result["recovered"] is not None
    assert result["after"] == describe(sample_entry(b"after"))
    assert result["stats"]["errors"] >= 20
    assert 1 <= len(result["logs"]) <= 3, result["logs"]
    assert not any("s3cret" in line for line in result["logs"])


def test_redis_slow_then_back(start_redis, tmp_path):
    """With Redis not answering (CLIENT PAUSE), a get answers None within the timeout; then the store works again."""
    server = start_redis(password="s3cret")

    def on_ask(request: str) -> None:
        if request == "pause":
            raw = server.raw()
            raw.command("CLIENT", "PAUSE", "2000", "ALL")
            raw.close()

    result = run_scenario("outage", dict(redis_spec(server), trouble="pause", calls=1), tmp_path, on_ask)
    assert result["results"] == [None]
    assert result["timings"][0] <= 2 * TIMEOUT + SLACK
    assert result["recovered"] is not None
    assert result["after"] == describe(sample_entry(b"after"))
    assert not any("s3cret" in line for line in result["logs"])


def test_redis_wrong_password(start_redis, tmp_path):
    """
    A refused password makes every call a prompt miss, never a failure,
    logged once per kind of error, without the password.
    """
    server = start_redis(password="s3cret")
    result = run_scenario("unusable", redis_spec(server, password="wrong"), tmp_path)
    assert result["results"] == [None] * 30
    assert max(result["timings"]) <= 2 * TIMEOUT + SLACK
    assert result["stats"]["errors"] >= 50
    assert 1 <= len(result["logs"]) <= 3, result["logs"]
    assert any("redis://127.0.0.1" in line for line in result["logs"])
    assert not any("wrong" in line for line in result["logs"])


@pytest.mark.parametrize("url, message", [
    ("http://127.0.0.1:6379/0", "scheme"),
    ("redis:///0", "no host"),
    ("redis://127.0.0.1:99999/0", "port"),
    ("redis://:s3cret@127.0.0.1:port/0", "port"),
    ("redis://127.0.0.1:6379/zero", "database number"),
    ("redis://127.0.0.1:6379/0?ssl=true", "options"),
])
def test_redis_bad_url_is_a_config_error(url, message):
    """A URL the store cannot use is a ConfigError saying what is wrong, without the password."""
    from proxyframe.plugins.pf_cache_redis import RedisStore

    with pytest.raises(ConfigError, match=message) as caught:
        RedisStore(url, "p:", 1.0, MemoryReactorClock())
    assert "s3cret" not in str(caught.value)


def test_redis_store_without_its_client_is_a_config_error(monkeypatch, tmp_path):
    """
    Without the [redis] extra installed, the store's module still imports
    (plugin discovery imports every module of proxyframe.plugins, so a
    failure there would be reported at every start), and store = "redis"
    says what to install.
    """
    from proxyframe.config import Config
    from proxyframe.filters import FilterContext
    from proxyframe.plugins.pf_cache import CacheFactory

    monkeypatch.setitem(sys.modules, "txredisapi", None)  # import fails as if not installed
    monkeypatch.delitem(sys.modules, "proxyframe.plugins.pf_cache_redis", raising=False)
    context = FilterContext(MemoryReactorClock(), Config(), tmp_path, 0)
    with pytest.raises(ConfigError, match=r"pip install 'proxyframe\[redis\]'"):
        CacheFactory().build({"store": "redis"}, context)


def test_redis_bad_timeout_is_a_config_error():
    """A timeout that is not more than 0 seconds is a ConfigError."""
    from proxyframe.plugins.pf_cache_redis import RedisStore

    with pytest.raises(ConfigError, match="timeout"):
        RedisStore("redis://127.0.0.1:6379/0", "p:", 0, MemoryReactorClock())
