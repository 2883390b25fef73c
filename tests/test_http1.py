"""
Sans-I/O tests of the framing core (:mod:`proxyframe.http1`), of what an
intermediary changes (:mod:`proxyframe.forwarding`) and of
:class:`proxyframe.exchange.Headers`: bytes in, values or
:class:`ProtocolError` out, no sockets and no reactor.
"""

from __future__ import annotations

import random

import pytest

from proxyframe.exchange import Headers, Request, Response
from proxyframe.forwarding import (
    connection_tokens,
    parse_absolute_form,
    parse_authority_form,
    request_head_for_upstream,
    response_head_for_client,
    strip_hop_by_hop,
)
from proxyframe.http1 import (
    LAST_CHUNK,
    ChunkedReader,
    CloseDelimitedReader,
    ContentLengthReader,
    ProtocolError,
    encode_chunk,
    parse_request_head,
    parse_response_head,
    request_body_reader,
    response_body_reader,
)

MAX_FIELDS = 100
REQUEST_LINE = b"GET http://example.com/ HTTP/1.1"
NEXT_MESSAGE = b"GET http://example.com/next HTTP/1.1\r\nHost: example.com\r\n\r\n"


def head(*lines: bytes) -> bytes:
    """A head as the caller hands it over: lines joined by CRLF, no final blank line."""
    return b"\r\n".join(lines)


def raises_status(status: int | None, call, *args):
    """Assert that ``call(*args)`` raises ProtocolError with *status* (any status when None)."""
    with pytest.raises(ProtocolError) as info:
        call(*args)
    if status is not None:
        assert info.value.status == status, info.value.detail


def request(target: bytes = b"http://example.com/", fields=(), method: bytes = b"GET",
            version: bytes = b"1.1") -> Request:
    return Request(method, target, version, Headers(list(fields)))


def response(status: int = 200, fields=(), version: bytes = b"1.1") -> Response:
    return Response(status, b"Whatever", Headers(list(fields)), version)


# -- request and response heads (RFC 9112 §3, §4, §5) ------------------------

def test_request_head_fields_are_parsed_in_order_with_casing():
    """A valid request head yields method, target, version and the fields in order, names as sent."""
    req = parse_request_head(head(REQUEST_LINE, b"Host: example.com", b"X-Mixed-Case: 1",
                                  b"x-mixed-case: 2"), MAX_FIELDS)
    assert (req.method, req.target, req.version) == (b"GET", b"http://example.com/", b"1.1")
    assert list(req.headers) == [(b"Host", b"example.com"), (b"X-Mixed-Case", b"1"), (b"x-mixed-case", b"2")]


@pytest.mark.parametrize("line, method, version", [
    (b"FOO-BAR http://h/ HTTP/1.1", b"FOO-BAR", b"1.1"),
    (b"M-SEARCH* http://h/ HTTP/1.1", b"M-SEARCH*", b"1.1"),
    (b"get http://h/ HTTP/1.1", b"get", b"1.1"),
    (b"GET http://h/ HTTP/1.0", b"GET", b"1.0"),
])
def test_request_line_accepts_extension_methods_and_http10(line, method, version):
    """Any token is a method (RFC 9110 §9.1; case-sensitive, kept as sent); HTTP/1.0 and 1.1 are accepted."""
    req = parse_request_head(head(line), MAX_FIELDS)
    assert (req.method, req.version) == (method, version)


@pytest.mark.parametrize("line, value", [
    (b"X-A: plain", b"plain"),
    (b"X-A:no-space", b"no-space"),
    (b"X-A: \t  inner  space \t ", b"inner  space"),
    (b"X-A:", b""),
    (b"X-A:   ", b""),
    (b"X-A: caf\xc3\xa9 \x80\xff", b"caf\xc3\xa9 \x80\xff"),
    (b"X-A: a\tb", b"a\tb"),
])
def test_field_values_trim_ows_and_keep_obs_text(line, value):
    """OWS around a field value is removed; inner whitespace and obs-text stay (RFC 9112 §5, RFC 9110 §5.5)."""
    req = parse_request_head(head(REQUEST_LINE, line), MAX_FIELDS)
    assert req.headers.get(b"x-a") == value


