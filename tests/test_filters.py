"""
The filter chain through a real proxy: discovery (drop-in files, a broken
module; installed third-party distributions are in test_packaging.py),
ordering (request phase in config order, response phase in reverse),
short-circuit answers, asynchronous hooks, response_body and re-framing,
replacement responses, and failures confined to one exchange.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
from pathlib import Path

import pytest

from rawhttp import Client
from support import REPO, ProxyProcess, body_bytes, start_failure, twistd_command

# A drop-in plugin module written by the tests: "tag" records its label on
# the way in (request field), on the way out (response field) and at the
# end (a line in a file); "answer" short-circuits; "slow" waits on a
# Deferred and a coroutine; "broken-hook" raises; "double" doubles every
# byte of the response body (so its length changes) and removes
# Content-Length; "replace" answers a request carrying X-Replace with its
# own response in place of the origin's.
TEST_PLUGINS = '''
import json
from twisted.internet.task import deferLater
from twisted.plugin import IPlugin
from zope.interface import implementer
from proxyframe.config import ConfigError
from proxyframe.exchange import Response
from proxyframe.filters import Filter
from proxyframe.interfaces import IFilterFactory


class Tag(Filter):
    def __init__(self, label, done_file):
        self.label, self.done_file = label.encode(), done_file

    def request_received(self, exchange):
        exchange.request.headers.add(b"X-Chain", self.label)

    def response_received(self, exchange):
        exchange.response.headers.add(b"X-Chain-Response", self.label)

    def exchange_done(self, exchange):
        with open(self.done_file, "a") as f:
            f.write(json.dumps([self.label.decode(), exchange.response.status if exchange.response else 0,
                                exchange.passed]) + "\\n")


class Answer(Filter):
    def request_received(self, exchange):
        if exchange.request.path.startswith(b"/answer"):
            return Response.make(418, "answered by a filter\\n", [(b"X-Answered", b"yes")])


class Slow(Filter):
    def __init__(self, reactor):
        self.reactor = reactor

    async def request_received(self, exchange):
        await deferLater(self.reactor, 0.2, lambda: None)
        exchange.request.headers.add(b"X-Slow", b"request")

    def response_received(self, exchange):
        def mark():
            exchange.response.headers.add(b"X-Slow", b"response")
        return deferLater(self.reactor, 0.2, mark)


class BrokenHook(Filter):
    def request_received(self, exchange):
        raise RuntimeError("this filter is broken")


class BrokenBody(Filter):
    def response_body(self, exchange, data):
        raise RuntimeError("this body filter is broken")


class Double(Filter):
    def response_received(self, exchange):
        exchange.response.headers.remove(b"Content-Length")

    def response_body(self, exchange, data):
        doubled = bytearray(2 * len(data))
        doubled[0::2] = doubled[1::2] = data
        return bytes(doubled)


class Replace(Filter):
    def response_received(self, exchange):
        if exchange.request.headers.get(b"x-replace") is not None:
            return Response.make(203, "replaced by a filter\\n", [(b"X-Replaced", b"yes")])


@implementer(IPlugin, IFilterFactory)
class Factory:
    def __init__(self, name, build):
        self.name, self.description, self._build = name, f"test filter {name}", build

    def build(self, options, context):
        return self._build(options, context)


def _tag(options, context):
    if set(options) - {"label", "done_file"}:
        raise ConfigError(f"unknown option {sorted(set(options) - {'label', 'done_file'})[0]!r}")
    return Tag(options["label"], options["done_file"])


tag = Factory("tag", _tag)
answer = Factory("answer", lambda options, context: Answer())
slow = Factory("slow", lambda options, context: Slow(context.reactor))
broken_hook = Factory("broken-hook", lambda options, context: BrokenHook())
broken_body = Factory("broken-body", lambda options, context: BrokenBody())
double = Factory("double", lambda options, context: Double())
replace = Factory("replace", lambda options, context: Replace())
'''


def config(plugin_dir: Path, filters: list[dict], extra_paths: tuple[str, ...] = ()) -> str:
    """A config text with plugin_paths and the given [[filter]] entries."""
    paths = [str(plugin_dir), *extra_paths]
    lines = ['listen = ["tcp:0:interface=127.0.0.1"]', f"plugin_paths = {json.dumps(paths)}"]
    for entry in filters:
        lines.append("[[filter]]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in entry.items())
    return "\n".join(lines) + "\n"


@pytest.fixture
def plugin_dir(tmp_path):
    directory = tmp_path / "dropins"
    directory.mkdir()
    (directory / "pft_testfilters.py").write_text(TEST_PLUGINS)
    return directory


@pytest.fixture
def run_proxy(tmp_path):
    started = []

    def run(text: str) -> ProxyProcess:
        proc = ProxyProcess(text, tmp_path)
        started.append(proc)
        return proc

    yield run
    for proc in started:
        proc.stop()


def get(proxy, url: str):
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
    conn.request("GET", url)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp, body


def done_lines(path: Path) -> list[list]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_request_phase_in_order_response_phase_in_reverse(run_proxy, plugin_dir, tmp_path, origin):
    """Filters see the request in config order and the response in reverse; each sees exchange_done once."""
    done = tmp_path / "done.jsonl"
    proxy = run_proxy(config(plugin_dir, [{"use": "tag", "label": x, "done_file": str(done)} for x in "abc"]))
    resp, body = get(proxy, origin.url("/"))
    assert (resp.status, body) == (200, b"hello")
    (seen,) = origin.requests
    assert [v for n, v in seen.headers if n == "X-Chain"] == ["a", "b", "c"]
    assert resp.headers.get_all("X-Chain-Response") == ["c", "b", "a"]
    proxy.stop()
    assert [line[0] for line in done_lines(done)] == ["c", "b", "a"]


def test_short_circuit_skips_later_filters_and_the_origin(run_proxy, plugin_dir, tmp_path, origin):
    """
    A Response returned in the request phase answers at once: the origin and
    later filters are skipped; earlier filters still see the response and
    exchange_done, and so (exchange_done only) do the later ones.
    """
    done = tmp_path / "done.jsonl"
    proxy = run_proxy(config(plugin_dir, [
        {"use": "tag", "label": "before", "done_file": str(done)},
        {"use": "answer"},
        {"use": "tag", "label": "after", "done_file": str(done)},
    ]))
    resp, body = get(proxy, origin.url("/answer"))
    assert resp.status == 418
    assert body == b"answered by a filter\n"
    assert resp.getheader("X-Answered") == "yes"
    assert resp.headers.get_all("X-Chain-Response") == ["before"]
    assert origin.requests == []
    # Not short-circuited: the same chain forwards other paths.
    resp, _ = get(proxy, origin.url("/other"))
    assert resp.status == 200 and len(origin.requests) == 1
    proxy.stop()
    lines = done_lines(done)
    assert lines[:2] == [["after", 418, 2], ["before", 418, 2]]
    assert lines[2:] == [["after", 200, 3], ["before", 200, 3]]


def test_async_hooks_are_awaited(run_proxy, plugin_dir, origin):
    """An async def request hook and a Deferred response hook are waited for, in order."""
    proxy = run_proxy(config(plugin_dir, [{"use": "slow"}]))
    resp, body = get(proxy, origin.url("/bytes/70000?seed=2"))
    assert resp.status == 200
    assert len(body) == 70000
    assert resp.getheader("X-Slow") == "response"
    (seen,) = origin.requests
    assert seen.header("X-Slow") == "request"


def test_failing_hook_fails_only_that_exchange(run_proxy, plugin_dir, origin):
    """A hook that raises gives 500 proxy_internal_error naming the filter; the proxy keeps serving."""
    proxy = run_proxy(config(plugin_dir, [{"use": "broken-hook"}]))
    resp, body = get(proxy, origin.url("/"))
    assert resp.status == 500
    assert "error=proxy_internal_error" in resp.getheader("Proxy-Status")
    assert b"broken-hook" in body
    assert origin.requests == []
    resp, _ = get(proxy, origin.url("/"))
    assert resp.status == 500
    proxy.wait_for_line(r"filter broken-hook failed")
    proxy.wait_for_line(r"RuntimeError: this filter is broken")


def test_body_hook_failing_before_any_byte_left_gives_500(run_proxy, plugin_dir, origin):
    """
    A response_body hook that raises on the first piece, before any byte of
    the response was written: the client gets 500 proxy_internal_error (not
    a cut connection), and the proxy keeps serving on a new connection.
    """
    proxy = run_proxy(config(plugin_dir, [{"use": "broken-body"}]))
    for _ in range(2):
        resp, body = get(proxy, origin.url("/"))
        assert resp.status == 500
        assert "error=proxy_internal_error" in resp.getheader("Proxy-Status")
        assert b"broken-body" in body
    proxy.wait_for_line(r"RuntimeError: this body filter is broken")


# -- response_body and re-framing ----------------------------------------------------

FRAMINGS = ("length", "chunked", "close")
#: Bigger than the origin's 64 KiB pieces, so the filter sees several.
BODY_SIZE = 150_000


def doubled(data: bytes) -> bytes:
    """What the "double" test filter makes of *data*: every byte twice."""
    return bytes(b for byte in data for b in (byte, byte))


def plain_get(url: str, version: str = "1.1", extra: str = "") -> bytes:
    """An absolute-form GET for the raw client."""
    return f"GET {url} HTTP/{version}\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()


@pytest.mark.parametrize("framing", FRAMINGS)
def test_body_filter_changing_length_is_chunked_for_http11(run_proxy, plugin_dir, origin, framing):
    """
    A filter that changes the body's length in response_body and removes
    Content-Length in response_received: an HTTP/1.1 client gets the
    changed body chunked (RFC 9112 §7.1), byte for byte, whatever the
    origin's framing, and the connection stays usable for the next request.
    """
    proxy = run_proxy(config(plugin_dir, [{"use": "double"}]))
    with Client(proxy.port) as client:
        client.send(plain_get(origin.url(f"/bytes/{BODY_SIZE}?framing={framing}&seed=3")))
        reply = client.read_response()
        assert reply.status == 200
        assert reply.header("transfer-encoding") == "chunked" and reply.header("content-length") is None
        assert "close" not in (reply.header("connection") or "")
        assert reply.body == doubled(body_bytes(BODY_SIZE, seed=3))
        assert client.buf == b""
        client.send(plain_get(origin.url("/bytes/10?seed=4")))
        second = client.read_response()
        assert (second.status, second.body) == (200, doubled(body_bytes(10, seed=4)))
    assert [r.target for r in origin.requests] == [f"/bytes/{BODY_SIZE}?framing={framing}&seed=3", "/bytes/10?seed=4"]


@pytest.mark.parametrize("framing", FRAMINGS)
def test_body_filter_changing_length_is_close_delimited_for_http10(run_proxy, plugin_dir, origin, framing):
    """
    The same filter with an HTTP/1.0 client, which knows no chunked coding:
    the changed body is close-delimited (no Content-Length, no
    Transfer-Encoding, ``Connection: close``) and the proxy closes the
    connection after its last byte.
    """
    proxy = run_proxy(config(plugin_dir, [{"use": "double"}]))
    with Client(proxy.port) as client:
        client.send(plain_get(origin.url(f"/bytes/{BODY_SIZE}?framing={framing}&seed=5"), version="1.0"))
        reply = client.read_response()  # no length: read_to_close fails unless the proxy closes
        assert reply.status == 200
        assert reply.header("transfer-encoding") is None and reply.header("content-length") is None
        assert reply.header("connection") == "close"
        assert reply.body == doubled(body_bytes(BODY_SIZE, seed=5))
    assert len(origin.requests) == 1


@pytest.mark.parametrize("framing", FRAMINGS)
def test_replacement_response_drops_the_origin_body(run_proxy, plugin_dir, origin, framing):
    """
    response_received returning a Response: the client gets that response
    whole and none of the origin's body, then the next request on the same
    client connection is relayed normally.
    """
    proxy = run_proxy(config(plugin_dir, [{"use": "replace"}]))
    with Client(proxy.port) as client:
        client.send(plain_get(origin.url(f"/bytes/{BODY_SIZE}?framing={framing}&seed=6"), extra="X-Replace: 1\r\n"))
        reply = client.read_response()
        assert (reply.status, reply.body) == (203, b"replaced by a filter\n")
        assert reply.header("x-replaced") == "yes"
        assert reply.header("content-length") == str(len(reply.body))
        assert client.buf == b""
        client.send(plain_get(origin.url("/bytes/1000?seed=7")))
        second = client.read_response()
        assert (second.status, second.body) == (200, body_bytes(1000, seed=7))
        assert second.header("x-replaced") is None
    assert [r.target for r in origin.requests] == [f"/bytes/{BODY_SIZE}?framing={framing}&seed=6",
                                                   "/bytes/1000?seed=7"]


def test_drop_in_contrib_filter_from_the_repository(run_proxy, origin):
    """plugins/pf_header_rewrite.py, found through plugin_paths, edits both directions."""
    text = config(REPO / "plugins", [{
        "use": "header-rewrite",
        "request_set": ["X-Forwarded-Proto: http"],
        "request_remove": ["Cookie"],
        "response_add": ["X-Served-Via: proxyframe"],
        "response_remove": ["Content-Type"],
    }])
    proxy = run_proxy(text)
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
    conn.request("GET", origin.url("/"), headers={"Cookie": "secret=1"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.getheader("X-Served-Via") == "proxyframe"
    assert resp.getheader("Content-Type") is None
    (seen,) = origin.requests
    assert seen.header("X-Forwarded-Proto") == "http"
    assert seen.header("Cookie") is None


def test_unknown_filter_stops_the_start(tmp_path, plugin_dir):
    """A filter the config names but no plugin provides: exit 1, the name and the known filters, no traceback."""
    out = start_failure(tmp_path, config(plugin_dir, [{"use": "no-such-filter"}]))
    output = out.stdout + out.stderr
    assert out.returncode == 1, output
    assert "filter[0]: no filter plugin named 'no-such-filter'" in output
    assert "tag" in output and "answer" in output
    assert "Traceback" not in output


def test_bad_filter_options_stop_the_start(tmp_path, plugin_dir):
    """Options a filter refuses: exit 1 with the filter's name, position and the option."""
    out = start_failure(tmp_path, config(plugin_dir, [{"use": "tag", "label": "x", "done_file": "f", "colour": 1}]))
    output = out.stdout + out.stderr
    assert out.returncode == 1, output
    assert "filter[0] (tag): unknown option 'colour'" in output
    assert "Traceback" not in output


