"""
Strict HTTP/1.1 framing at the proxy (RFC 9112), over real sockets.

Requests whose framing two parties could read differently (the raw
material of request smuggling) get a 4xx/5xx, ``Proxy-Status``, and the
connection closed; the origin never sees them.  Size limits answer 414 and
431.  Valid requests survive being split anywhere, pipelined, or preceded
by an empty line.  Malformed responses from the origin become 502, or a
cut connection once part of the response is on its way.

The raw client and origin helpers are in ``rawhttp.py``.
"""

from __future__ import annotations

import hashlib
import threading

import pytest

from rawhttp import (
    Client,
    RawRecorder,
    Reply,
    assert_proxy_status,
    assert_ran_clean,
    exchange,
    fill,
    scripted_origin,
)
from support import body_bytes, wait_until


# -- bad request heads: 4xx/5xx, closed, nothing reaches the origin -----------

def _cl(value: bytes) -> bytes:
    return b"POST URL HTTP/1.1\r\nHost: h\r\nContent-Length: " + value + b"\r\n\r\nhello"


def _field(line: bytes) -> bytes:
    return b"GET URL HTTP/1.1\r\nHost: h\r\n" + line + b"\r\n\r\n"


def _line(request_line: bytes) -> bytes:
    return request_line + b"\r\nHost: h\r\n\r\n"


def _te(value: bytes) -> bytes:
    return b"POST URL HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: " + value + b"\r\n\r\n0\r\n\r\n"