@pytest.mark.parametrize("lines, status", [
    ((REQUEST_LINE, b"X-A: a", b" folded"), 400),                     # obs-fold, RFC 9112 §5.2
    ((REQUEST_LINE, b"X-A: a", b"\tfolded"), 400),
    ((REQUEST_LINE, b"X-A: a\rb"), 400),                              # bare CR
    ((REQUEST_LINE, b"X-A: a\nb"), 400),                              # bare LF
    ((b"GET http://h/ HTTP/1.1\nHost: h",), 400),                     # LF as line end
    ((REQUEST_LINE, b"X-A: a\x00b"), 400),                            # NUL
    ((REQUEST_LINE, b"X-\x00A: b"), 400),
    ((REQUEST_LINE, b"X-A: a\x7fb"), 400),                            # DEL is a control
    ((REQUEST_LINE, b"X-A: a\x1bb"), 400),
    ((REQUEST_LINE, b"Host : example.com"), 400),                     # space before colon, §5.1
    ((REQUEST_LINE, b"Host\t: example.com"), 400),
    ((REQUEST_LINE, b"Host example.com"), 400),                       # no colon
    ((REQUEST_LINE, b": empty-name"), 400),
    ((REQUEST_LINE, b"X(A): b"), 400),                                # not a token
    ((b"GET  http://h/ HTTP/1.1",), 400),                             # two spaces
    ((b" GET http://h/ HTTP/1.1",), 400),
    ((b"GET http://h/ HTTP/1.1 ",), 400),
    ((b"GET http://h/",), 400),                                       # no version (HTTP/0.9)
    ((b"GET http://h/ http/1.1",), 400),
    ((b"GE(T http://h/ HTTP/1.1",), 400),
    ((b"GET http://h/\x00 HTTP/1.1",), 400),
    ((b"GET http://h/ HTTP/11.1",), 400),
    ((b"GET http://h/ HTTP/2.0",), 505),
    ((b"GET http://h/ HTTP/1.2",), 505),
    ((b"GET http://h/ HTTP/0.9",), 505),
])
def test_malformed_request_head_is_rejected(lines, status):
    """Each malformed request head raises ProtocolError with the status the client gets (RFC 9112 §2-§5)."""
    raises_status(status, parse_request_head, head(*lines), MAX_FIELDS)


def test_field_count_limit():
    """max_fields field lines are accepted; one more gives 431 (RFC 6585 §5)."""
    lines = [b"X-F%d: v" % i for i in range(MAX_FIELDS)]
    assert len(parse_request_head(head(REQUEST_LINE, *lines), MAX_FIELDS).headers) == MAX_FIELDS
    raises_status(431, parse_request_head, head(REQUEST_LINE, *lines, b"X-Last: v"), MAX_FIELDS)


@pytest.mark.parametrize("line, status, reason, version", [
    (b"HTTP/1.1 200 OK", 200, b"OK", b"1.1"),
    (b"HTTP/1.0 404 Not Found", 404, b"Not Found", b"1.0"),
    (b"HTTP/1.1 204 ", 204, b"", b"1.1"),
    (b"HTTP/1.1 204", 204, b"", b"1.1"),
    (b"HTTP/1.1 103 Early Hints", 103, b"Early Hints", b"1.1"),
    (b"HTTP/1.1 599 x\ty", 599, b"x\ty", b"1.1"),
    (b"HTTP/1.1 200 D\xe9j\xe0 vu", 200, b"D\xe9j\xe0 vu", b"1.1"),
])
def test_status_line_variants_are_accepted(line, status, reason, version):
    """A status line may have an empty reason phrase and obs-text in it (RFC 9112 §4)."""
    resp = parse_response_head(head(line, b"Content-Length: 0"), MAX_FIELDS)
    assert (resp.status, resp.reason, resp.version) == (status, reason, version)
    assert list(resp.headers) == [(b"Content-Length", b"0")]


