"""
``header-rewrite``: add, set or remove header fields on requests before
they go upstream, and on responses before they reach the client.

A contrib filter: copy this file into a directory named in the config's
``plugin_paths`` (or point ``plugin_paths`` at this directory)::

    plugin_paths = ["plugins"]

    [[filter]]
    use = "header-rewrite"
    request_set = ["X-Forwarded-Proto: http"]
    request_remove = ["Cookie"]
    response_add = ["X-Served-Via: proxyframe"]
    response_remove = ["Server"]

It is written only against the public contract, as any third party would.
"""

from __future__ import annotations

from twisted.plugin import IPlugin
from zope.interface import implementer

from proxyframe.config import ConfigError
from proxyframe.filters import Filter, check_options
from proxyframe.interfaces import IFilterFactory

_OPTIONS = ("request_add", "request_set", "request_remove",
            "response_add", "response_set", "response_remove")


def _fields(options: dict, key: str) -> list[tuple[bytes, bytes]]:
    """``["Name: value", ...]`` → ``[(b"Name", b"value"), ...]``."""
    fields = []
    for item in options.get(key, []):
        name, colon, value = item.partition(":") if isinstance(item, str) else ("", "", "")
        if not colon or not name.strip() or name != name.strip():
            raise ConfigError(f"{key}: {item!r} is not 'Name: value'")
        fields.append((name.encode("ascii"), value.strip().encode("latin-1")))
    return fields


def _names(options: dict, key: str) -> list[bytes]:
    names = options.get(key, [])
    if not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{key} must be a list of field names")
    return [n.encode("ascii") for n in names]


class _Rewrite:
    """One direction's edits, applied to a Headers: remove, then set, then add."""

    def __init__(self, options: dict, side: str) -> None:
        self.remove = _names(options, f"{side}_remove")
        self.set = _fields(options, f"{side}_set")
        self.add = _fields(options, f"{side}_add")

    def apply(self, headers) -> None:
        if self.remove:
            headers.remove(*self.remove)
        for name, value in self.set:
            headers.set(name, value)
        for name, value in self.add:
            headers.add(name, value)


class HeaderRewrite(Filter):
    """Edits request and response header fields (see the module docstring)."""

    def __init__(self, request: _Rewrite, response: _Rewrite) -> None:
        self._request = request
        self._response = response

    def request_received(self, exchange):
        self._request.apply(exchange.request.headers)

    def response_received(self, exchange):
        self._response.apply(exchange.response.headers)


@implementer(IPlugin, IFilterFactory)
class HeaderRewriteFactory:
    name = "header-rewrite"
    description = "Add, set or remove request and response header fields"

    def build(self, options: dict, context) -> HeaderRewrite:
        check_options(options, _OPTIONS)
        for key in _OPTIONS:
            if not isinstance(options.get(key, []), list):
                raise ConfigError(f"{key} must be a list of strings")
        return HeaderRewrite(_Rewrite(options, "request"), _Rewrite(options, "response"))


header_rewrite = HeaderRewriteFactory()
