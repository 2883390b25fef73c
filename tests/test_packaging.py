"""
Packaging and discovery of installed plugins: the wheel ``pip`` builds from
this tree carries every proxyframe module and the ``twistd`` dropin (and
none of Twisted's own ``__init__.py`` files); a third party's separately
built distribution that ships a module in ``proxyframe/plugins/`` is found
with no change to proxyframe, beside the source tree and, end to end, with
both wheels installed in a fresh venv where ``twistd proxyframe`` lists
and runs its filters.

Each wheel is built once per session; the tests that use them are
``slow`` (the builds and the fresh venv take tens of seconds).
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from support import REPO, ProxyProcess, twistd_command

#: The third party's plugin module: a filter that stamps each request.
THIRD_PARTY_MODULE = '''
from twisted.plugin import IPlugin
from zope.interface import implementer
from proxyframe.filters import Filter
from proxyframe.interfaces import IFilterFactory


class Stamp(Filter):
    def request_received(self, exchange):
        exchange.request.headers.add(b"X-Third-Party", b"installed")


@implementer(IPlugin, IFilterFactory)
class StampFactory:
    name = "third-party-stamp"
    description = "Stamps requests (an installed third-party distribution)"

    def build(self, options, context):
        return Stamp()


stamp = StampFactory()
'''

#: The first-party filters every installation must find.
FIRST_PARTY = ("accesslog", "acl", "auth", "cache")


def clean_env() -> dict[str, str]:
    """The environment without PYTHONPATH/PYTHONHOME: nothing from this tree leaks in."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def run(*command, cwd: Path, timeout: float = 120, env: dict[str, str] | None = None) -> str:
    """Run *command*, fail the test with its output unless it exits 0; returns stdout and stderr."""
    result = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env=clean_env() if env is None else env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@pytest.fixture(scope="session")
def proxyframe_wheel(tmp_path_factory) -> Path:
    """``pip wheel`` of this working tree (from a clean copy, so the build leaves nothing in the tree)."""
    tmp = tmp_path_factory.mktemp("proxyframe-wheel")
    src, dist = tmp / "src", tmp / "dist"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "dropin.cache", ".venv"))
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, src, cwd=tmp, timeout=300)
    (wheel,) = dist.glob("proxyframe-*.whl")
    return wheel


