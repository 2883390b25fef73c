"""
Fixtures: ``origin`` (a recording origin server), ``tls_origin``, ``proxy``
(proxyframe with the default test config) and ``start_proxy`` (a factory
for proxies with other configs).  All on 127.0.0.1, port 0.
"""

from __future__ import annotations

import shutil

import pytest

from redistools import RedisServer
from support import Origin, ProxyProcess, make_tls_context, proxy_config


@pytest.fixture
def origin():
    server = Origin()
    yield server
    server.close()


@pytest.fixture
def tls_origin(tmp_path):
    ctx, _ = make_tls_context(tmp_path)
    server = Origin(tls=ctx)
    yield server
    server.close()


@pytest.fixture
def start_proxy(tmp_path):
    """``start_proxy(**config)`` starts a proxyframe process; all are stopped at teardown."""
    started: list[ProxyProcess] = []

    def start(*, extra_args=(), **config) -> ProxyProcess:
        proc = ProxyProcess(proxy_config(**config), tmp_path, list(extra_args))
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(params=[True, False], ids=["splice", "python"])
def splice_proxy(request, start_proxy):
    """
    ``start_proxy`` with the ``splice`` setting at each value in turn (the
    kernel relay, and Python's); ``splice_proxy.splice`` says which.
    """
    def start(**config):
        return start_proxy(splice=request.param, **config)
    start.splice = request.param
    return start


@pytest.fixture
def proxy(start_proxy):
    return start_proxy()


@pytest.fixture
def curl():
    path = shutil.which("curl")
    if path is None:
        pytest.skip("curl is not installed (apt-get install curl)")
    return path


@pytest.fixture
def start_redis(tmp_path):
    """
    ``start_redis(password=None)`` starts a ``redis-server`` (the test is
    skipped when there is none); all are stopped at teardown.
    """
    servers: list[RedisServer] = []

    def start(password: str | None = None) -> RedisServer:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        directory = tmp_path / f"redis{len(servers)}"
        directory.mkdir()
        servers.append(RedisServer(executable, directory, password))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()
