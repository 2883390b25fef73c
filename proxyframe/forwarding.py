"""
What an intermediary changes when it forwards a message (RFC 9110 §7.6):
the request-target rewritten from absolute-form to origin-form with ``Host``
from the target, hop-by-hop fields removed in both directions, ``Via``
added, ``Max-Forwards`` decremented.  One implementation for both
directions, so they cannot drift apart.
"""

from __future__ import annotations

import functools
import ipaddress
import re

from proxyframe.exchange import Headers, Request, Response
from proxyframe.http1 import ProtocolError

__all__ = [
    "HOP_BY_HOP",
    "parse_absolute_form",
    "parse_authority_form",
    "strip_hop_by_hop",
    "request_head_for_upstream",
    "response_head_for_client",
    "connection_tokens",
]

#: Fields that describe one connection, not the message (RFC 9110 §7.6.1),
#: plus Proxy-Connection (a de-facto one) and Proxy-Authorization, whose
#: credentials are for this proxy and must never reach the next hop.
HOP_BY_HOP = frozenset({
    b"connection",
    b"proxy-connection",
    b"keep-alive",
    b"te",
    b"transfer-encoding",
    b"upgrade",
    b"proxy-authorization",
})

#: Fields a ``Connection`` option must not remove: the message's framing
#: and its target.  Honouring ``Connection: content-length`` would forward
#: a body without its length (request smuggling).
_NOT_REMOVABLE = frozenset({b"content-length", b"host"})

# RFC 3986 §3.2.2 reg-name (no percent-encoding accepted) / IPv4 / [IPv6].
_REG_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-_.]*[A-Za-z0-9_])?\.?")
# http://authority[path-abempty][?query]; userinfo and fragments are refused.
_ABSOLUTE = re.compile(rb"(?i:http)://([^/?#@]+)([/?][^#]*)?")


@functools.lru_cache(maxsize=1024)
def _split_authority(authority: bytes, default_port: int | None) -> tuple[str, int]:
    """
    Split ``host[:port]`` (RFC 3986 §3.2) into a host for endpoints (IPv6
    without brackets) and a port.

    :raises ProtocolError: 400 for an empty or malformed host or port.
    """
    try:
        text = authority.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(400, "non-ASCII authority") from None
    if text.startswith("["):
        close = text.find("]")
        host, rest = text[1:close], text[close + 1:]
        if close < 0 or (rest and not rest.startswith(":")):
            raise ProtocolError(400, "malformed authority in target")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ProtocolError(400, "malformed IPv6 literal in target") from None
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text = text.partition(":")
        if not colon:
            port_text = None
        if not _REG_NAME.fullmatch(host) or len(host) > 253:
            raise ProtocolError(400, "malformed host in target")
    if port_text is None or port_text == "":
        if default_port is None:
            raise ProtocolError(400, "the target needs a port")
        return host.lower(), default_port
    if not port_text.isdigit() or len(port_text) > 5 or not 0 < int(port_text) < 65536:
        raise ProtocolError(400, "malformed port in target")
    return host.lower(), int(port_text)


def parse_absolute_form(request: Request) -> None:
    """
    Interpret an absolute-form target (RFC 9112 §3.2.2) and fill in the
    request's ``scheme``, ``host``, ``port`` and origin-form ``path``.

    :raises ProtocolError: 400 when the target is not an ``http://`` URI
        with a valid authority (other schemes, userinfo, fragments and
        origin-form targets are refused; a forward proxy is not a web
        server).
    """
    m = _ABSOLUTE.fullmatch(request.target)
    if m is None:
        raise ProtocolError(400, "the request-target must be an absolute http:// URI")
    request.scheme = b"http"
    request.host, request.port = _split_authority(m[1], 80)
    path = m[2] or b"/"
    # RFC 9112 §3.2.1: an empty path becomes "/" (also before a query).
    request.path = b"/" + path if path[:1] == b"?" else path


def parse_authority_form(request: Request) -> None:
    """
    Interpret a CONNECT target (RFC 9112 §3.2.3: ``host:port``, port
    required) into ``host`` and ``port``.

    :raises ProtocolError: 400 when malformed.
    """
    request.host, request.port = _split_authority(request.target, None)


def connection_tokens(headers: Headers) -> set[bytes]:
    """
    :returns: the lowercased options listed in ``Connection`` (RFC 9110
        §7.6.1), e.g. ``{b"close"}`` or ``{b"keep-alive", b"x-foo"}``.
    """
    value = headers.get(b"connection")
    if value is None:
        return set()
    return {t.strip().lower() for t in value.split(b",") if t.strip()}


def strip_hop_by_hop(headers: Headers, tokens: set[bytes]) -> None:
    """
    Remove the hop-by-hop fields and every field named in ``Connection``
    (RFC 9110 §7.6.1).

    :param tokens: :func:`connection_tokens` of the same headers; options
        naming ``Content-Length`` or ``Host`` are ignored.
    """
    headers.discard(HOP_BY_HOP | (tokens - _NOT_REMOVABLE) if tokens else HOP_BY_HOP)


def _add_via(headers: Headers, version: bytes, pseudonym: bytes) -> None:
    # RFC 9110 §7.6.3: received-protocol (the version this hop received)
    # and received-by; appended, so earlier hops stay in order.
    headers.add(b"Via", version + b" " + pseudonym)


def request_head_for_upstream(request: Request, tokens: set[bytes], pseudonym: bytes,
                              framing: list[tuple[bytes, bytes]]) -> bytes:
    """
    Build the request head that goes upstream: origin-form target, ``Host``
    from the target (RFC 9110 §7.2), hop-by-hop fields removed, ``Via``
    added, the body framing restated.

    :param tokens: the client's ``Connection`` options.
    :param pseudonym: this proxy's name in ``Via``.
    :param framing: fields that describe the body as it will be sent
        (``Transfer-Encoding: chunked`` or nothing; Content-Length is
        end-to-end and stays).
    :returns: the serialized head, ending with the blank line.
    """
    headers = request.headers
    strip_hop_by_hop(headers, tokens)
    headers.set(b"Host", request.authority)
    _add_via(headers, request.version, pseudonym)
    for name, value in framing:
        headers.add(name, value)
    return b"%s %s HTTP/1.1\r\n%s\r\n" % (request.method, request.path, headers.encode())


def response_head_for_client(response: Response, pseudonym: bytes | None,
                             framing: list[tuple[bytes, bytes]]) -> bytes:
    """
    Build the response head sent to the client: hop-by-hop fields removed,
    ``Via`` added (when *pseudonym* is given; the proxy's own responses
    carry none), the connection and framing fields restated.

    :param framing: fields that describe this hop, e.g.
        ``[(b"Transfer-Encoding", b"chunked"), (b"Connection", b"close")]``.
    :returns: the serialized head, ending with the blank line.
    """
    headers = response.headers
    strip_hop_by_hop(headers, connection_tokens(headers))
    if pseudonym is not None:
        _add_via(headers, response.version, pseudonym)
    for name, value in framing:
        headers.add(name, value)
    return b"HTTP/1.1 %d %s\r\n%s\r\n" % (response.status, response.reason, headers.encode())