BAD_HEADS = {
    # RFC 9112 §6.1, §6.3: Content-Length with Transfer-Encoding.
    "cl-then-te": (b"POST URL HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"0\r\n\r\n", 400),
    "te-then-cl": (b"POST URL HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
                   b"0\r\n\r\n", 400),
    # RFC 9112 §6.3 item 5: differing or repeated Content-Length, or not 1*DIGIT.
    "cl-differing": (b"POST URL HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
    "cl-duplicate": (b"POST URL HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400),
    "cl-list": (_cl(b"5, 5"), 400),
    "cl-letters": (_cl(b"5a"), 400),
    "cl-plus": (_cl(b"+5"), 400),
    "cl-negative": (_cl(b"-5"), 400),
    "cl-hex": (_cl(b"0x5"), 400),
    "cl-space-inside": (_cl(b"5 5"), 400),
    "cl-empty": (_cl(b""), 400),
    # RFC 9112 §5.2: obs-fold; §2.2: whitespace before the first field.
    "obs-fold-space": (_field(b"X-A: 1\r\n 2"), 400),
    "obs-fold-tab": (_field(b"X-A: 1\r\n\t2"), 400),
    "space-before-first-field": (b"GET URL HTTP/1.1\r\n Host: h\r\n\r\n", 400),
    # RFC 9112 §2.2: bare CR; bare LF (a strict recipient rejects it).
    "bare-lf-in-field": (_field(b"X-A: 1\nX-B: 2"), 400),
    "bare-lf-after-request-line": (b"GET URL HTTP/1.1\nHost: h\r\n\r\n", 400),
    "bare-cr-in-field": (_field(b"X-A: 1\r2"), 400),
    "bare-cr-in-request-line": (b"GET URL\r HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    # RFC 9110 §5.5: no NUL or other controls in field values or names.
    "nul-in-value": (_field(b"X-A: a\x00b"), 400),
    "ctl-in-value": (_field(b"X-A: a\x01b"), 400),
    "esc-in-value": (_field(b"X-A: a\x1bb"), 400),
    "del-in-value": (_field(b"X-A: a\x7fb"), 400),
    "nul-in-name": (_field(b"X-\x00A: 1"), 400),
    # RFC 9112 §5.1: no whitespace between field name and colon.
    "space-before-colon": (b"GET URL HTTP/1.1\r\nHost : h\r\n\r\n", 400),
    "tab-before-colon": (_field(b"X-A\t: 1"), 400),
    "no-colon": (_field(b"X-A 1"), 400),
    "empty-name": (_field(b": 1"), 400),
    # RFC 9112 §6.1: a transfer coding the proxy does not implement.
    "te-gzip-chunked": (_te(b"gzip, chunked"), 501),
    # RFC 9112 §2.6: only HTTP/1.x; 505 for a major version it does not speak.
    "http-2.0": (_line(b"GET URL HTTP/2.0"), 505),
    "http-1.2": (_line(b"GET URL HTTP/1.2"), 505),
    # RFC 9112 §3: request-line = method SP request-target SP HTTP-version.
    "two-spaces": (_line(b"GET  URL HTTP/1.1"), 400),
    "space-before-version": (_line(b"GET URL  HTTP/1.1"), 400),
    "trailing-space": (_line(b"GET URL HTTP/1.1 "), 400),
    "tab-separator": (_line(b"GET\tURL HTTP/1.1"), 400),
    "no-version": (_line(b"GET URL"), 400),
    "lowercase-version": (_line(b"GET URL http/1.1"), 400),
    "version-two-digits": (_line(b"GET URL HTTP/1.10"), 400),
    "method-not-token": (_line(b"G@T URL HTTP/1.1"), 400),
    "garbage": (_line(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), 400),
    # RFC 9112 §3.2.2: a forward proxy needs absolute-form (CONNECT aside).
    "origin-form": (b"GET / HTTP/1.1\r\nHost: 127.0.0.1:PORT\r\n\r\n", 400),
    "asterisk-form": (b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1:PORT\r\n\r\n", 400),
    # RFC 9110 §4.2.4: userinfo is deprecated in http URIs and refused here.
    "userinfo": (_line(b"GET http://user:pw@127.0.0.1:PORT/ HTTP/1.1"), 400),
    "userinfo-empty": (_line(b"GET http://@127.0.0.1:PORT/ HTTP/1.1"), 400),
    "empty-host": (_line(b"GET http:///x HTTP/1.1"), 400),
    "bad-ipv6-literal": (_line(b"GET http://[::1/ HTTP/1.1"), 400),
    # RFC 3986 §3.2.3: port = *DIGIT, and TCP ports are 1-65535.
    "port-zero": (_line(b"GET http://127.0.0.1:0/ HTTP/1.1"), 400),
    "port-65536": (_line(b"GET http://127.0.0.1:65536/ HTTP/1.1"), 400),
    "port-letters": (_line(b"GET http://127.0.0.1:8o/ HTTP/1.1"), 400),
    "port-negative": (_line(b"GET http://127.0.0.1:-80/ HTTP/1.1"), 400),
    "port-too-many-digits": (_line(b"GET http://127.0.0.1:0000PORT/ HTTP/1.1"), 400),
}


def expect_rejected(proxy, origin, data: bytes, status: int) -> Reply:
    """
    Send *data*; the proxy must answer *status* with its own error page,
    then close; the origin must see nothing.
    """
    with Client(proxy.port) as client:
        client.send(data)
        reply = client.read_response()
        assert reply.status == status, reply.raw_head
        assert_proxy_status(reply, "http_request_error")
        client.read_to_close()
    assert origin.requests == [] and origin.connections == 0
    assert_ran_clean(proxy)
    return reply


@pytest.mark.parametrize("template,status", BAD_HEADS.values(), ids=BAD_HEADS.keys())
def test_bad_request_head_is_refused_and_closed(proxy, origin, template, status):
    """
    A request head with ambiguous or invalid framing (RFC 9112 §2.2, §3,
    §5, §6) gets the proxy's error status with Proxy-Status
    http_request_error, and the connection closed; nothing is relayed to
    the origin.
    """
    expect_rejected(proxy, origin, fill(template, origin), status)


@pytest.mark.parametrize("case", [BAD_HEADS["cl-then-te"], BAD_HEADS["http-2.0"]], ids=["400", "505"])
def test_error_before_close_announces_connection_close(proxy, origin, case):
    """
    RFC 9112 §9.6: a response after which the proxy closes the connection
    carries "Connection: close", so the client knows not to reuse it.
    """
    template, status = case
    reply = expect_rejected(proxy, origin, fill(template, origin), status)
    assert reply.header("connection") == "close"


@pytest.mark.parametrize("coding", [b"gzip", b"chunked, gzip", b"identity"])
def test_chunked_not_final_is_400(proxy, origin, coding):
    """
    RFC 9112 §6.3 item 4: a request Transfer-Encoding whose final coding is
    not chunked leaves the body length unknown; the server MUST answer 400
    and close the connection.
    """
    expect_rejected(proxy, origin, fill(_te(coding), origin), 400)


def test_http10_request_with_transfer_encoding_ends_the_connection(proxy, origin):
    """
    RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty
    framing; the connection is closed after it, so the request hidden in
    what the proxy took for its body never reaches the origin.
    """
    data = fill(b"POST URL HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"0\r\n\r\nGET URLsmuggled HTTP/1.0\r\n\r\n", origin)
    with Client(proxy.port) as client:
        client.send(data)
        client.read_response()
        client.read_to_close()
    assert "/smuggled" not in [r.target for r in origin.requests]
    assert_ran_clean(proxy)


# -- bad chunked request bodies: cut, and nothing smuggled ----------------------

BAD_CHUNKS = {
    "non-hex-size": b"zz\r\n",
    "size-17-hex-digits": b"10000000000000000\r\nhello\r\n",
    "space-before-size": b" 5\r\nhello\r\n",
    "space-after-size": b"5 \r\nhello\r\n",
    "space-inside-size": b"5 5\r\nhello\r\n",
    "negative-size": b"-5\r\nhello\r\n",
    "0x-prefix": b"0x5\r\nhello\r\n",
    "empty-size-line": b"\r\nhello\r\n",
    "bare-lf-size-line": b"5\nhello\r\n",
    "no-crlf-after-data": b"5\r\nhelloXX\r\n",
    "bare-lf-after-data": b"5\r\nhello\n",
    "trailer-obs-fold": b"0\r\nX-T: 1\r\n 2\r\n\r\n",
    "trailer-no-colon": b"0\r\nX-T 1\r\n\r\n",
}
SMUGGLED = b"0\r\n\r\nGET URLsmuggled HTTP/1.1\r\nHost: h\r\n\r\n"
CHUNKED_POST = b"POST URLupload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"


def expect_body_cut(origin, recorder: RawRecorder, client: Client, rest: bytes) -> None:
    """
    After *rest* the proxy answers 400 and closes the client connection;
    the upstream connection is closed too, and carried at most one request
    head and no smuggled request.
    """
    client.send(rest)
    reply = client.read_response()
    assert reply.status == 400, reply.raw_head
    assert_proxy_status(reply, "http_request_error")
    client.read_to_close()
    wait_until(lambda: recorder.finished == origin.connections, what="the upstream connection to close")
    assert b"smuggled" not in recorder.data
    assert recorder.data.count(b" HTTP/1.1\r\n") <= 1
    assert origin.connections <= 1


@pytest.mark.parametrize("bad", BAD_CHUNKS.values(), ids=BAD_CHUNKS.keys())
def test_bad_chunk_mid_body_cuts_both_sides(proxy, origin, bad):
    """
    RFC 9112 §7.1: a malformed chunk after a good one, arriving once the
    request is already flowing upstream, gets 400 and a close; the upstream
    connection is closed too, so the bytes after it can never be read as a
    second request by anyone.
    """
    recorder = RawRecorder(origin)
    with Client(proxy.port) as client:
        client.send(fill(CHUNKED_POST, origin) + b"5\r\nhello\r\n")
        wait_until(lambda: b"hello" in recorder.data, what="the first chunk at the origin")
        assert origin.connections == 1
        expect_body_cut(origin, recorder, client, bad + fill(SMUGGLED, origin))
    assert_ran_clean(proxy)


def test_bad_chunk_in_first_packet(proxy, origin):
    """A malformed chunk that arrives together with the head is refused the same way."""
    recorder = RawRecorder(origin)
    with Client(proxy.port) as client:
        expect_body_cut(origin, recorder, client, fill(CHUNKED_POST + b"5\r\nhello\r\nzz\r\n" + SMUGGLED, origin))
    assert_ran_clean(proxy)


# -- limits: 414 and 431 (RFC 9112 §3, RFC 6585 §5) -----------------------------

LIMITS = {"max_request_line": 200, "max_header_bytes": 1000, "max_header_fields": 10}


def _padded_get(origin, line_length: int, fields: list[bytes] = ()) -> tuple[bytes, str]:
    """A GET whose request line is exactly *line_length* bytes; returns it and its path."""
    prefix = f"GET {origin.url('/')}".encode()
    path = "/" + "a" * (line_length - len(prefix) - len(" HTTP/1.1"))
    line = f"GET {origin.url(path)} HTTP/1.1".encode()
    assert len(line) == line_length
    return line + b"\r\n" + b"".join(f + b"\r\n" for f in [b"Host: h", *fields]) + b"\r\n", path


def _fields(count: int, size: int = 5) -> list[bytes]:
    return [b"X-F%d: %s" % (i, b"v" * size) for i in range(count)]


def test_request_line_at_limit_is_relayed(start_proxy, origin):
    """A request line of exactly limits.max_request_line bytes is accepted."""
    proxy = start_proxy(limits=LIMITS)
    data, path = _padded_get(origin, LIMITS["max_request_line"])
    assert exchange(proxy, data).body == b"hello"
    assert [r.target for r in origin.requests] == [path]


@pytest.mark.parametrize("complete", [True, False], ids=["whole-head", "line-unfinished"])
def test_request_line_over_limit_is_414(start_proxy, origin, complete):
    """
    RFC 9112 §3, RFC 9110 §15.5.15: one byte over limits.max_request_line
    gets 414 and a close, also while the line is still arriving (the proxy
    does not wait for its end).
    """
    proxy = start_proxy(limits=LIMITS)
    data, _ = _padded_get(origin, LIMITS["max_request_line"] + 1)
    expect_rejected(proxy, origin, data if complete else data[:LIMITS["max_request_line"] + 2], 414)


def test_header_fields_at_limit_are_relayed(start_proxy, origin):
    """Exactly limits.max_header_fields field lines (Host included) are accepted."""
    proxy = start_proxy(limits=LIMITS)
    data, _ = _padded_get(origin, 50, _fields(LIMITS["max_header_fields"] - 1))
    assert exchange(proxy, data).body == b"hello"
    assert origin.requests[0].header("x-f8") == "vvvvv"


def test_too_many_header_fields_is_431(start_proxy, origin):
    """RFC 6585 §5: one field line more than limits.max_header_fields gets 431 and a close."""
    proxy = start_proxy(limits=LIMITS)
    data, _ = _padded_get(origin, 50, _fields(LIMITS["max_header_fields"]))
    expect_rejected(proxy, origin, data, 431)


@pytest.mark.parametrize("complete", [True, False], ids=["whole-head", "head-unfinished"])
def test_head_over_max_header_bytes_is_431(start_proxy, origin, complete):
    """
    RFC 6585 §5: a head larger than limits.max_header_bytes gets 431 and a
    close, also while it is still arriving.
    """
    proxy = start_proxy(limits=LIMITS)
    data, _ = _padded_get(origin, 50, _fields(3, size=400))
    assert len(data) > LIMITS["max_header_bytes"] + 100
    expect_rejected(proxy, origin, data if complete else data[:-4], 431)


# -- valid input, split and pipelined -------------------------------------------

BYTEWISE = {
    "get": (b"GET URLbytes/10?seed=7 HTTP/1.1\r\nHost: h\r\n\r\n", 0, body_bytes(10, seed=7)),
    "post-length": (b"POST URL HTTP/1.1\r\nHost: h\r\nContent-Length: 7\r\n\r\npayload", 7, b"hello"),
    "post-chunked": (b"POST URL HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3;ext=1\r\npay\r\n4\r\nload\r\n0\r\nX-Trailer: t\r\n\r\n", 7, b"hello"),
}


@pytest.mark.parametrize("template,body_length,expected", BYTEWISE.values(), ids=BYTEWISE.keys())
def test_request_sent_one_byte_at_a_time_is_relayed_once(proxy, origin, template, body_length, expected):
    """A valid request delivered one byte per send is relayed exactly once, body intact."""
    with Client(proxy.port) as client:
        for byte in fill(template, origin):
            client.send(bytes([byte]))
        reply = client.read_response()
    assert (reply.status, reply.body) == (200, expected)
    (seen,) = origin.requests
    assert origin.connections == 1
    assert seen.body_length == body_length
    if body_length:
        assert seen.body_sha256 == hashlib.sha256(b"payload").hexdigest()


def test_three_pipelined_requests_answered_in_order(proxy, origin):
    """
    RFC 9112 §9.3.2: three requests in one send (one with a body) get three
    responses in request order; the origin sees each once, in order.
    """
    data = fill(b"GET URLbytes/10?seed=1 HTTP/1.1\r\nHost: h\r\n\r\n"
                b"POST URLupload HTTP/1.1\r\nHost: h\r\nContent-Length: 7\r\n\r\npayload"
                b"GET URLbytes/30?seed=3&framing=chunked HTTP/1.1\r\nHost: h\r\n\r\n", origin)
    with Client(proxy.port) as client:
        client.send(data)
        bodies = [client.read_response().body for _ in range(3)]
    assert bodies == [body_bytes(10, seed=1), b"hello", body_bytes(30, seed=3)]
    assert [(r.method, r.target, r.body_length) for r in origin.requests] == [
        ("GET", "/bytes/10?seed=1", 0), ("POST", "/upload", 7), ("GET", "/bytes/30?seed=3&framing=chunked", 0)]


@pytest.mark.parametrize("split", [False, True], ids=["same-send", "crlf-sent-alone"])
def test_empty_line_before_request_is_ignored(proxy, origin, split):
    """
    RFC 9112 §2.2: a CRLF before a request-line (as some clients send after
    a body) is ignored, before the first request and between pipelined ones.
    """
    first = fill(b"GET URLbytes/5?seed=1 HTTP/1.1\r\nHost: h\r\n\r\n", origin)
    second = fill(b"GET URLbytes/6?seed=2 HTTP/1.1\r\nHost: h\r\n\r\n", origin)
    with Client(proxy.port) as client:
        if split:
            client.send(b"\r\n")
        client.send((b"" if split else b"\r\n") + first + b"\r\n" + second)
        bodies = [client.read_response().body for _ in range(2)]
    assert bodies == [body_bytes(5, seed=1), body_bytes(6, seed=2)]
    assert [r.target for r in origin.requests] == ["/bytes/5?seed=1", "/bytes/6?seed=2"]


# -- malformed responses from the origin ----------------------------------------

BAD_RESPONSES = {
    "status-not-digits": b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n",
    "status-no-space": b"HTTP/1.1 200OK\r\nContent-Length: 0\r\n\r\n",
    "status-two-digits": b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
    "not-http": b"ICY 200 OK\r\nContent-Length: 0\r\n\r\n",
    "http-2.0": b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "cl-and-te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "cl-differing": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "cl-letters": b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
    "te-gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n 2\r\nContent-Length: 5\r\n\r\nhello",
    "bare-lf-in-field": b"HTTP/1.1 200 OK\r\nX-A: 1\nX-B: 2\r\nContent-Length: 5\r\n\r\nhello",
    "nul-in-field": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 5\r\n\r\nhello",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\nhello",
    "unasked-101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
}


def expect_bad_gateway(proxy, origin, error: str) -> None:
    """A GET through the proxy gets 502 with Proxy-Status *error*, naming the origin."""
    reply = exchange(proxy, fill(b"GET URL HTTP/1.1\r\nHost: h\r\n\r\n", origin))
    assert reply.status == 502, reply.raw_head
    assert_proxy_status(reply, error, f"127.0.0.1:{origin.port}")
    assert_ran_clean(proxy)


@pytest.mark.parametrize("response", BAD_RESPONSES.values(), ids=BAD_RESPONSES.keys())
def test_malformed_response_head_is_502(proxy, origin, response):
    """
    RFC 9110 §15.6.3: an invalid response head from the origin (nothing of
    it relayed yet) becomes 502 with Proxy-Status http_protocol_error
    (RFC 9209 §2.3), naming the origin.
    """
    scripted_origin(origin, response)
    expect_bad_gateway(proxy, origin, "http_protocol_error")


@pytest.mark.parametrize("complete", [True, False], ids=["whole-head", "head-unfinished"])
def test_response_head_over_limit_is_502(start_proxy, origin, complete):
    """
    limits.max_header_bytes bounds response heads too: a larger one gets
    502 with Proxy-Status http_response_header_section_size (RFC 9209
    §2.3), whether or not its end has arrived.
    """
    proxy = start_proxy(limits=LIMITS)
    head = b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 2000 + b"\r\nContent-Length: 5\r\n\r\nhello"
    scripted_origin(origin, head if complete else head[:1500])
    expect_bad_gateway(proxy, origin, "http_response_header_section_size")


@pytest.mark.parametrize("ending", [b"zz\r\nmore\r\n0\r\n\r\n", None], ids=["bad-chunk", "origin-closes"])
@pytest.mark.parametrize("version", [
    b"1.1",
    b"1.0",
])
def test_response_cut_mid_body_never_looks_complete(proxy, origin, version, ending):
    """
    RFC 9112 §7.1, §8: when a chunked response breaks off mid-body (a
    malformed chunk, or the origin closing), the client can tell: an
    HTTP/1.1 client never gets a last chunk; an HTTP/1.0 client, whose body
    ends with the connection, gets a reset rather than a clean close.
    """
    go_on = threading.Event()
    scripted_origin(origin, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
                    go_on, ending)
    with Client(proxy.port) as client:
        client.send(fill(b"GET URL HTTP/%s\r\nHost: h\r\n\r\n" % version, origin))
        assert client.read_head().status == 200
        assert client.read_until(b"hello") == (b"5\r\n" if version == b"1.1" else b"")
        go_on.set()
        assert client.read_to_close() == (b"\r\n" if version == b"1.1" else b"")
        if version == b"1.0":
            assert client.reset, "the cut close-delimited body ended with a clean close"
    assert_ran_clean(proxy)
