"""
The errors the proxy makes itself when the upstream fails: the right status
(RFC 9110 §15.6.3 502, §15.6.5 504), an RFC 9209 ``Proxy-Status`` naming
the error type, a short page naming the host (HTML or plain text by
``Accept``), no body for HEAD, a cut connection once a response is under
way, and never a traceback, on the wire or in the proxy's output.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess
import threading
import time

import pytest

from rawhttp import Client, Reply, assert_proxy_status, assert_ran_clean, exchange, scripted_origin

HTML = "text/html,application/xhtml+xml,*/*;q=0.8"
ACCEPTS = {"no-accept": None, "html": HTML, "json": "application/json"}


def get(target: str, accept: str | None = None, method: str = "GET") -> bytes:
    """A raw absolute-form request, with Accept when given."""
    fields = "Host: h\r\n" + (f"Accept: {accept}\r\n" if accept else "")
    return f"{method} {target} HTTP/1.1\r\n{fields}\r\n".encode()


def check_error_page(proxy, reply: Reply, status: int, error: str, host: str, accept: str | None) -> None:
    """
    *reply* is the proxy's error page: *status*, Proxy-Status *error*, the
    host named, HTML only for a client that accepts text/html, no traceback;
    and the proxy, still running, then stops with no traceback in its output.
    """
    assert reply.status == status, reply.raw_head
    assert_proxy_status(reply, error, host)
    html = accept is not None and "text/html" in accept
    assert reply.header("content-type") == ("text/html" if html else "text/plain") + "; charset=utf-8"
    assert reply.body.lstrip().startswith(b"<!DOCTYPE html>") == html
    assert int(reply.header("content-length")) == len(reply.body)
    assert b"Traceback" not in reply.body
    assert_ran_clean(proxy)


@pytest.fixture
def refused_port():
    """A 127.0.0.1 port with nothing listening (bound, then closed)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture
def blackhole():
    """
    A 127.0.0.1 port whose SYNs go unanswered: a listener with backlog 0
    and its accept queue full.  Skips when the kernel still completes
    handshakes.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            sock = socket.socket()
            sock.settimeout(0.3)
            fillers.append(sock)
            try:
                sock.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        else:
            pytest.skip("the kernel completes handshakes past a full accept queue")
        yield port
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


# -- connection failures ---------------------------------------------------------

@pytest.mark.parametrize("accept", ACCEPTS.values(), ids=ACCEPTS.keys())
def test_connection_refused_is_502(proxy, refused_port, accept):
    """
    RFC 9110 §15.6.3, RFC 9209 §2.3: nothing listening at the target gets
    502 with Proxy-Status connection_refused, naming host:port, in HTML
    only when the client accepts text/html.
    """
    reply = exchange(proxy, get(f"http://127.0.0.1:{refused_port}/", accept))
    check_error_page(proxy, reply, 502, "connection_refused", f"127.0.0.1:{refused_port}", accept)


def test_head_error_response_has_no_body(proxy, refused_port):
    """
    RFC 9110 §9.3.2: the error answer to HEAD has the page's fields but no
    body, so the next response on the connection starts right after it.
    """
    with Client(proxy.port) as client:
        client.send(get(f"http://127.0.0.1:{refused_port}/", method="HEAD")
                    + get(f"http://127.0.0.1:{refused_port}/"))
        head = client.read_response("HEAD")
        full = client.read_response()
    assert head.status == full.status == 502
    assert_proxy_status(head, "connection_refused")
    check_error_page(proxy, full, 502, "connection_refused", f"127.0.0.1:{refused_port}", None)


def _resolves_fast(name: str) -> bool:
    """Whether looking *name* up fails within 5 s (it must not resolve)."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(socket.getaddrinfo, name, 80)
    pool.shutdown(wait=False)
    try:
        future.result(timeout=5)
    except socket.gaierror:
        return True
    except concurrent.futures.TimeoutError:
        return False
    raise AssertionError(f"{name} resolved")


