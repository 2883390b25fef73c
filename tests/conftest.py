"""
Fixtures: ``origin`` (a recording origin server), ``tls_origin``, ``proxy``
(proxyframe with the default test config) and ``start_proxy`` (a factory
for proxies with other configs).  All on 127.0.0.1, port 0.
"""

from __future__ import annotations

import shutil

import pytest

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


@pytest.fixture
def proxy(start_proxy):
    return start_proxy()


@pytest.fixture
def curl():
    path = shutil.which("curl")
    if path is None:
        pytest.skip("curl is not installed (apt-get install curl)")
    return path
