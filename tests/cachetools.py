"""
Helpers for the cache tests: an origin handler whose responses the test
scripts per target (:class:`Script`), and a client that sends one request
through the proxy and returns every field (:func:`fetch`).
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass, field
from email.utils import formatdate

from support import OriginConnection, Received


@dataclass
class Reply:
    """A response as the client received it."""

    status: int
    fields: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.fields if n.lower() == name.lower()]
        return ", ".join(values) if values else None

    def cache_status(self) -> str:
        value = self.header("cache-status")
        assert value is not None, f"no Cache-Status in {self.fields}"
        return value


def fetch(proxy, url: str, headers: dict[str, str] | None = None, method: str = "GET",
          timeout: float = 10.0) -> Reply:
    """Send one absolute-form request through *proxy* on a new connection."""
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=timeout)
    try:
        # Only the fields the test gives (http.client would add its own
        # Accept-Encoding); Host comes from the target at the proxy.
        conn.putrequest(method, url, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
        return Reply(resp.status, resp.getheaders(), body)
    finally:
        conn.close()


def http_date(offset: float = 0.0) -> str:
    """An HTTP-date *offset* seconds from now."""
    import time

    return formatdate(time.time() + offset, usegmt=True)


@dataclass
class Route:
    """
    What the origin answers for one target.

    :ivar status: the status code.
    :ivar fields: the header fields (``Content-Length`` is added unless
        *framing* says otherwise).
    :ivar body: the body.
    :ivar framing: ``"length"``, ``"chunked"`` or ``"close"``.
    :ivar cut: send only this many body bytes, then close (a truncated
        response).
    :ivar gate: when set, the body waits until the event is set (the head
        goes out first).
    """

    status: int = 200
    fields: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b"hello"
    framing: str = "length"
    cut: int | None = None
    gate: threading.Event | None = None


class Script:
    """
    An origin handler answering each target (path and query) with its
    :class:`Route`, or a function ``received -> Route``; unknown targets
    get 404.  :attr:`seen` counts the requests per target.
    """

    def __init__(self) -> None:
        self.routes: dict[str, Route | object] = {}
        self.seen: dict[str, list[Received]] = {}
        self._lock = threading.Lock()

    def count(self, target: str) -> int:
        with self._lock:
            return len(self.seen.get(target, ()))

    def requests(self, target: str) -> list[Received]:
        with self._lock:
            return list(self.seen.get(target, ()))

    def __call__(self, conn: OriginConnection, req: Received) -> bool:
        with self._lock:
            self.seen.setdefault(req.target, []).append(req)
        route = self.routes.get(req.target)
        if callable(route):
            route = route(req)
        if route is None:
            route = Route(404, [("Cache-Control", "no-store")], b"not here")
        no_body = req.method == "HEAD" or route.status in (204, 304)
        head = [f"HTTP/1.1 {route.status} Status"] + [f"{n}: {v}" for n, v in route.fields]
        if route.framing == "length" and route.status not in (204, 304):
            head.append(f"Content-Length: {len(route.body)}")
        elif route.framing == "chunked":
            head.append("Transfer-Encoding: chunked")
        elif route.framing == "close":
            head.append("Connection: close")
        conn.send(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if no_body:
            return route.framing != "close"
        if route.gate is not None:
            route.gate.wait(10)
        body = route.body if route.cut is None else route.body[:route.cut]
        if route.framing == "chunked":
            if body:
                conn.send(b"%x\r\n%s\r\n" % (len(body), body))
            if route.cut is None:
                conn.send(b"0\r\n\r\n")
        else:
            conn.send(body)
        return route.framing != "close" and route.cut is None