@pytest.mark.parametrize("accept", [None, HTML], ids=["text", "html"])
def test_unresolvable_name_is_502_dns_error(start_proxy, accept):
    """
    RFC 9209 §2.3: a name that does not resolve (RFC 6761 §6.4: .invalid)
    gets 502 with Proxy-Status dns_error, naming host:port, well within
    timeouts.connect.
    """
    name = "proxyframe-test.invalid"
    if not _resolves_fast(name):
        pytest.skip("the resolver takes over 5 s to fail for .invalid")
    proxy = start_proxy(timeouts={"connect": 8.0})
    started = time.monotonic()
    reply = exchange(proxy, get(f"http://{name}:8080/", accept))
    assert time.monotonic() - started < 6
    check_error_page(proxy, reply, 502, "dns_error", f"{name}:8080", accept)


def test_connect_timeout_is_504(start_proxy, blackhole):
    """
    RFC 9110 §15.6.5, RFC 9209 §2.3: an upstream that never completes the
    handshake gets 504 with Proxy-Status connection_timeout after
    timeouts.connect.
    """
    proxy = start_proxy(timeouts={"connect": 1.0})
    started = time.monotonic()
    reply = exchange(proxy, get(f"http://127.0.0.1:{blackhole}/", HTML))
    assert 0.9 < time.monotonic() - started < 5
    check_error_page(proxy, reply, 504, "connection_timeout", f"127.0.0.1:{blackhole}", HTML)


# -- upstream failures after connecting ------------------------------------------

def test_response_timeout_is_504(start_proxy, origin):
    """
    RFC 9110 §15.6.5, RFC 9209 §2.3: an origin that takes longer than
    timeouts.response to start its answer gets 504 with Proxy-Status
    http_response_timeout.
    """
    proxy = start_proxy(timeouts={"response": 1.0})
    started = time.monotonic()
    reply = exchange(proxy, get(origin.url("/sleep/4")))
    assert 0.9 < time.monotonic() - started < 3.5
    check_error_page(proxy, reply, 504, "http_response_timeout", f"127.0.0.1:{origin.port}", None)
    assert [r.target for r in origin.requests] == ["/sleep/4"]


def test_origin_closing_without_response_is_502(proxy, origin):
    """
    RFC 9209 §2.3: an origin that reads the request and closes without a
    byte of response gets 502 with Proxy-Status connection_terminated.
    """
    heads = scripted_origin(origin, None)
    reply = exchange(proxy, get(origin.url("/gone"), HTML))
    check_error_page(proxy, reply, 502, "connection_terminated", f"127.0.0.1:{origin.port}", HTML)
    assert len(heads) == 1 and heads[0].startswith(b"GET /gone HTTP/1.1\r\n")


INCOMPLETE = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789"


def test_incomplete_response_cuts_client_connection(start_proxy, origin):
    """
    RFC 9112 §8: an origin that closes after 10 of 1000 announced bytes
    (once those 10 are at the client) leaves the proxy nothing to say but a
    cut connection: the client gets the head and the 10 bytes, then the
    connection ends; the access log (JSON) records http_response_incomplete
    (RFC 9209 §2.3).
    """
    proxy = start_proxy(filter=[{"use": "accesslog", "format": "json"}])
    bytes_out = threading.Event()
    scripted_origin(origin, INCOMPLETE, bytes_out, None)
    with Client(proxy.port) as client:
        client.send(get(origin.url("/partial")))
        reply = client.read_head()
        assert (reply.status, reply.header("content-length")) == (200, "1000")
        assert client.read_exact(10) == b"0123456789"
        bytes_out.set()
        assert client.read_to_close() == b""
    line = proxy.wait_for_line(r'"target":"http://127\.0\.0\.1:\d+/partial"')
    record = json.loads(line)
    assert (record["status"], record["bytes_sent"], record["error"]) == (200, 10, "http_response_incomplete")
    assert_ran_clean(proxy)


def test_incomplete_response_reaches_curl_as_partial(proxy, origin, curl):
    """
    RFC 9112 §8: what the origin sent before closing early still reaches
    the client, then a close short of Content-Length: curl gets the 10
    bytes and reports a partial transfer (exit 18).
    """
    scripted_origin(origin, INCOMPLETE, None)
    out = subprocess.run([curl, "-sS", "--max-time", "15", "-x", proxy.url, origin.url("/partial")],
                         capture_output=True, timeout=20)
    assert (out.returncode, out.stdout) == (18, b"0123456789"), out.stderr
    assert_ran_clean(proxy)
