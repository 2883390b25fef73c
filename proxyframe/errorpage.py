"""
The responses the proxy makes itself when it cannot (or will not) forward:
a status, a short page saying what happened and to which host, in HTML or
plain text by the client's ``Accept``, and an RFC 9209 ``Proxy-Status``
field naming the error type.
"""

from __future__ import annotations

import html
from http import HTTPStatus

from proxyframe.exchange import Headers, Response

__all__ = ["ProxyError", "error_response"]


class ProxyError(Exception):
    """
    An exchange the proxy answers itself with an error.

    :ivar status: the status code (``int``): 400, 403, 408, 413, 414, 431,
        501, 502, 504, 505.
    :ivar error_type: the RFC 9209 §2.3 error type, e.g. ``"dns_error"``,
        ``"connection_refused"``, ``"http_request_error"``.
    :ivar detail: one sentence for the page (``str``).
    :ivar host: the target ``host:port`` the error concerns, or ``None``.
    """

    def __init__(self, status: int, error_type: str, detail: str, host: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.error_type = error_type
        self.detail = detail
        self.host = host


def error_response(error: ProxyError, accept: bytes | None, pseudonym: bytes) -> Response:
    """
    Render *error* as a response the proxy sends itself.

    :param accept: the request's ``Accept`` value, if any: a client that
        accepts ``text/html`` gets HTML, any other gets plain text.
    :param pseudonym: this proxy's name, which is also its name in
        ``Proxy-Status`` (RFC 9209 §2).
    :returns: the :class:`Response`, with ``Content-Type``,
        ``Content-Length``, ``Cache-Control: no-store``, ``Proxy-Status``
        and its ``body``.
    """
    phrase = HTTPStatus(error.status).phrase
    where = f" ({error.host})" if error.host else ""
    if accept is not None and b"text/html" in accept:
        body = (
            f"<!DOCTYPE html>\n<html><head><title>{error.status} {phrase}</title></head>\n"
            f"<body><h1>{error.status} {phrase}</h1>\n"
            f"<p>{html.escape(error.detail)}{html.escape(where)}</p>\n"
            f"<hr><address>{html.escape(pseudonym.decode('ascii'))}</address></body></html>\n"
        ).encode()
        content_type = b"text/html; charset=utf-8"
    else:
        body = f"{error.status} {phrase}: {error.detail}{where}\n".encode()
        content_type = b"text/plain; charset=utf-8"
    # RFC 9209 §2.1.1: details is a quoted sf-string (printable ASCII).
    details = error.detail.replace("\\", "\\\\").replace('"', '\\"').encode("ascii", "replace")
    proxy_status = b'%s; error=%s; details="%s"' % (pseudonym, error.error_type.encode(), details)
    headers = Headers([
        (b"Content-Type", content_type),
        (b"Content-Length", b"%d" % len(body)),
        (b"Cache-Control", b"no-store"),
        (b"Proxy-Status", proxy_status),
    ])
    return Response(error.status, phrase.encode(), headers, body=body)
