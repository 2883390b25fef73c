"""
HTTP/1.1 message framing (RFC 9112), sans-I/O, shared by the client side and
the upstream side so that both apply the same rules.

It parses heads that the caller has already delimited (up to the blank
line), decides the message body length in RFC 9112 §6.3 order, and provides
one small body reader per framing.  Nothing here does I/O or keeps a
reference to a transport.

The parser is strict, on purpose: a proxy that guesses where a message ends
differently from the server behind it enables request smuggling.  Rejected
outright (:class:`ProtocolError`): obs-fold (§5.2), bare CR or LF, control
characters in fields, whitespace before the colon (§5.1), Content-Length
with Transfer-Encoding (§6.1), more than one Content-Length, a request
Transfer-Encoding other than ``chunked``, malformed chunk sizes (§7.1), and
HTTP versions other than 1.0 and 1.1.

Why not httptools (llhttp)?  It rejects extension methods (RFC 9110 §9.1
allows any token), cannot stop between pipelined messages or report where a
message ended, and has no bound on head size; the proxy would have to find
message boundaries itself anyway.  Heads are validated here with compiled
regular expressions, one match per line, which costs about as much as
llhttp's per-field callbacks into Python.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from proxyframe.exchange import Headers, Request, Response

__all__ = [
    "ProtocolError",
    "parse_request_head",
    "parse_response_head",
    "request_body_reader",
    "response_body_reader",
    "ContentLengthReader",
    "ChunkedReader",
    "CloseDelimitedReader",
    "encode_chunk",
    "LAST_CHUNK",
]


class ProtocolError(Exception):
    """
    A message that breaks HTTP/1.1 framing or a configured limit.

    :ivar status: the status a client should get (400, 413, 414, 431, 501,
        505); for a broken response from the upstream the proxy answers 502
        instead.
    :ivar detail: a short human-readable reason (``str``).
    """

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


# RFC 9110 §5.6.2: token = 1*tchar
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# RFC 9112 §3: request-line = method SP request-target SP HTTP-version.
# The target is any run of visible ASCII; its form is checked by the caller.
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
# RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ]
# (a missing SP before an empty reason is tolerated, as deployed servers omit it)
_STATUS_LINE = re.compile(rb"HTTP/([0-9])\.([0-9]) ([1-5][0-9][0-9])(?: ([\t \x21-\x7e\x80-\xff]*))?")
# RFC 9112 §5: field-line = field-name ":" OWS field-value OWS, where the
# value is field-vchar / SP / HTAB and obs-text.  No CR, LF, NUL or other
# controls; a line that starts with whitespace (obs-fold) fails the token.
# The field lines of a head (CRLF between them) are checked whole in one
# pass in C, then split without regular expressions.
_FIELD = _TOKEN + rb":[\t \x21-\x7e\x80-\xff]*"
_FIELD_BLOCK = re.compile(_FIELD + rb"(?:\r\n" + _FIELD + rb")*")
_DIGITS = re.compile(rb"[0-9]{1,18}")
# RFC 9112 §7.1: chunk-size [ chunk-ext ] CRLF; extensions are passed over.
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[\t \x21-\x7e\x80-\xff]*)?")

_VERSIONS = {(b"1", b"1"): b"1.1", (b"1", b"0"): b"1.0"}


def _parse_fields(block: bytes, max_fields: int) -> Headers:
    """
    Parse field lines, separated by CRLF, into :class:`Headers`.

    :raises ProtocolError: 400 for a malformed line, 431 past *max_fields*.
    """
    if not block:
        return Headers()
    if block.count(b"\r\n") >= max_fields:
        raise ProtocolError(431, f"more than {max_fields} header fields")
    if _FIELD_BLOCK.fullmatch(block) is None:
        raise ProtocolError(400, "malformed header field line")
    fields = []
    index: dict[bytes, list[bytes]] = {}
    for line in block.split(b"\r\n"):
        name, _, value = line.partition(b":")
        value = value.strip(b" \t")
        fields.append((name, value))
        # Every parsed head is looked up (framing, Connection): index now.
        lname = name.lower()
        values = index.get(lname)
        if values is None:
            index[lname] = [value]
        else:
            values.append(value)
    return Headers.parsed(fields, index)


def parse_request_head(head: bytes, max_fields: int) -> Request:
    """
    Parse a request head (RFC 9112 §3, §5).

    :param head: the bytes up to, not including, the CRLF CRLF that ends
        the head.
    :param max_fields: the most field lines allowed.
    :returns: a :class:`Request`; its target is not yet interpreted.
    :raises ProtocolError: 400 malformed, 431 too many fields, 505 an HTTP
        version other than 1.0 or 1.1.
    """
    line, _, block = head.partition(b"\r\n")
    m = _REQUEST_LINE.fullmatch(line)
    if m is None:
        raise ProtocolError(400, "malformed request line")
    version = _VERSIONS.get((m[3], m[4]))
    if version is None:
        raise ProtocolError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    return Request(m[1], m[2], version, _parse_fields(block, max_fields))


def parse_response_head(head: bytes, max_fields: int) -> Response:
    """
    Parse a response head (RFC 9112 §4, §5).

    :param head: the bytes up to, not including, the CRLF CRLF.
    :returns: a :class:`Response`.
    :raises ProtocolError: when malformed (the proxy answers 502).
    """
    line, _, block = head.partition(b"\r\n")
    m = _STATUS_LINE.fullmatch(line)
    if m is None:
        raise ProtocolError(502, "malformed status line")
    version = _VERSIONS.get((m[1], m[2]))
    if version is None:
        raise ProtocolError(502, "unsupported HTTP version in response")
    return Response(int(m[3]), m[4] or b"", _parse_fields(block, max_fields), version)


def _content_length(headers: Headers) -> int | None:
    values = headers.get_all(b"content-length")
    if not values:
        return None
    # Two lines, or one line with a list, would let two parties disagree on
    # the length; refuse rather than pick one (RFC 9112 §6.3 item 5).
    if len(values) > 1 or _DIGITS.fullmatch(values[0]) is None:
        raise ProtocolError(400, "invalid or repeated Content-Length")
    return int(values[0])


def request_body_reader(request: Request) -> BodyReader | None:
    """
    Decide the request's message body length (RFC 9112 §6.3).

    :returns: a reader for the body, or ``None`` when there is none.
    :raises ProtocolError: 400 for Content-Length with Transfer-Encoding, a
        bad Content-Length, Transfer-Encoding in HTTP/1.0 (§6.1) or a final
        coding other than chunked (§6.3); 501 for codings before chunked.
    """
    headers = request.headers
    te = headers.get(b"transfer-encoding")
    if te is not None:
        if b"content-length" in headers:
            raise ProtocolError(400, "Content-Length with Transfer-Encoding")
        if request.version == b"1.0":
            # §6.1: Transfer-Encoding in HTTP/1.0 means faulty framing.
            raise ProtocolError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip() for c in te.lower().split(b",")]
        if codings[-1] != b"chunked":
            # §6.3 item 4: the length cannot be determined.
            raise ProtocolError(400, "the final transfer coding is not chunked")
        if len(codings) > 1:
            raise ProtocolError(501, "only the chunked transfer coding is supported")
        return ChunkedReader()
    length = _content_length(headers)
    if not length:
        return None
    return ContentLengthReader(length)


def response_body_reader(method: bytes, response: Response) -> BodyReader | None:
    """
    Decide the response's message body length (RFC 9112 §6.3, in order):
    none after HEAD and for 1xx, 204 and 304; then Transfer-Encoding
    chunked; then Content-Length; else close-delimited.

    :returns: a reader, or ``None`` when the response has no body.
    :raises ProtocolError: for Content-Length with Transfer-Encoding, a bad
        Content-Length, or a transfer coding other than chunked (the proxy
        answers 502).
    """
    status = response.status
    if method == b"HEAD" or status < 200 or status == 204 or status == 304:
        return None
    headers = response.headers
    te = headers.get(b"transfer-encoding")
    if te is not None:
        if b"content-length" in headers:
            raise ProtocolError(502, "Content-Length with Transfer-Encoding")
        if te.lower() != b"chunked":
            raise ProtocolError(502, "unsupported transfer coding from upstream")
        return ChunkedReader()
    try:
        length = _content_length(headers)
    except ProtocolError:
        raise ProtocolError(502, "invalid or repeated Content-Length from upstream") from None
    if length is None:
        return CloseDelimitedReader()
    if length == 0:
        return None
    return ContentLengthReader(length)


Deliver = Callable[[bytes], object]


class ContentLengthReader:
    """
    A body of known length (RFC 9112 §6.2).

    :ivar remaining: body bytes still expected.
    """

    __slots__ = ("remaining",)
    chunked = False
    #: What a premature EOF means: the body is incomplete.
    ends_at_eof = False

    def __init__(self, length: int) -> None:
        self.remaining = length

    def read(self, data: bytes, deliver: Deliver) -> bytes | None:
        """
        Pass the body bytes in *data* to *deliver* (slices, no copy when the
        whole of *data* is body).

        :returns: ``None`` while more body is expected; else the bytes after
            the body (possibly ``b""``), which belong to the next message.
        """
        remaining = self.remaining
        size = len(data)
        if size < remaining:
            self.remaining = remaining - size
            deliver(data)
            return None
        self.remaining = 0
        if size == remaining:
            deliver(data)
            return b""
        deliver(data[:remaining])
        return data[remaining:]


class CloseDelimitedReader:
    """
    A response body that ends when the upstream closes (RFC 9112 §6.3 item 8).
    """

    __slots__ = ()
    chunked = False
    ends_at_eof = True

    def read(self, data: bytes, deliver: Deliver) -> bytes | None:
        """
        Pass all of *data* on.  :returns: ``None`` (only EOF ends the body).
        """
        deliver(data)
        return None


_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


class ChunkedReader:
    """
    The chunked transfer coding (RFC 9112 §7.1), decoded.

    Chunk-size lines and trailer lines are bounded (:attr:`MAX_LINE`,
    :attr:`MAX_TRAILER_FIELDS`); extensions are dropped.  Partial lines are
    kept between calls, never more than one line.

    :ivar trailers: the trailer fields, once the last chunk was read.
    """

    __slots__ = ("_state", "_remaining", "_partial", "_trailer_lines", "trailers")
    chunked = True
    ends_at_eof = False
    #: Longest chunk-size or trailer line accepted, in bytes.
    MAX_LINE = 4096
    #: Most trailer field lines accepted.
    MAX_TRAILER_FIELDS = 100

    def __init__(self) -> None:
        self._state = _SIZE
        self._remaining = 0
        self._partial = b""
        self._trailer_lines: list[bytes] = []
        self.trailers: Headers | None = None

    def read(self, data: bytes, deliver: Deliver) -> bytes | None:
        """
        Decode chunks from *data*, passing chunk data to *deliver*.

        :returns: ``None`` while more is expected; else the bytes after the
            message, which belong to the next message.
        :raises ProtocolError: 400 for a malformed chunk size, missing CRLF
            or bad trailer.
        """
        if self._partial:
            data = self._partial + data
            self._partial = b""
        pos = 0
        size = len(data)
        while pos < size:
            state = self._state
            if state == _DATA:
                end = pos + self._remaining
                if end >= size:
                    self._remaining = end - size
                    deliver(data if pos == 0 else data[pos:])
                    if self._remaining == 0:
                        self._state = _DATA_END
                    return None
                deliver(data[pos:end])
                pos = end
                self._state = _DATA_END
            elif state == _DATA_END:
                if size - pos < 2:
                    self._partial = data[pos:]
                    return None
                if data[pos:pos + 2] != b"\r\n":
                    raise ProtocolError(400, "missing CRLF after chunk data")
                pos += 2
                self._state = _SIZE
            else:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    if size - pos > self.MAX_LINE:
                        raise ProtocolError(400, "chunk-size or trailer line too long")
                    self._partial = data[pos:]
                    return None
                if end - pos > self.MAX_LINE:
                    raise ProtocolError(400, "chunk-size or trailer line too long")
                line = data[pos:end]
                pos = end + 2
                if state == _SIZE:
                    m = _CHUNK_SIZE.fullmatch(line)
                    if m is None:
                        raise ProtocolError(400, "malformed chunk size")
                    chunk = int(m[1], 16)
                    if chunk:
                        self._remaining = chunk
                        self._state = _DATA
                    else:
                        self._state = _TRAILER
                elif line:
                    if len(self._trailer_lines) >= self.MAX_TRAILER_FIELDS:
                        raise ProtocolError(400, "too many trailer fields")
                    self._trailer_lines.append(line)
                else:
                    self.trailers = _parse_fields(b"\r\n".join(self._trailer_lines), self.MAX_TRAILER_FIELDS)
                    return data[pos:]
        return None


BodyReader = ContentLengthReader | ChunkedReader | CloseDelimitedReader

#: The last chunk with no trailers (RFC 9112 §7.1).
LAST_CHUNK = b"0\r\n\r\n"


def encode_chunk(data: bytes) -> list[bytes]:
    """
    :returns: the pieces of one chunk for ``writeSequence`` (the data is
        not copied).  Empty *data* must not be encoded: it would read as
        the last chunk.
    """
    return [b"%x\r\n" % len(data), data, b"\r\n"]