@pytest.mark.parametrize("line", [
    b"HTTP/1.1 20 OK", b"HTTP/1.1 2000 OK", b"HTTP/1.1 600 Too High", b"HTTP/1.1 099 Low",
    b"HTTP/1.1  200 OK", b"HTTP/1.1 200 O\x00K", b"HTTP/1.1 200 O\rK", b"HTTP/2 200 OK",
    b"ICY 200 OK", b"http/1.1 200 OK", b"HTTP/1.2 200 OK", b"HTTP/2.0 200 OK",
])
def test_malformed_status_line_is_a_502(line):
    """A malformed status line or an HTTP version other than 1.0/1.1 from upstream means 502 (RFC 9110 §15.6.3)."""
    raises_status(502, parse_response_head, head(line), MAX_FIELDS)


@pytest.mark.parametrize("field", [b" folded", b"X-A: a\rb", b"X-A: a\x00b", b"X-A : b", b"no colon"])
def test_malformed_response_field_is_rejected(field):
    """Response field lines follow the same strict rules as request ones (RFC 9112 §5)."""
    raises_status(None, parse_response_head, head(b"HTTP/1.1 200 OK", b"X-B: b", field), MAX_FIELDS)


# -- message body length (RFC 9112 §6.3) -------------------------------------

@pytest.mark.parametrize("fields, kind, length", [
    ((), None, None),
    (((b"Content-Length", b"0"),), None, None),
    (((b"Content-Length", b"10"),), ContentLengthReader, 10),
    (((b"Content-Length", b"000123"),), ContentLengthReader, 123),
    (((b"Transfer-Encoding", b"chunked"),), ChunkedReader, None),
    (((b"transfer-encoding", b"CHUNKED"),), ChunkedReader, None),
])
def test_request_body_framing(fields, kind, length):
    """A request body is chunked, Content-Length delimited, or absent (RFC 9112 §6.3 items 4, 6, 7)."""
    reader = request_body_reader(request(fields=fields))
    if kind is None:
        assert reader is None
    else:
        assert type(reader) is kind
    if length is not None:
        assert reader.remaining == length


