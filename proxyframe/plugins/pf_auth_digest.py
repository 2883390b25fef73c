"""
HTTP Digest pieces for the ``auth`` filter (:mod:`proxyframe.plugins.pf_auth`):
parsing auth-params, computing the ``response`` value (RFC 7616 §3.4.1,
``qop=auth`` only) and issuing nonces with an expiry and per-nonce
nonce-count tracking.  A helper module: it defines no plugin objects.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections import OrderedDict

__all__ = ()

#: The algorithms offered, strongest first (RFC 7616 §3.7).
ALGORITHMS = {"SHA-256": hashlib.sha256, "MD5": hashlib.md5}

# auth-param = token BWS "=" BWS ( token / quoted-string )  (RFC 9110 §11.2)
_PARAM = re.compile(rb"""([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)""")
_UNESCAPE = re.compile(rb"\\(.)")


def parse_params(data: bytes) -> dict[bytes, bytes]:
    """
    ``a=1, b="x \\"y\\""`` → ``{b"a": b"1", b"b": b'x "y"'}``; names are
    lowercased, quoted-strings unquoted.
    """
    params = {}
    for name, value in _PARAM.findall(data):
        if value.startswith(b'"'):
            value = _UNESCAPE.sub(rb"\1", value[1:-1])
        params[name.lower()] = value
    return params


def response_value(algorithm: str, ha1: bytes, method: bytes, params: dict[bytes, bytes]) -> bytes:
    """
    The ``response`` a client with the right password sends (RFC 7616
    §3.4.1, qop=auth): ``H(HA1:nonce:nc:cnonce:qop:H(method:uri))`` in
    lowercase hex.
    """
    h = ALGORITHMS[algorithm]
    ha2 = h(b"%s:%s" % (method, params[b"uri"])).hexdigest().encode("ascii")
    fields = (ha1, params[b"nonce"], params[b"nc"], params[b"cnonce"], params[b"qop"], ha2)
    return h(b":".join(fields)).hexdigest().encode("ascii")


class ExpiringMap:
    """
    A bounded map whose entries expire *ttl* seconds after they are added
    (used for nonces here and for the filter's cache of successful checks).

    :param reactor: provides ``seconds()``.
    :param ttl: seconds an entry lives.
    :param limit: entries kept; past it, the oldest is dropped.
    """

    def __init__(self, reactor, ttl: float, limit: int) -> None:
        self._seconds = reactor.seconds
        self._ttl = ttl
        self._limit = limit
        # key → (expires, value); insertion order is expiry order.
        self._entries: OrderedDict = OrderedDict()

    def add(self, key: bytes, value: object) -> None:
        now = self._seconds()
        entries = self._entries
        entries.pop(key, None)
        while entries and (next(iter(entries.values()))[0] <= now or len(entries) >= self._limit):
            entries.popitem(last=False)
        entries[key] = (now + self._ttl, value)

    def get(self, key: bytes) -> object | None:
        """:returns: the live value for *key*, or ``None``."""
        entry = self._entries.get(key)
        if entry is not None:
            if entry[0] > self._seconds():
                return entry[1]
            del self._entries[key]
        return None


class Nonces:
    """
    The Digest nonces this proxy issued and still accepts: random values
    that expire *ttl* seconds after they are issued.  Each remembers the
    highest nonce-count used with it, so a replayed request (a
    nonce-count not above that) is refused (RFC 7616 §3.3, §5.3).

    :param reactor: provides ``seconds()``.
    :param ttl: seconds a nonce may be used after it is issued.
    :param limit: live nonces kept; past it, the oldest is forgotten.
    """

    def __init__(self, reactor, ttl: float, limit: int = 65536) -> None:
        # nonce → [highest nonce-count used]
        self._live = ExpiringMap(reactor, ttl, limit)

    def issue(self) -> bytes:
        """:returns: a fresh nonce (base64url, no padding)."""
        nonce = base64.urlsafe_b64encode(os.urandom(24))
        self._live.add(nonce, [0])
        return nonce

    def use(self, nonce: bytes, count: int) -> bool:
        """
        Record a use of *nonce* with nonce-count *count*.

        :returns: ``False`` when the nonce is not usable: never issued here,
            expired, forgotten, or already used with a count at least as
            high (a replay).
        """
        highest = self._live.get(nonce)
        if highest is None or count <= highest[0]:
            return False
        highest[0] = count
        return True
