"""
Plain HTTP relayed through the proxy: every method, origin-form upstream,
Host from the target, Via, bodies byte-exact under every framing.
"""

from __future__ import annotations

import hashlib
import http.client
import subprocess
import urllib.request

import pytest

from support import body_bytes, body_sha256


def proxied(proxy, method, url, body=None, headers=None, encode_chunked=False):
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
    conn.request(method, url, body=body, headers=headers or {}, encode_chunked=encode_chunked)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp, data


@pytest.mark.parametrize("method", ["GET", "DELETE", "OPTIONS", "TRACE", "PURGE", "FOO-BAR"])
def test_methods_without_body_reach_origin_in_origin_form(proxy, origin, method):
    """Each method is relayed once, in origin-form, with Host from the target and Via added."""
    resp, data = proxied(proxy, method, origin.url("/a/b?x=1"))
    assert resp.status == 200
    assert data == b"hello"
    assert len(origin.requests) == 1
    seen = origin.requests[0]
    assert (seen.method, seen.target, seen.version) == (method, "/a/b?x=1", "HTTP/1.1")
    assert seen.header("host") == f"127.0.0.1:{origin.port}"
    assert seen.header("via") == "1.1 proxyframe"
    assert resp.getheader("via") == "1.1 proxyframe"


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
@pytest.mark.parametrize("size", [0, 1, 16383, 16384, 16385, 3 * 1024 * 1024 + 7])
def test_request_body_with_content_length_is_byte_exact(proxy, origin, method, size):
    """The origin receives the request body byte for byte (Content-Length framing)."""
    body = body_bytes(size, seed=size)
    resp, _ = proxied(proxy, method, origin.url("/upload"), body=body,
                      headers={"Content-Length": str(size)})
    assert resp.status == 200
    (seen,) = origin.requests
    assert seen.method == method
    assert seen.body_length == size
    assert seen.body_sha256 == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("size", [1, 16385, 2 * 1024 * 1024 + 3])
def test_chunked_request_body_is_byte_exact(proxy, origin, size):
    """A chunked request body (http.client sends an iterable chunked) arrives intact."""
    pieces = [body_bytes(size, seed=1)[i:i + 10000] for i in range(0, size, 10000)]
    resp, _ = proxied(proxy, "POST", origin.url("/upload"), body=iter(pieces),
                      headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
    assert resp.status == 200
    (seen,) = origin.requests
    assert seen.header("transfer-encoding") == "chunked"
    assert seen.body_length == size
    assert seen.body_sha256 == body_sha256(size, seed=1)


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
@pytest.mark.parametrize("size", [0, 1, 16383, 16385, 5 * 1024 * 1024])
def test_response_body_is_byte_exact(proxy, origin, framing, size):
    """Response bodies arrive intact whether the origin frames them by length, chunks or close."""
    resp, data = proxied(proxy, "GET", origin.url(f"/bytes/{size}?framing={framing}&seed=3"))
    assert resp.status == 200
    assert len(data) == size
    assert hashlib.sha256(data).hexdigest() == body_sha256(size, seed=3)


def test_urllib_with_proxy_handler(proxy, origin):
    """Python's urllib with a ProxyHandler gets the origin's response."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url}))
    with opener.open(origin.url("/bytes/1000?seed=5"), timeout=10) as resp:
        assert resp.status == 200
        assert resp.read() == body_bytes(1000, seed=5)
    assert len(origin.requests) == 1


def test_curl_relays_and_reuses_upstream_connection(proxy, origin, curl):
    """curl through the proxy: two requests, one client connection, one upstream connection."""
    out = subprocess.run(
        [curl, "-sS", "-x", proxy.url, origin.url("/bytes/100?seed=1"), origin.url("/bytes/200?seed=2"),
         "-o", "/dev/null", "-o", "/dev/null", "-w", "%{http_code} %{num_connects}\n"],
        capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.split("\n")[:2] == ["200 1", "200 0"]
    assert [r.connection for r in origin.requests] == [1, 1]
    assert origin.connections == 1


def test_upstream_pool_shared_across_clients(proxy, origin):
    """A second client reuses the idle upstream connection the first one left."""
    for _ in range(3):
        resp, _ = proxied(proxy, "GET", origin.url("/"))
        assert resp.status == 200
    assert len(origin.requests) == 3
    assert origin.connections == 1


def test_head_response_has_no_body(proxy, origin):
    """HEAD: headers (with the origin's Content-Length) and no body; the connection stays usable."""
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
    conn.request("HEAD", origin.url("/bytes/5000"))
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("content-length") == "5000"
    assert resp.read() == b""
    conn.request("GET", origin.url("/bytes/10?seed=9"))
    resp = conn.getresponse()
    assert resp.read() == body_bytes(10, seed=9)
    conn.close()
    assert [r.method for r in origin.requests] == ["HEAD", "GET"]


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_statuses(proxy, origin, status):
    """204 and 304 carry no body and do not break the connection."""
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
    conn.request("GET", origin.url(f"/status/{status}"))
    resp = conn.getresponse()
    assert resp.status == status
    assert resp.read() == b""
    conn.request("GET", origin.url("/"))
    assert conn.getresponse().read() == b"hello"
    conn.close()


def test_http10_client_gets_close_delimited_body(proxy, origin):
    """An HTTP/1.0 client never receives chunked coding: a chunked origin response is close-delimited."""
    import socket
    size = 70000
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall(f"GET {origin.url(f'/bytes/{size}?framing=chunked&seed=4')} HTTP/1.0\r\n\r\n".encode())
        data = b""
        while piece := sock.recv(65536):
            data += piece
    head, body = data.split(b"\r\n\r\n", 1)
    assert b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower()
    assert hashlib.sha256(body).hexdigest() == body_sha256(size, seed=4)