@pytest.mark.parametrize("fields, status", [
    (((b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")), 400),
    (((b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")), 400),
    (((b"Content-Length", b"5"), (b"Content-Length", b"5")), 400),
    (((b"Content-Length", b"5, 5"),), 400),
    (((b"Content-Length", b"5"), (b"content-length", b"6")), 400),
    (((b"Content-Length", b"-1"),), 400),
    (((b"Content-Length", b"+5"),), 400),
    (((b"Content-Length", b"0x10"),), 400),
    (((b"Content-Length", b"5 5"),), 400),
    (((b"Content-Length", b""),), 400),
    (((b"Content-Length", b"1" * 19),), 400),
    (((b"Transfer-Encoding", b"gzip"),), 400),
    (((b"Transfer-Encoding", b"gzip, chunked"),), 501),
    (((b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")), 501),
    (((b"Transfer-Encoding", b"chunked;q=1"),), 400),
])
def test_request_body_framing_errors(fields, status):
    """Ambiguous or unsupported request framing is refused, never guessed (RFC 9112 §6.1, §6.3 items 3-5)."""
    raises_status(status, request_body_reader, request(fields=fields))


@pytest.mark.parametrize("method, status, fields, kind", [
    (b"HEAD", 200, ((b"Content-Length", b"10"),), None),
    (b"HEAD", 200, ((b"Transfer-Encoding", b"chunked"),), None),
    (b"GET", 100, (), None),
    (b"GET", 103, ((b"Content-Length", b"10"),), None),
    (b"GET", 204, ((b"Content-Length", b"10"),), None),
    (b"GET", 304, ((b"Content-Length", b"10"),), None),
    (b"GET", 200, ((b"Transfer-Encoding", b"chunked"),), ChunkedReader),
    (b"GET", 404, ((b"Content-Length", b"10"),), ContentLengthReader),
    (b"POST", 200, ((b"Content-Length", b"0"),), None),
    (b"GET", 200, (), CloseDelimitedReader),
    (b"GET", 500, ((b"Connection", b"close"),), CloseDelimitedReader),
])
def test_response_body_framing(method, status, fields, kind):
    """
    Response body length in RFC 9112 §6.3 order: none after HEAD and for
    1xx, 204, 304; then chunked; then Content-Length; else close-delimited.
    """
    reader = response_body_reader(method, response(status, fields))
    if kind is None:
        assert reader is None
    else:
        assert type(reader) is kind
    if kind is CloseDelimitedReader:
        assert reader.ends_at_eof


@pytest.mark.parametrize("fields", [
    ((b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")),
    ((b"Content-Length", b"5"), (b"Content-Length", b"5")),
    ((b"Content-Length", b"5,6"),),
    ((b"Content-Length", b"x"),),
    ((b"Transfer-Encoding", b"gzip"),),
    ((b"Transfer-Encoding", b"chunked, gzip"),),
])
def test_response_body_framing_errors_are_502(fields):
    """An upstream response with ambiguous or unsupported framing is a 502, not a guess (RFC 9112 §6.3)."""
    raises_status(502, response_body_reader, b"GET", response(200, fields))


# -- body readers ----------------------------------------------------------------

def feed(reader, data: bytes, split=None) -> tuple[bytes, bytes | None]:
    """
    Feed *data* to *reader*, whole or in pieces whose lengths *split()*
    returns; stop as soon as the reader says the message ended.

    :returns: (the decoded body, the reader's leftover plus the bytes never
        fed), with ``None`` as leftover when the message is incomplete.
    """
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        step = len(data) - pos if split is None else split()
        rest = reader.read(data[pos:pos + step], out.append)
        pos += step
        if rest is not None:
            return b"".join(out), rest + data[pos:]
    return b"".join(out), None


def byte_by_byte() -> int:
    return 1


SPLITS = pytest.mark.parametrize("split", [None, byte_by_byte], ids=["whole", "bytewise"])


@SPLITS
@pytest.mark.parametrize("message, body, trailers", [
    (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world", []),
    (b"5;name=value\r\nhello\r\n0;last\r\n\r\n", b"hello", []),
    (b"5 ;ext\r\nhello\r\n0\r\n\r\n", b"hello", []),
    (b"000A\r\n0123456789\r\n00\r\n\r\n", b"0123456789", []),
    (b"a\r\n0123456789\r\n0\r\n\r\n", b"0123456789", []),
    (b"2\r\n\r\n\r\n0\r\n\r\n", b"\r\n", []),
    (b"0\r\n\r\n", b"", []),
    (b"3\r\nabc\r\n0\r\nX-Checksum: 1\r\nx-other:  two \r\n\r\n", b"abc",
     [(b"X-Checksum", b"1"), (b"x-other", b"two")]),
])
@pytest.mark.parametrize("after", [b"", NEXT_MESSAGE], ids=["alone", "pipelined"])
def test_chunked_decoding(message, body, trailers, after, split):
    """
    Chunked bodies decode to the same bytes, trailers and leftover whether
    fed whole or one byte at a time; the bytes of a pipelined next message
    are returned untouched (RFC 9112 §7.1, §9.3.2).
    """
    reader = ChunkedReader()
    assert feed(reader, message + after, split) == (body, after)
    assert list(reader.trailers) == trailers


@SPLITS
@pytest.mark.parametrize("message", [
    b"x\r\n",
    b"-1\r\n",
    b"\r\n",
    b" 5\r\nhello\r\n",
    b"5 \r\nhello\r\n",
    b"0x5\r\nhello\r\n",
    b"1" * 17 + b"\r\n",
    b"3\nabc\r\n0\r\n\r\n",
    b"3\r\nabcd\r\n0\r\n\r\n",
    b"3\r\nabc\n0\r\n\r\n",
    b"3\r\nabcXY0\r\n\r\n",
    b"1;" + b"x" * 5000,
    b"1\r\na\r\n0\r\nX-T: " + b"y" * 5000,
    b"0\r\nBad Trailer\r\n\r\n",
    b"0\r\n folded: trailer\r\n\r\n",
    b"0\r\n" + b"X-T: v\r\n" * 101 + b"\r\n",
])
def test_chunked_errors(message, split):
    """
    A bad chunk size, missing CRLF after data, an unterminated line longer
    than MAX_LINE or a bad trailer is a 400 however it is segmented
    (RFC 9112 §7.1).
    """
    raises_status(400, feed, ChunkedReader(), message, split)


@pytest.mark.parametrize("message", [
    b"1;" + b"x" * 5000 + b"\r\na\r\n0\r\n\r\n",
    b"1\r\na\r\n0\r\nX-T: " + b"y" * 5000 + b"\r\n\r\n",
])
def test_overlong_chunk_lines_rejected_even_when_complete(message):
    """
    A chunk-size line (with extensions) or trailer line longer than
    ChunkedReader.MAX_LINE is a 400 also when it arrives whole with its
    CRLF, as it is when fed byte by byte (test_chunked_errors): the outcome
    must not depend on TCP segmentation (RFC 9112 §7.1.1).
    """
    raises_status(400, feed, ChunkedReader(), message)


def test_chunked_incomplete_message_waits():
    """A chunked body cut short is not finished: read returns None and keeps the partial state."""
    reader = ChunkedReader()
    assert feed(reader, b"5\r\nhel") == (b"hel", None)
    assert feed(reader, b"lo\r\n0\r\n\r") == (b"lo", None)
    assert feed(reader, b"\n" + NEXT_MESSAGE) == (b"", NEXT_MESSAGE)


@SPLITS
@pytest.mark.parametrize("length, after", [(1, b""), (5, b""), (5, NEXT_MESSAGE), (11, b"X")])
def test_content_length_reader(length, after, split):
    """Exactly Content-Length bytes are body; whatever follows is returned as the next message (RFC 9112 §6.2)."""
    body = bytes(range(65, 65 + length))
    reader = ContentLengthReader(length)
    assert feed(reader, body + after, split) == (body, after)
    assert reader.remaining == 0


def test_content_length_reader_counts_down():
    """Pieces shorter than the remaining length are delivered as is and read returns None."""
    reader = ContentLengthReader(10)
    assert feed(reader, b"abcd") == (b"abcd", None)
    assert reader.remaining == 6
    assert feed(reader, b"efghij") == (b"efghij", b"")


def test_close_delimited_reader_passes_everything():
    """A close-delimited body is every byte until EOF; read never ends it (RFC 9112 §6.3 item 8)."""
    reader = CloseDelimitedReader()
    assert feed(reader, b"abc\r\n0\r\n\r\n" + NEXT_MESSAGE) == (b"abc\r\n0\r\n\r\n" + NEXT_MESSAGE, None)


@pytest.mark.parametrize("data, pieces", [
    (b"hello", [b"5\r\n", b"hello", b"\r\n"]),
    (b"x" * 255, [b"ff\r\n", b"x" * 255, b"\r\n"]),
    (b"\r\n", [b"2\r\n", b"\r\n", b"\r\n"]),
])
def test_encode_chunk(data, pieces):
    """encode_chunk gives size line in hex, the data itself, and CRLF (RFC 9112 §7.1)."""
    assert encode_chunk(data) == pieces
    assert encode_chunk(data)[1] is data
    assert LAST_CHUNK == b"0\r\n\r\n"


def test_encode_chunk_round_trip_random():
    """
    Random bodies encoded with encode_chunk and LAST_CHUNK decode to the
    same bytes through ChunkedReader under random segmentation, and the next
    message comes back as leftover (a seeded loop instead of hypothesis).
    """
    rng = random.Random(9112)
    for _ in range(300):
        chunks = [rng.randbytes(rng.choice([1, 2, 15, 16, 17, rng.randrange(1, 5000)]))
                  for _ in range(rng.randrange(0, 8))]
        wire = b"".join(piece for chunk in chunks for piece in encode_chunk(chunk)) + LAST_CHUNK
        reader = ChunkedReader()
        decoded, rest = feed(reader, wire + NEXT_MESSAGE, lambda: rng.randrange(1, 40))
        assert (decoded, rest) == (b"".join(chunks), NEXT_MESSAGE)
        assert list(reader.trailers) == []


# -- forwarding (RFC 9110 §7.6, RFC 9112 §3.2) --------------------------------

@pytest.mark.parametrize("target, host, port, path, authority", [
    (b"http://example.com/a?b=c", "example.com", 80, b"/a?b=c", b"example.com"),
    (b"http://example.com", "example.com", 80, b"/", b"example.com"),
    (b"http://example.com:8080/x", "example.com", 8080, b"/x", b"example.com:8080"),
    (b"http://example.com:/x", "example.com", 80, b"/x", b"example.com"),
    (b"http://example.com:80/", "example.com", 80, b"/", b"example.com"),
    (b"http://127.0.0.1:65535/", "127.0.0.1", 65535, b"/", b"127.0.0.1:65535"),
    (b"http://[::1]:8080/x", "::1", 8080, b"/x", b"[::1]:8080"),
    (b"http://[2001:DB8::1]/", "2001:db8::1", 80, b"/", b"[2001:db8::1]"),
    (b"http://example.com?q", "example.com", 80, b"/?q", b"example.com"),
    (b"http://example.com/p@x/?a=b/c", "example.com", 80, b"/p@x/?a=b/c", b"example.com"),
    (b"HTTP://Example.COM/Path", "example.com", 80, b"/Path", b"example.com"),
    (b"hTtP://under_score.example./", "under_score.example.", 80, b"/", b"under_score.example."),
])
def test_parse_absolute_form(target, host, port, path, authority):
    """
    An absolute-form http:// target gives host (lowercased, IPv6 without
    brackets), port (80 by default) and the origin-form path ("/" when
    empty, also before a query) (RFC 9112 §3.2.1, §3.2.2; RFC 3986 §3.2).
    """
    req = request(target)
    parse_absolute_form(req)
    assert (req.scheme, req.host, req.port, req.path, req.authority) == (b"http", host, port, path, authority)


@pytest.mark.parametrize("target", [
    b"http://user@example.com/", b"http://user:pw@example.com/",
    b"http://example.com/#frag", b"http://example.com/a?b#frag", b"http://example.com#",
    b"http://example.com:0/", b"http://example.com:65536/", b"http://example.com:123456/",
    b"http://example.com:8o/", b"http://example.com:+80/", b"http://example.com:80:80/",
    b"https://example.com/", b"ftp://example.com/", b"http:/example.com/", b"http:///path",
    b"/origin/form", b"*", b"example.com:80", b"http://:80/",
    b"http://[::1/", b"http://[zz::1]/", b"http://[::1]x/", b"http://::1/",
    b"http://exa%41mple.com/", b"http://-leading.example/", b"http://exa mple.com/",
    b"http://" + b"a" * 254 + b"/",
])
def test_parse_absolute_form_rejects(target):
    """
    Userinfo, fragments, bad ports, non-http schemes and anything that is not
    an absolute http URI are a 400 (RFC 9112 §3.2.2; RFC 9110 §4.2.4 forbids
    userinfo in http URIs).
    """
    raises_status(400, parse_absolute_form, request(target))


@pytest.mark.parametrize("target, host, port", [
    (b"example.com:443", "example.com", 443),
    (b"EXAMPLE.com:8443", "example.com", 8443),
    (b"127.0.0.1:1", "127.0.0.1", 1),
    (b"[::1]:443", "::1", 443),
])
def test_parse_authority_form(target, host, port):
    """A CONNECT target is host:port with the port required (RFC 9112 §3.2.3)."""
    req = request(target, method=b"CONNECT")
    parse_authority_form(req)
    assert (req.host, req.port) == (host, port)


@pytest.mark.parametrize("target", [
    b"example.com", b"example.com:", b"example.com:0", b"example.com:65536", b"[::1]",
    b"http://example.com:443", b"example.com:443/", b"user@example.com:443", b"/path",
])
def test_parse_authority_form_rejects(target):
    """A CONNECT target without a valid port, or with anything but host:port, is a 400."""
    raises_status(400, parse_authority_form, request(target, method=b"CONNECT"))


def test_connection_tokens():
    """Connection options are lowercased, trimmed, and read from every Connection line (RFC 9110 §7.6.1)."""
    headers = Headers([(b"Connection", b"close, X-Foo ,, "), (b"connection", b"Keep-Alive")])
    assert connection_tokens(headers) == {b"close", b"x-foo", b"keep-alive"}
    assert connection_tokens(Headers()) == set()


def test_strip_hop_by_hop_removes_listed_and_named_fields():
    """
    Hop-by-hop fields, Proxy-Authorization and every field named in
    Connection are removed in any case; the rest keep order (RFC 9110 §7.6.1).
    """
    headers = Headers([
        (b"Accept", b"*/*"), (b"Connection", b"keep-alive, X-Secret"), (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"), (b"Transfer-Encoding", b"chunked"), (b"Upgrade", b"h2c"),
        (b"Proxy-Connection", b"keep-alive"), (b"Proxy-Authorization", b"Basic dTpw"),
        (b"X-SECRET", b"1"), (b"x-secret", b"2"), (b"X-Kept", b"yes"),
    ])
    strip_hop_by_hop(headers, connection_tokens(headers))
    assert list(headers) == [(b"Accept", b"*/*"), (b"X-Kept", b"yes")]


def upstream_head(target: bytes, fields, version: bytes = b"1.1", method: bytes = b"GET",
                  framing=()) -> bytes:
    """request_head_for_upstream for a request as the client side would pass it."""
    req = request(target, fields, method, version)
    parse_absolute_form(req)
    return request_head_for_upstream(req, connection_tokens(req.headers), b"proxyframe", list(framing))


def test_request_head_for_upstream():
    """
    The forwarded head is in origin-form with Host from the target, no
    hop-by-hop fields or proxy credentials, and Via appended after earlier
    hops (RFC 9110 §7.2, §7.6.1, §7.6.3; RFC 9112 §3.2.1).
    """
    head_bytes = upstream_head(b"http://Example.com:8080/p?q", [
        (b"Host", b"wrong.example"), (b"Proxy-Authorization", b"Basic dTpw"),
        (b"Connection", b"keep-alive, X-Hop"), (b"X-Hop", b"1"), (b"Via", b"1.0 earlier"),
        (b"Accept", b"*/*"), (b"Content-Length", b"3"),
    ], method=b"POST")
    assert head_bytes == (b"POST /p?q HTTP/1.1\r\nHost: example.com:8080\r\nVia: 1.0 earlier\r\n"
                          b"Accept: */*\r\nContent-Length: 3\r\nVia: 1.1 proxyframe\r\n\r\n")


def test_request_head_for_upstream_http10_and_chunked_framing():
    """
    An HTTP/1.0 request goes upstream as HTTP/1.1 with Via naming 1.0, Host
    added when absent; the client's Transfer-Encoding is replaced by the
    framing given (RFC 9110 §7.6.3, RFC 9112 §6.1).
    """
    head_bytes = upstream_head(b"http://[::1]/", [(b"Transfer-Encoding", b"chunked"), (b"X-A", b"a")],
                               version=b"1.0", framing=[(b"Transfer-Encoding", b"chunked")])
    assert head_bytes == (b"GET / HTTP/1.1\r\nX-A: a\r\nHost: [::1]\r\nVia: 1.0 proxyframe\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n")


def test_connection_option_cannot_remove_content_length_upstream():
    """
    A client that names Content-Length in Connection must not make the proxy
    forward its body without framing: the origin would read the body as a
    second request (RFC 9112 §6.3, §11.2 request smuggling).  The function's
    contract says Content-Length is end-to-end and stays.
    """
    head_bytes = upstream_head(b"http://example.com/", [
        (b"Content-Length", b"40"), (b"Connection", b"Content-Length")], method=b"POST")
    assert b"\r\nContent-Length: 40\r\n" in head_bytes


def test_response_head_for_client():
    """
    The response head to the client loses hop-by-hop fields and fields named
    in Connection, gains Via (not on the proxy's own responses) and the
    framing given (RFC 9110 §7.6.1, §7.6.3).
    """
    def client_head(pseudonym):
        resp = Response(200, b"OK", Headers([
            (b"Connection", b"X-Hop"), (b"X-Hop", b"1"), (b"Keep-Alive", b"timeout=5"),
            (b"Transfer-Encoding", b"chunked"), (b"Content-Type", b"text/plain")]), b"1.0")
        return response_head_for_client(resp, pseudonym, [(b"Transfer-Encoding", b"chunked")])

    assert client_head(b"proxyframe") == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                          b"Via: 1.0 proxyframe\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert b"Via" not in client_head(None)


def test_connection_option_cannot_remove_content_length_downstream():
    """
    An origin response naming Content-Length in Connection still reaches a
    keep-alive client with its Content-Length (the client side passes no
    framing for a Content-Length body), else the client cannot find the end
    of the body (RFC 9112 §6.3).
    """
    resp = Response(200, b"OK", Headers([(b"Content-Length", b"5"), (b"Connection", b"content-length")]))
    assert b"\r\nContent-Length: 5\r\n" in response_head_for_client(resp, b"proxyframe", [])


# -- Headers ---------------------------------------------------------------------

def sample_headers() -> Headers:
    return Headers([(b"Host", b"h"), (b"Set-Cookie", b"a=1"), (b"X-Tag", b"x"), (b"set-cookie", b"b=2")])


def test_headers_lookup_is_case_insensitive():
    """get joins repeated fields with ", ", get_all keeps them apart, both ignore case (RFC 9110 §5.1, §5.3)."""
    headers = sample_headers()
    assert headers.get(b"HOST") == b"h"
    assert headers.get(b"set-COOKIE") == b"a=1, b=2"
    assert headers.get_all(b"Set-Cookie") == [b"a=1", b"b=2"]
    assert headers.get(b"absent") is None
    assert headers.get(b"absent", b"dflt") == b"dflt"
    assert headers.get_all(b"absent") == []
    assert b"x-tag" in headers and b"X-TAG" in headers and b"x-ta" not in headers
    assert len(headers) == 4


def test_headers_preserve_order_and_casing():
    """Iteration and encode give the fields in arrival order with their original names."""
    headers = sample_headers()
    headers.add(b"x-tag", b"y")
    assert list(headers)[-1] == (b"x-tag", b"y")
    assert headers.get(b"X-Tag") == b"x, y"
    assert headers.encode() == b"Host: h\r\nSet-Cookie: a=1\r\nX-Tag: x\r\nset-cookie: b=2\r\nx-tag: y\r\n"
    assert headers != sample_headers()
    assert Headers(list(headers)) == headers


def test_headers_set_replaces_at_first_position():
    """set leaves one line, with the new name casing, where the first one was; appends when absent."""
    headers = sample_headers()
    headers.set(b"SET-COOKIE", b"c=3")
    assert list(headers) == [(b"Host", b"h"), (b"SET-COOKIE", b"c=3"), (b"X-Tag", b"x")]
    headers.set(b"New", b"n")
    assert list(headers)[-1] == (b"New", b"n")
    assert headers.get(b"new") == b"n"


def test_headers_remove_and_discard():
    """remove takes names in any case; discard takes lowercased names; absent names are fine."""
    headers = sample_headers()
    headers.remove(b"SET-cookie", b"Absent")
    assert list(headers) == [(b"Host", b"h"), (b"X-Tag", b"x")]
    assert b"set-cookie" not in headers
    headers.discard(frozenset({b"x-tag", b"other"}))
    assert list(headers) == [(b"Host", b"h")]
    headers.discard({b"absent"})
    assert list(headers) == [(b"Host", b"h")]