def list_filters(tmp_path: Path, text: str) -> str:
    path = tmp_path / "list.toml"
    path.write_text(text)
    out = subprocess.run(twistd_command() + ["proxyframe", "--config", str(path), "--list-filters"],
                         cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def test_broken_plugin_module_is_reported_and_does_not_hide_others(tmp_path, plugin_dir):
    """
    --list-filters: a drop-in module that fails to import is reported in
    one line with its name, the error and where it was raised, no
    traceback; the other plugins are still listed.
    """
    broken = plugin_dir / "pft_broken.py"
    broken.write_text("import no_such_module_for_proxyframe\n")
    output = list_filters(tmp_path, config(plugin_dir, []))
    (line,) = [line for line in output.splitlines() if "pft_broken" in line]
    assert line == ("filter plugin module pft_broken could not be loaded: ModuleNotFoundError: "
                    f"No module named 'no_such_module_for_proxyframe' ({broken}, line 1)")
    assert "Traceback" not in output and "Unhandled Error" not in output
    assert "tag" in output and "answer" in output
    assert str(plugin_dir / "pft_testfilters.py") in output


def test_broken_plugin_module_at_start_is_one_line_and_others_work(run_proxy, plugin_dir, origin):
    """
    A normal start with a drop-in module that fails to import: the proxy
    starts, the filters of the other modules work, and the output names
    the module and its error once, in one line, without a traceback.
    """
    broken = plugin_dir / "pft_broken.py"
    broken.write_text("x = 1\ndef broken(:\n")
    proxy = run_proxy(config(plugin_dir, [{"use": "answer"}]))
    resp, body = get(proxy, origin.url("/answer"))
    assert (resp.status, body) == (418, b"answered by a filter\n")
    resp, body = get(proxy, origin.url("/other"))
    assert (resp.status, body) == (200, b"hello")
    proxy.stop()
    (line,) = [line for line in proxy.lines if "pft_broken" in line]
    assert line.endswith(f"filter plugin module pft_broken could not be loaded: SyntaxError: invalid syntax "
                         f"({broken}, line 2)"), line
    assert not [line for line in proxy.lines if "Traceback" in line or "Unhandled Error" in line], proxy.lines


def test_filter_in_a_broken_module_stops_the_start_naming_the_error(tmp_path, plugin_dir):
    """
    A configured filter whose module fails to import: the start stops
    with exit 1, and the one message says both that the filter was not
    found and why its module could not be loaded, once, no traceback.
    """
    (plugin_dir / "pft_testfilters.py").write_text(TEST_PLUGINS + "\nraise RuntimeError('half-written plugin')\n")
    out = start_failure(tmp_path, config(plugin_dir, [{"use": "tag", "label": "x", "done_file": "f"}]))
    output = out.stdout + out.stderr
    assert out.returncode == 1, output
    (line,) = [line for line in output.splitlines() if "pft_testfilters" in line]
    assert "filter[0]: no filter plugin named 'tag'" in line
    assert ("filter plugin module pft_testfilters could not be loaded: RuntimeError: half-written plugin "
            f"({plugin_dir / 'pft_testfilters.py'}, line ") in line
    assert "Traceback" not in output


MARKER_PLUGIN = '''
from pathlib import Path
from zope.interface import implementer
from twisted.plugin import IPlugin
from proxyframe.filters import Filter
from proxyframe.interfaces import IFilterFactory

with open({imports!r}, "a") as f:
    f.write("imported\\n")


@implementer(IPlugin, IFilterFactory)
class MarkerFactory:
    name, description = "marker", "counts its imports"

    def build(self, options, context):
        return Filter()


marker = MarkerFactory()
'''


def test_only_the_configured_plugin_modules_are_imported(run_proxy, plugin_dir, tmp_path, origin):
    """
    A start imports only the modules of the filters it uses, once Twisted's
    plugin cache knows them (the first start builds it by importing every
    module); a factory bound to a module-level name unlike its filter name
    (``factory`` for ``renamed``) is still found, by importing all.
    """
    imports = tmp_path / "marker-imports"
    (plugin_dir / "pft_marker.py").write_text(MARKER_PLUGIN.format(imports=str(imports)))
    (plugin_dir / "pft_renamed.py").write_text(
        "from proxyframe.plugins.pft_testfilters import Answer, Factory\n"
        "factory = Factory('renamed', lambda options, context: Answer())\n")

    def start(use: str, status: int) -> int:
        proxy = run_proxy(config(plugin_dir, [{"use": use}]))
        resp, _ = get(proxy, origin.url("/answer"))
        assert resp.status == status  # the filter is there and working
        proxy.stop()
        return len(imports.read_text().splitlines())

    assert start("answer", 418) == 1  # the cache is built: every module imported once
    assert start("answer", 418) == 1  # from the cache: pft_marker is not imported
    assert start("broken-hook", 500) == 1  # broken_hook: found by name
    assert start("marker", 200) == 2
    assert start("renamed", 418) == 3  # not found by name: everything is imported


def test_list_filters_names_each_plugin_and_its_file(tmp_path):
    """--list-filters shows the contrib drop-in with the file it came from."""
    output = list_filters(tmp_path, config(REPO / "plugins", []))
    assert "header-rewrite" in output
    assert str(REPO / "plugins" / "pf_header_rewrite.py") in output


def test_plugin_guide_example_works(run_proxy, origin):
    """The complete filter in docs/plugins.rst refuses DELETE and lets GET through."""
    proxy = run_proxy(config(REPO / "docs" / "examples" / "plugins", [{"use": "no-delete"}]))
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
    conn.request("DELETE", origin.url("/thing"))
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (405, b"DELETE is not allowed through this proxy\n")
    conn.request("GET", origin.url("/thing"))
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, b"hello")
    conn.close()
    assert [r.method for r in origin.requests] == ["GET"]
