"""
What the proxy changes on the wire as an intermediary (RFC 9110 §7.6,
RFC 9112 §9): Via, hop-by-hop fields in both directions, Host from the
target, Max-Forwards, loop detection, 1xx and Expect: 100-continue,
persistence for HTTP/1.0 and HTTP/1.1 clients, IPv6 and name targets, and
trailers; everything else passes through unchanged.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess

import pytest

from rawhttp import Client, assert_proxy_status, assert_ran_clean, exchange, fill
from support import Origin, OriginConnection, body_bytes


def request(origin, *fields: str, method: str = "GET", path: str = "/", version: str = "HTTP/1.1",
            body: bytes = b"", host: str | None = None) -> bytes:
    """A raw absolute-form request to *origin*, with ``Host: h`` added for HTTP/1.1."""
    lines = [f"{method} {origin.url(path) if host is None else f'http://{host}{path}'} {version}"]
    if version == "HTTP/1.1" and not any(f.lower().startswith("host:") for f in fields):
        lines.append("Host: h")
    return ("\r\n".join([*lines, *fields]) + "\r\n\r\n").encode("latin-1") + body


def respond_with(origin, response: bytes) -> None:
    """Make *origin* answer every request with the raw *response* (and keep the connection)."""
    def handler(conn, received) -> bool:
        conn.send(response)
        return True
    origin.handler = handler


def fields_named(pairs, *names: str) -> list[tuple[str, str]]:
    """The (name, value) pairs whose name is one of *names* (any case), in order, as str."""
    wanted = {n.lower() for n in names}
    out = []
    for name, value in pairs:
        name, value = (x.decode("latin-1") if isinstance(x, bytes) else x for x in (name, value))
        if name.lower() in wanted:
            out.append((name, value))
    return out


# -- Via (RFC 9110 §7.6.3) -------------------------------------------------------

@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_via_appended_to_request(proxy, origin, version):
    """
    RFC 9110 §7.6.3: the proxy appends "<received-protocol> proxyframe"
    after the Via entries the client sent, so earlier hops stay first.
    """
    exchange(proxy, request(origin, "Via: 1.0 fred, 1.1 p.example", version=version))
    (seen,) = origin.requests
    assert fields_named(seen.headers, "via") == [
        ("Via", "1.0 fred, 1.1 p.example"), ("Via", f"{version[5:]} proxyframe")]


@pytest.mark.parametrize("status_line,via", [("HTTP/1.1 200 OK", "1.1"), ("HTTP/1.0 200 OK", "1.0")])
def test_via_appended_to_response(proxy, origin, status_line, via):
    """
    RFC 9110 §7.6.3: the response gets the proxy's Via entry, with the
    protocol version the origin answered with, after the origin's own.
    """
    respond_with(origin, f"{status_line}\r\nVia: 1.1 cache.example\r\nContent-Length: 5\r\n\r\nhello".encode())
    reply = exchange(proxy, request(origin))
    assert reply.body == b"hello"
    assert reply.get_all("via") == ["1.1 cache.example", f"{via} proxyframe"]


# -- hop-by-hop fields (RFC 9110 §7.6.1) -------------------------------------------

HOP_BY_HOP = {"connection", "keep-alive", "te", "upgrade", "proxy-connection", "proxy-authorization"}


def test_hop_by_hop_request_fields_removed(proxy, origin):
    """
    RFC 9110 §7.6.1: Connection, the fields it names (on every Connection
    line), Keep-Alive, TE, Upgrade, Proxy-Connection and the proxy's own
    credentials do not reach the origin; other fields do.
    """
    exchange(proxy, request(
        origin, "Connection: close, X-Secret", "Connection: X-Other", "Keep-Alive: timeout=5",
        "TE: trailers", "Upgrade: websocket", "Proxy-Connection: keep-alive",
        "Proxy-Authorization: Basic dXNlcjpwYXNz", "X-Secret: 1", "X-Other: 2", "X-Kept: 3"))
    (seen,) = origin.requests
    assert not seen.header_names() & (HOP_BY_HOP | {"x-secret", "x-other"}), seen.raw_head
    assert seen.header("x-kept") == "3"


def test_hop_by_hop_response_fields_removed(proxy, origin):
    """
    RFC 9110 §7.6.1: the origin's Connection, the fields it names,
    Keep-Alive, Proxy-Connection and Upgrade do not reach the client.
    """
    respond_with(origin, b"HTTP/1.1 200 OK\r\nConnection: X-Internal, Keep-Alive\r\nKeep-Alive: timeout=5\r\n"
                         b"Proxy-Connection: keep-alive\r\nUpgrade: h2c\r\nX-Internal: 1\r\nX-Kept: 2\r\n"
                         b"Content-Length: 5\r\n\r\nhello")
    with Client(proxy.port) as client:
        client.send(request(origin))
        reply = client.read_response()
        assert not reply.names() & (HOP_BY_HOP | {"x-internal"}), reply.raw_head
        assert reply.header("x-kept") == "2"
        # The origin's Connection options were its own: the client connection persists.
        client.send(request(origin))
        assert client.read_response().body == b"hello"


def test_connection_option_cannot_remove_framing_or_host(proxy, origin):
    """
    RFC 9110 §7.6.1 forbids naming end-to-end fields in Connection; a
    client that names Content-Length and Host does not get them removed
    (which would forward a body without its length: request smuggling).
    The origin gets one request, its body intact, and the Host.
    """
    exchange(proxy, request(origin, "Connection: Content-Length, Host", "Content-Length: 7", method="POST",
                            body=b"payload"))
    (seen,) = origin.requests
    assert (seen.method, seen.header("content-length"), seen.body_length) == ("POST", "7", 7)
    assert seen.body_sha256 == hashlib.sha256(b"payload").hexdigest()
    assert seen.header("host") == f"127.0.0.1:{origin.port}"


def test_transfer_encoding_is_restated_per_hop(proxy, origin):
    """
    RFC 9112 §6.1: Transfer-Encoding belongs to a hop; a chunked request
    and a chunked response each arrive with exactly one
    "Transfer-Encoding: chunked" line and their body intact.
    """
    data = request(origin, "Transfer-Encoding: chunked", method="POST", path="/bytes/300?framing=chunked&seed=2",
                   body=b"4\r\nbody\r\n0\r\n\r\n")
    reply = exchange(proxy, data)
    assert reply.get_all("transfer-encoding") == ["chunked"]
    assert reply.body == body_bytes(300, seed=2)
    (seen,) = origin.requests
    assert fields_named(seen.headers, "transfer-encoding") == [("Transfer-Encoding", "chunked")]
    assert seen.body_sha256 == hashlib.sha256(b"body").hexdigest()


def test_proxy_authorization_never_forwarded(proxy, origin):
    """
    RFC 9110 §11.7.2: Proxy-Authorization is for this proxy only; it does
    not reach the origin, in any casing, nor as a trailer.
    """
    data = request(origin, "proxy-AUTHORIZATION: Basic YTpi", "Authorization: Bearer origin-token",
                   "Transfer-Encoding: chunked", method="POST",
                   body=b"2\r\nhi\r\n0\r\nProxy-Authorization: Basic YTpi\r\nX-Sum: 1\r\n\r\n")
    assert exchange(proxy, data).body == b"hello"
    (seen,) = origin.requests
    assert "proxy-authorization" not in seen.header_names()
    assert b"YTpi" not in seen.raw_head
    assert seen.header("authorization") == "Bearer origin-token"
    assert seen.trailers == [("X-Sum", "1")]


@pytest.mark.parametrize("version,fields", [("HTTP/1.1", ["Host: evil.example:81"]), ("HTTP/1.0", [])],
                         ids=["different-host", "no-host-http10"])
def test_host_taken_from_target(proxy, origin, version, fields):
    """
    RFC 9112 §3.2.2: a proxy ignores the client's Host for an absolute-form
    target and sends exactly one Host, taken from the target.
    """
    exchange(proxy, request(origin, *fields, version=version))
    (seen,) = origin.requests
    assert fields_named(seen.headers, "host") == [("Host", f"127.0.0.1:{origin.port}")]


def test_end_to_end_request_fields_preserved(proxy, origin):
    """
    RFC 9110 §5.3: end-to-end fields reach the origin unchanged: repeated
    lines stay separate and in order, names keep their casing.
    """
    sent = [("X-Multi", "a"), ("x-other", "Mixed Case, value"), ("x-MULTI", "b"), ("Cookie", "a=1"),
            ("Cookie", "b=2"), ("Accept", "*/*;q=0.1")]
    exchange(proxy, request(origin, *(f"{n}: {v}" for n, v in sent)))
    (seen,) = origin.requests
    assert fields_named(seen.headers, "x-multi", "x-other", "cookie", "accept") == sent


def test_end_to_end_response_fields_preserved(proxy, origin):
    """
    RFC 9110 §5.3, RFC 6265 §3: two Set-Cookie lines from the origin arrive
    as two lines (never joined), with the other fields in order and casing.
    """
    respond_with(origin, b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1; Path=/\r\nx-CUSTOM: 1\r\n"
                         b"set-cookie: b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT\r\nX-Custom: 2\r\n"
                         b"Content-Length: 5\r\n\r\nhello")
    reply = exchange(proxy, request(origin))
    assert fields_named(reply.fields, "set-cookie", "x-custom") == [
        ("Set-Cookie", "a=1; Path=/"), ("x-CUSTOM", "1"),
        ("set-cookie", "b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT"), ("X-Custom", "2")]


# -- Max-Forwards (RFC 9110 §7.6.2) ---------------------------------------------

def test_trace_with_max_forwards_zero_answered_by_proxy(proxy, origin):
    """
    RFC 9110 §7.6.2, §9.3.8: TRACE with Max-Forwards: 0 is answered by the
    proxy with 200 message/http echoing the request, less credentials;
    the origin sees nothing and the connection stays usable.
    """
    data = request(origin, "Max-Forwards: 0", "X-Echo: yes", "Proxy-Authorization: Basic c2VjcmV0",
                   "Authorization: Basic c2VjcmV0", "Cookie: session=c2VjcmV0", method="TRACE", path="/t")
    with Client(proxy.port) as client:
        client.send(data)
        reply = client.read_response()
        assert reply.status == 200
        assert reply.header("content-type") == "message/http"
        assert reply.body.startswith(f"TRACE {origin.url('/t')} HTTP/1.1\r\n".encode())
        assert b"X-Echo: yes\r\n" in reply.body and b"Max-Forwards: 0\r\n" in reply.body
        assert b"c2VjcmV0" not in reply.body
        assert origin.connections == 0
        client.send(request(origin))
        assert client.read_response().body == b"hello"


def test_options_with_max_forwards_zero_answered_by_proxy(proxy, origin):
    """RFC 9110 §7.6.2: OPTIONS with Max-Forwards: 0 is answered by the proxy; the origin sees nothing."""
    reply = exchange(proxy, request(origin, "Max-Forwards: 0", method="OPTIONS"))
    assert reply.status == 200
    assert origin.connections == 0


@pytest.mark.parametrize("method", ["TRACE", "OPTIONS"])
def test_max_forwards_decremented(proxy, origin, method):
    """RFC 9110 §7.6.2: a Max-Forwards above 0 is forwarded decremented by one."""
    assert exchange(proxy, request(origin, "Max-Forwards: 3", method=method)).body == b"hello"
    (seen,) = origin.requests
    assert fields_named(seen.headers, "max-forwards") == [("Max-Forwards", "2")]


# -- loop detection --------------------------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "0.0.0.0", "[::ffff:127.0.0.1]"])
def test_request_to_the_proxy_itself_is_refused(proxy, origin, host):
    """
    RFC 9110 §7.6.3 (loops): a request whose target is the proxy's own
    listening address gets 403 with Proxy-Status proxy_loop_detected
    instead of being relayed to itself; the proxy stays healthy.
    """
    reply = exchange(proxy, request(origin, host=f"{host}:{proxy.port}"))
    assert reply.status == 403, reply.raw_head
    assert_proxy_status(reply, "proxy_loop_detected", f"{host.strip('[]')}:{proxy.port}")
    assert exchange(proxy, request(origin)).body == b"hello"
    assert_ran_clean(proxy)


# -- 1xx and Expect: 100-continue (RFC 9110 §10.1.1, §15.2) -----------------------

def continue_origin(origin) -> list[bytes]:
    """
    ``origin.raw``: reads a head, sends 100 Continue when it asked for one,
    reads the Content-Length body and answers with its sha256 (hex).

    :returns: the list the request heads are appended to.
    """
    heads: list[bytes] = []

    def serve(sock: socket.socket) -> None:
        sock.settimeout(10)
        conn = OriginConnection(sock, 0)
        head = conn.read_head()
        heads.append(head)
        if b"\r\nexpect: 100-continue" in head.lower():
            conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        digest = hashlib.sha256()
        conn.read_exact(length, digest.update)
        answer = digest.hexdigest().encode()
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))

    origin.raw = serve
    return heads


def test_expect_100_continue_relayed(proxy, origin):
    """
    RFC 9110 §10.1.1: the client sends only the head with Expect:
    100-continue; the origin's 100 Continue reaches it, then the body goes
    through and the final response follows.
    """
    heads = continue_origin(origin)
    body = body_bytes(5000, seed=8)
    with Client(proxy.port, timeout=5) as client:
        client.send(request(origin, "Expect: 100-continue", f"Content-Length: {len(body)}", method="POST"))
        assert client.read_response().status == 100
        client.send(body)
        reply = client.read_response()
    assert (reply.status, reply.body) == (200, hashlib.sha256(body).hexdigest().encode())
    (head,) = heads
    assert b"\r\nExpect: 100-continue" in head


def test_curl_post_with_expect_is_byte_exact(proxy, origin, curl, tmp_path):
    """
    curl uploading a POST body over 1 KiB sends Expect: 100-continue by
    itself and waits for the 100 (here up to 20 s, past the test's
    deadline): the relayed 100 lets it send at once, and the origin gets
    the body byte for byte.
    """
    heads = continue_origin(origin)
    body = body_bytes(200_000, seed=9)
    (tmp_path / "body").write_bytes(body)
    out = subprocess.run([curl, "-sS", "-x", proxy.url, "--expect100-timeout", "20",
                          "-X", "POST", "-T", str(tmp_path / "body"), origin.url("/upload")],
                         capture_output=True, timeout=10, check=True)
    assert out.stdout == hashlib.sha256(body).hexdigest().encode()
    assert b"\r\nExpect: 100-continue" in heads[0]


@pytest.mark.parametrize("version,statuses", [("HTTP/1.1", [103, 200]), ("HTTP/1.0", [200])])
def test_interim_103_relayed_to_http11_clients_only(proxy, origin, version, statuses):
    """
    RFC 9110 §15.2: a 1xx from the origin is forwarded to an HTTP/1.1
    client (with its fields) and never to an HTTP/1.0 client.
    """
    respond_with(origin, b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                         b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    with Client(proxy.port) as client:
        client.send(request(origin, version=version))
        replies = [client.read_response() for _ in statuses]
    assert [r.status for r in replies] == statuses
    assert replies[-1].body == b"hello"
    if len(replies) == 2:
        assert replies[0].header("link") == "</style.css>; rel=preload"


# -- persistence (RFC 9112 §9.3) ------------------------------------------------------

@pytest.mark.parametrize("option", ["Connection: keep-alive", "Proxy-Connection: keep-alive"])
def test_http10_keep_alive(proxy, origin, option):
    """
    RFC 9112 §9.3, Appendix C.2.2: an HTTP/1.0 client asking for keep-alive
    gets "Connection: keep-alive" on a Content-Length response and can send
    a second request on the same connection.
    """
    with Client(proxy.port) as client:
        for _ in range(2):
            client.send(request(origin, option, version="HTTP/1.0"))
            reply = client.read_response()
            assert (reply.body, reply.header("connection")) == (b"hello", "keep-alive")
    assert len(origin.requests) == 2


@pytest.mark.parametrize("version,fields", [("HTTP/1.1", ["Connection: close"]), ("HTTP/1.0", [])])
def test_close_requested_means_closed(proxy, origin, version, fields):
    """
    RFC 9112 §9.6: after "Connection: close" (or an HTTP/1.0 request
    without keep-alive) the response says "Connection: close" and the
    proxy closes the connection.
    """
    with Client(proxy.port) as client:
        client.send(request(origin, *fields, version=version))
        reply = client.read_response()
        assert (reply.body, reply.header("connection")) == (b"hello", "close")
        assert client.read_to_close() == b""


# -- targets --------------------------------------------------------------------------

@pytest.fixture
def origin6():
    try:
        server = Origin(family=socket.AF_INET6, host="::1")
    except OSError as e:
        pytest.skip(f"no IPv6 loopback: {e}")
    yield server
    server.close()


def test_ipv6_literal_target(proxy, origin6):
    """RFC 3986 §3.2.2: http://[::1]:PORT/ reaches an origin on ::1, with Host "[::1]:PORT"."""
    assert exchange(proxy, request(origin6, path="/v6")).body == b"hello"
    (seen,) = origin6.requests
    assert (seen.target, seen.header("host")) == ("/v6", f"[::1]:{origin6.port}")


