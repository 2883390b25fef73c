"""
The values the proxy (and, later, its filters) work with: :class:`Headers`,
:class:`Request`, :class:`Response` and the :class:`Exchange` that ties one
request to its response.

Wire data is ``bytes`` throughout; field names keep the casing they arrived
with, and lookups are case-insensitive (RFC 9110 §5.1).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from http import HTTPStatus

__all__ = ["Headers", "Request", "Response", "Exchange"]


class Headers:
    """
    An ordered, case-insensitive multi-map of header fields.

    The raw ``(name, value)`` pairs are kept in arrival order with their
    original casing, so what is forwarded looks like what was received.
    Lookups by name ignore case.  Values are ``bytes`` with no surrounding
    whitespace.
    """

    __slots__ = ("_fields", "_index")

    def __init__(self, fields: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """
        :param fields: ``(name, value)`` pairs, in order.
        """
        self._fields: list[tuple[bytes, bytes]] = list(fields)
        self._index: dict[bytes, list[bytes]] | None = None

    @classmethod
    def parsed(cls, fields: list[tuple[bytes, bytes]], index: dict[bytes, list[bytes]]) -> Headers:
        """
        Headers from a parser that built the lookup index as it went (one
        pass over the lines instead of two); both are taken over, not copied.

        :param fields: ``(name, value)`` pairs, in order.
        :param index: lowercased name -> its values in order, for exactly
            those *fields*.
        """
        headers = cls.__new__(cls)
        headers._fields = fields
        headers._index = index
        return headers

    def _lookup(self) -> dict[bytes, list[bytes]]:
        index = self._index
        if index is None:
            index = {}
            for name, value in self._fields:
                index.setdefault(name.lower(), []).append(value)
            self._index = index
        return index

    def get(self, name: bytes, default: bytes | None = None) -> bytes | None:
        """
        :param name: a field name, any case.
        :returns: the field's values joined with ``b", "`` (RFC 9110 §5.3),
            or *default* when the field is absent.  Use :meth:`get_all` for
            ``Set-Cookie``, whose values must not be joined.
        """
        values = (self._index or self._lookup()).get(name.lower())
        if values is None:
            return default
        return values[0] if len(values) == 1 else b", ".join(values)

    def get_all(self, name: bytes) -> list[bytes]:
        """
        :returns: every value of the field, in order (empty if absent).
        """
        return list((self._index or self._lookup()).get(name.lower(), ()))

    def __contains__(self, name: bytes) -> bool:
        return name.lower() in (self._index or self._lookup())

    def has_any(self, lower_names: frozenset[bytes]) -> bool:
        """
        :param lower_names: lowercased field names.
        :returns: whether any of them is present (one set operation, for
            hot paths that look for several rare fields at once).
        """
        return not lower_names.isdisjoint(self._index or self._lookup())

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._fields == other._fields

    def __repr__(self) -> str:
        return f"Headers({self._fields!r})"

    def add(self, name: bytes, value: bytes) -> None:
        """
        Append a field line (after any existing ones of that name).
        """
        self._fields.append((name, value))
        index = self._index
        if index is not None:
            index.setdefault(name.lower(), []).append(value)

    def set(self, name: bytes, value: bytes) -> None:
        """
        Replace every line of the field with one line, at the position of
        the first one (or at the end when absent).
        """
        lname = name.lower()
        out: list[tuple[bytes, bytes]] = []
        placed = False
        for pair in self._fields:
            if pair[0].lower() == lname:
                if not placed:
                    out.append((name, value))
                    placed = True
            else:
                out.append(pair)
        if not placed:
            out.append((name, value))
        self._fields = out
        if self._index is not None:
            self._index[lname] = [value]

    def remove(self, *names: bytes) -> None:
        """
        Remove every line of the given fields (names in any case).
        """
        self.discard(frozenset(n.lower() for n in names))

    def discard(self, lower_names: frozenset[bytes] | set[bytes]) -> None:
        """
        Remove every line whose lowercased name is in *lower_names*; the
        fast form of :meth:`remove` for precomputed sets.
        """
        index = self._lookup()
        present = [n for n in lower_names if n in index]
        if not present:
            return
        self._fields = [p for p in self._fields if p[0].lower() not in lower_names]
        for name in present:
            del index[name]

    def encode(self) -> bytes:
        """
        :returns: the field lines as they go on the wire, each ending in
            CRLF (without the blank line that ends a head).
        """
        return b"".join([b"%s: %s\r\n" % pair for pair in self._fields])


class Request:
    """
    A request head as received from the client.

    :ivar method: the method token, e.g. ``b"GET"`` (case-sensitive).
    :ivar target: the request-target as sent (absolute-form for a proxy,
        authority-form for CONNECT; RFC 9112 §3.2).
    :ivar version: ``b"1.1"`` or ``b"1.0"``.
    :ivar headers: the header fields.
    :ivar scheme: ``b"http"`` (``None`` for CONNECT).
    :ivar host: the target host: a name, an IPv4 literal, or an IPv6
        literal without brackets (``str``, for endpoints).
    :ivar port: the target port (``int``).
    :ivar path: the origin-form target sent upstream (``b"/p?q"``).
    """

    __slots__ = ("method", "target", "version", "headers", "scheme", "host", "port", "path")

    def __init__(self, method: bytes, target: bytes, version: bytes, headers: Headers) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.scheme: bytes | None = None
        self.host: str = ""
        self.port: int = 0
        self.path: bytes = b""

    @property
    def authority(self) -> bytes:
        """
        The ``host[:port]`` as it belongs in ``Host`` (RFC 9110 §7.2): IPv6
        literals bracketed, the default port 80 left out.
        """
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port == 80 and self.scheme == b"http":
            return host.encode("ascii")
        return f"{host}:{self.port}".encode("ascii")


class Response:
    """
    A response head: from the upstream, or made by the proxy or a filter.

    :ivar status: the status code (``int``, 100-599).
    :ivar reason: the reason phrase (``bytes``, may be empty).
    :ivar version: the HTTP version the sender used (``b"1.1"``).
    :ivar headers: the header fields.
    :ivar body: the whole body (``bytes``) of a response made here, or
        ``None`` for a response from the upstream (its body streams).
    """

    __slots__ = ("status", "reason", "version", "headers", "body")

    def __init__(self, status: int, reason: bytes, headers: Headers, version: bytes = b"1.1",
                 body: bytes | None = None) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.version = version
        self.body = body

    @classmethod
    def make(cls, status: int, body: bytes | str = b"", headers: Iterable[tuple[bytes, bytes]] = (),
             content_type: bytes = b"text/plain; charset=utf-8") -> Response:
        """
        A whole response for a filter to return, e.g.
        ``Response.make(403, "Forbidden by policy\n")``.

        :param status: the status code; the reason phrase is the standard one.
        :param body: the body (``str`` is encoded as UTF-8).
        :param headers: extra fields, e.g. ``[(b"Proxy-Authenticate",
            b'Basic realm="proxy"')]``.
        :param content_type: the ``Content-Type`` of a non-empty body.
        :returns: a :class:`Response` with ``Content-Length`` set.
        """
        if isinstance(body, str):
            body = body.encode("utf-8")
        fields = list(headers)
        if body:
            fields.append((b"Content-Type", content_type))
        fields.append((b"Content-Length", b"%d" % len(body)))
        try:
            reason = HTTPStatus(status).phrase.encode("ascii")
        except ValueError:
            reason = b""
        return cls(status, reason, Headers(fields), body=body)


class Exchange:
    """
    One request and its outcome: what filters and the access log see.

    :ivar client: the client's ``"host:port"``.
    :ivar client_host: the client's address alone (``str``; IPv6 without
        brackets).
    :ivar request: the :class:`Request` (``None`` if the head never parsed).
    :ivar response: the :class:`Response` sent to the client, or ``None``.
    :ivar started: reactor time (seconds) when the request head was complete.
    :ivar ended: reactor time (seconds) when the exchange ended, or ``None``.
    :ivar bytes_received: request body bytes read from the client, or, for
        a tunnel, bytes relayed from the client (``int``).
    :ivar bytes_sent: response body bytes sent to the client, or, for a
        tunnel, bytes relayed to the client (``int``).
    :ivar upstream_address: the address of the upstream the request went
        to (``str``), or ``None`` when none was used (answered here).
    :ivar user: the authenticated user name (``str``), set by an
        authentication filter, else ``None``.
    :ivar error: the RFC 9209 error type (``str``) when the proxy failed the
        exchange, ``"client_closed"`` when the client left first, else
        ``None``.
    :ivar notes: free-form ``dict`` in which filters leave values for later
        filters and the log (prefix keys with the filter's name).
    """

    __slots__ = ("client", "client_host", "request", "response", "started", "ended",
                 "bytes_received", "bytes_sent", "upstream_address", "user", "error", "notes", "passed")

    def __init__(self, client: str, client_host: str, request: Request | None, started: float) -> None:
        self.client = client
        self.client_host = client_host
        self.request = request
        self.response: Response | None = None
        self.started = started
        self.ended: float | None = None
        self.bytes_received = 0
        self.bytes_sent = 0
        self.upstream_address: str | None = None
        self.user: str | None = None
        self.error: str | None = None
        self.notes: dict = {}
        # How many filters (in config order) the request phase reached.
        self.passed = 0