@pytest.fixture(scope="session")
def stamp_wheel(tmp_path_factory) -> Path:
    """
    The wheel of ``proxyframe-stamp``, a third party's distribution whose
    only module is ``proxyframe/plugins/pfx_stamp.py`` (a namespace
    portion: no ``__init__.py``).
    """
    tmp = tmp_path_factory.mktemp("stamp-wheel")
    src, dist = tmp / "src", tmp / "dist"
    (src / "proxyframe" / "plugins").mkdir(parents=True)
    (src / "proxyframe" / "plugins" / "pfx_stamp.py").write_text(THIRD_PARTY_MODULE)
    (src / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "proxyframe-stamp"
        version = "1.0"
        [tool.setuptools]
        packages = ["proxyframe.plugins"]
    '''))
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, src, cwd=tmp, timeout=300)
    (wheel,) = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "proxyframe/plugins/pfx_stamp.py" in names
    assert "proxyframe/plugins/__init__.py" not in names
    return wheel


def stamp_config() -> str:
    """Listen on 127.0.0.1:0; the chain: the access log (stdout), then the third party's filter."""
    return ('listen = ["tcp:0:interface=127.0.0.1"]\n'
            '[[filter]]\nuse = "accesslog"\n'
            '[[filter]]\nuse = "third-party-stamp"\n')


def listed(output: str) -> dict[str, str]:
    """``--list-filters`` output → ``{filter name: the file it comes from}``."""
    return {m[1]: m[2] for m in re.finditer(r"^(\S+) .*\n +from (\S+)$", output, re.MULTILINE)}


def relay_one(proxy: ProxyProcess, origin) -> None:
    """One GET through *proxy*: the origin sees the stamp and the access log has its line."""
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
    conn.request("GET", origin.url("/stamped"))
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, b"hello")
    conn.close()
    (seen,) = origin.requests
    assert seen.header("X-Third-Party") == "installed"
    proxy.wait_for_line(rf" TCP_MISS/200 5 GET {re.escape(origin.url('/stamped'))} ")


@pytest.mark.slow
def test_wheel_carries_every_module_and_the_dropin(proxyframe_wheel):
    """
    The wheel holds every proxyframe module and
    ``twisted/plugins/proxyframe_dropin.py``, but not ``twisted/__init__.py``
    or ``twisted/plugins/__init__.py``, which would shadow Twisted's own.
    """
    names = set(zipfile.ZipFile(proxyframe_wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "proxyframe").rglob("*.py")}
    assert modules and modules <= names, modules - names
    assert "twisted/plugins/proxyframe_dropin.py" in names
    assert not {"twisted/__init__.py", "twisted/plugins/__init__.py"} & names


@pytest.mark.slow
def test_installed_third_party_distribution_is_found(stamp_wheel, tmp_path, origin):
    """
    The third party's wheel installed into its own directory on
    ``sys.path``, beside this source tree: its filter is listed from that
    directory and works, with no change to proxyframe.
    """
    site = tmp_path / "site"
    run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, stamp_wheel, cwd=tmp_path)
    pythonpath = f"{REPO}{os.pathsep}{site}"
    (tmp_path / "list.toml").write_text(stamp_config())
    output = run(*twistd_command(), "proxyframe", "--config", tmp_path / "list.toml", "--list-filters",
                 cwd=tmp_path, env=dict(clean_env(), PYTHONPATH=pythonpath))
    assert listed(output)["third-party-stamp"] == str(site / "proxyframe" / "plugins" / "pfx_stamp.py")
    proxy = ProxyProcess(stamp_config(), tmp_path, pythonpath=pythonpath)
    try:
        relay_one(proxy, origin)
    finally:
        proxy.stop()


@pytest.mark.slow
def test_fresh_venv_with_both_wheels_lists_and_runs_every_filter(proxyframe_wheel, stamp_wheel, tmp_path,
                                                                   origin):
    """
    A fresh venv (sharing nothing with this one) with proxyframe's
    dependencies has no ``twistd proxyframe``; after ``pip install`` of the
    proxyframe wheel (not editable) and the third party's wheel, that venv's
    ``twistd proxyframe --list-filters`` lists the first-party filters and
    the third party's, all from the venv's site-packages, and ``twistd -n
    proxyframe`` relays a request through the access log and the third
    party's filter.  Everything runs outside this tree, without PYTHONPATH.
    """
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python, twistd = venv / "bin" / "python", venv / "bin" / "twistd"
    wheel_zip = zipfile.ZipFile(proxyframe_wheel)
    metadata = next(n for n in wheel_zip.namelist() if n.endswith(".dist-info/METADATA"))
    requirements = [line.split(":", 1)[1].strip() for line in wheel_zip.read(metadata).decode().splitlines()
                    if line.startswith("Requires-Dist:") and "extra ==" not in line]
    run(python, "-m", "pip", "install", "-q", *requirements, cwd=tmp_path, timeout=600)
    before = subprocess.run([twistd, "proxyframe", "--help"], cwd=tmp_path, env=clean_env(),
                            capture_output=True, text=True, timeout=60)
    assert "Unknown command: proxyframe" in before.stdout + before.stderr, before.stdout + before.stderr

    # --no-index: the dependencies must already be met, nothing else comes in.
    run(python, "-m", "pip", "install", "-q", "--no-index", proxyframe_wheel, stamp_wheel, cwd=tmp_path)
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                    cwd=tmp_path).strip())
    assert site.is_relative_to(venv)
    (tmp_path / "list.toml").write_text(stamp_config())
    found = listed(run(twistd, "proxyframe", "--config", tmp_path / "list.toml", "--list-filters", cwd=tmp_path))
    plugins = site / "proxyframe" / "plugins"
    assert {name: found.get(name) for name in FIRST_PARTY} == {
        name: str(plugins / f"pf_{name}.py") for name in FIRST_PARTY}, found
    assert found["third-party-stamp"] == str(plugins / "pfx_stamp.py")

    proxy = ProxyProcess(stamp_config(), tmp_path, pythonpath=None, twistd=[str(twistd)])
    try:
        relay_one(proxy, origin)
    finally:
        proxy.stop()
    assert not [line for line in proxy.lines if "Traceback" in line], proxy.lines