def test_name_target(proxy, origin):
    """A host name target (localhost) is resolved and relayed, with Host naming it."""
    assert exchange(proxy, request(origin, host=f"localhost:{origin.port}", path="/n")).body == b"hello"
    (seen,) = origin.requests
    assert (seen.target, seen.header("host")) == ("/n", f"localhost:{origin.port}")


# -- trailers (RFC 9110 §6.5, RFC 9112 §7.1.2) ---------------------------------------

def test_response_trailers_forwarded_to_chunked_client(proxy, origin):
    """The trailer fields of a chunked response reach an HTTP/1.1 client after the body."""
    respond_with(origin, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
                         b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\nX-Second: 2\r\n\r\n")
    reply = exchange(proxy, request(origin))
    assert reply.body == b"hello"
    assert reply.trailers == [(b"X-Checksum", b"abc"), (b"X-Second", b"2")]
    assert reply.header("trailer") == "X-Checksum"


def test_request_trailers_forwarded(proxy, origin):
    """The trailer fields of a chunked request reach the origin."""
    exchange(proxy, fill(b"POST URL HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"2\r\nhi\r\n0\r\nX-Req-Trailer: v\r\n\r\n", origin))
    (seen,) = origin.requests
    assert (seen.body_length, seen.trailers) == (2, [("X-Req-Trailer", "v")])
