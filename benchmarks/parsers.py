#!/usr/bin/env python3
"""
Head parsing: proxyframe's own parser against httptools (llhttp, in C).

Times what each needs to turn the request head wrk sends, and the response
head nginx answers with, into the same :class:`~proxyframe.exchange.Request`
or :class:`~proxyframe.exchange.Response` with its :class:`Headers`, plus
one field lookup (every head is looked up for its framing).  httptools
calls back into Python once per field, so its C speed is partly spent
there; and it would still need the checks ``proxyframe.http1`` makes on top
of what llhttp rejects.  This decides whether a C parser is worth those.

    pip install httptools        # not a dependency of proxyframe
    python benchmarks/parsers.py

Run from the repository root with proxyframe's dependencies importable.
"""

from __future__ import annotations

import os
import sys
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxyframe.exchange import Headers, Request, Response  # noqa: E402
from proxyframe.http1 import parse_request_head, parse_response_head  # noqa: E402

REQUEST = (b"GET http://127.0.0.1:9/small HTTP/1.1\r\nHost: 127.0.0.1:9\r\n"
           b"User-Agent: wrk\r\nAccept: */*\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 30 Nov 2026 09:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 1024\r\nConnection: keep-alive\r\n"
            b"Cache-Control: no-store\r\n\r\n")
MAX_FIELDS = 100


class _Collect:
    """httptools callbacks: the start line's text and the fields, in order."""

    __slots__ = ("text", "fields")

    def __init__(self) -> None:
        self.text = b""
        self.fields: list[tuple[bytes, bytes]] = []

    def on_url(self, url: bytes) -> None:
        self.text += url

    on_status = on_url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))


def proxyframe_request() -> Request:
    request = parse_request_head(REQUEST[:REQUEST.find(b"\r\n\r\n")], MAX_FIELDS)
    request.headers.get(b"connection")
    return request


def proxyframe_response() -> Response:
    response = parse_response_head(RESPONSE[:RESPONSE.find(b"\r\n\r\n")], MAX_FIELDS)
    response.headers.get(b"connection")
    return response


# The two httptools timings are spelled out rather than sharing a helper:
# an extra Python call would weigh on httptools' side only.
def httptools_request(httptools) -> Request:
    collected = _Collect()
    parser = httptools.HttpRequestParser(collected)
    parser.feed_data(REQUEST)
    headers = Headers(collected.fields)
    request = Request(parser.get_method(), collected.text, parser.get_http_version().encode(), headers)
    headers.get(b"connection")
    return request


def httptools_response(httptools) -> Response:
    collected = _Collect()
    parser = httptools.HttpResponseParser(collected)
    parser.feed_data(RESPONSE)
    headers = Headers(collected.fields)
    response = Response(parser.get_status_code(), collected.text, headers, parser.get_http_version().encode())
    headers.get(b"connection")
    return response


def best_us(function, number: int = 100_000, repeat: int = 5) -> float:
    """The best of *repeat* timings, µs per call."""
    return min(timeit.repeat(function, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    try:
        import httptools
    except ModuleNotFoundError:
        raise SystemExit("httptools is not installed: pip install httptools") from None
    rows = [
        ("request head", best_us(proxyframe_request), best_us(lambda: httptools_request(httptools))),
        ("response head", best_us(proxyframe_response), best_us(lambda: httptools_response(httptools))),
    ]
    print(f"{'µs per head':<16}{'proxyframe':>12}{'httptools':>12}")
    for name, ours, theirs in rows:
        print(f"{name:<16}{ours:>12.2f}{theirs:>12.2f}")
    saved = sum(ours - theirs for _, ours, theirs in rows)
    print(f"httptools {httptools.__version__}: {saved:.2f} µs less per relayed exchange (both heads), "
          "before any of http1's own checks")


if __name__ == "__main__":
    main()
