"""
Credential files for the ``auth`` filter (:mod:`proxyframe.plugins.pf_auth`):
Apache's htpasswd (Basic) and htdigest (Digest) formats, reloaded when they
change.  A helper module: it defines no plugin objects.

Lookups read the disk and hashing is slow, so everything here is meant to
run in a thread, never on the reactor thread; a lock keeps the threads from
reloading at once.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from passlib.context import CryptContext
from twisted.logger import Logger

__all__ = ()

_log = Logger()

#: The hashes Apache's ``htpasswd`` writes that are still worth using:
#: bcrypt (``$2y$``, ``$2b$``; ``htpasswd -B``), SHA-256/512-crypt
#: (``$5$``, ``$6$``; ``-2``, ``-5``) and apr1 (``$apr1$``; ``-m``).
HASHES = CryptContext(schemes=["bcrypt", "sha256_crypt", "sha512_crypt", "apr_md5_crypt"])

#: bcrypt uses the first 72 bytes of a password (as Apache does); the
#: ``bcrypt`` package refuses longer ones instead of cutting them.
_BCRYPT_MAX = 72

#: Digest HA1 lengths in hex digits → algorithm (RFC 7616 §3.4.2).
_HA1_ALGORITHMS = {32: "MD5", 64: "SHA-256"}
_HEX = re.compile(r"[0-9a-fA-F]+")

#: Seconds between two looks at a file's modification time.
CHECK_INTERVAL = 1.0

Parser = Callable[[str], tuple[dict, list[str]]]


def verify_password(password: bytes, hashed: str) -> bool:
    """
    :returns: whether *password* matches the htpasswd hash *hashed* (in
        constant time; slow by design: call it in a thread).
    """
    scheme = HASHES.identify(hashed)
    if scheme is None:
        return False
    if scheme == "bcrypt":
        password = password[:_BCRYPT_MAX]
    return HASHES.verify(password, hashed)


def _lines(text: str):
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield number, line


def parse_htpasswd(text: str) -> tuple[dict, list[str]]:
    """
    ``user:hash`` lines → ``({user: hash}, problems)``.
    """
    entries: dict = {}
    problems = []
    for number, line in _lines(text):
        user, colon, hashed = line.partition(":")
        if not colon or not user:
            problems.append(f"line {number}: not 'user:hash'")
        elif HASHES.identify(hashed) is None:
            problems.append(f"line {number}: user {user!r}: unsupported hash "
                            "(use bcrypt, SHA-256-crypt, SHA-512-crypt or apr1)")
        else:
            entries[user] = hashed
    return entries, problems


def parse_htdigest(text: str) -> tuple[dict, list[str]]:
    """
    ``user:realm:HA1`` lines → ``({(user, realm, algorithm): ha1}, problems)``.
    The HA1's length tells the algorithm: 32 hex digits are MD5 (what
    ``htdigest`` writes), 64 are SHA-256.
    """
    entries: dict = {}
    problems = []
    for number, line in _lines(text):
        user, _, rest = line.partition(":")
        realm, colon, ha1 = rest.rpartition(":")
        algorithm = _HA1_ALGORITHMS.get(len(ha1))
        if not colon or not user or algorithm is None or not _HEX.fullmatch(ha1):
            problems.append(f"line {number}: not 'user:realm:HA1' with a 32 (MD5) or 64 (SHA-256) hex digit HA1")
        else:
            entries[(user, realm, algorithm)] = ha1.lower().encode("ascii")
    return entries, problems


class CredentialFile:
    """
    A parsed credential file that reloads itself when it changes: a lookup
    looks at the file's modification time at most once per
    :data:`CHECK_INTERVAL` seconds.  Call :meth:`get` in a thread.

    :raises OSError: (from the constructor) the file cannot be read.
    :raises ValueError: (from the constructor) a line is malformed; the
        message lists the lines.  On a later reload, bad lines are logged
        and skipped, and an unreadable file keeps the last good contents.
    """

    def __init__(self, path: Path, parse: Parser, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._parse = parse
        self._clock = clock
        self._lock = threading.Lock()
        self._checked = clock()
        self._signature = self._stat()
        self.entries, problems = parse(self._read())
        if problems:
            raise ValueError("; ".join(problems))

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read(self) -> str:
        return self.path.read_bytes().decode("utf-8", "surrogateescape")

    def get(self, key):
        """:returns: the entry for *key*, or ``None``."""
        with self._lock:
            now = self._clock()
            if now - self._checked >= CHECK_INTERVAL:
                self._checked = now
                self._reload_if_changed()
            return self.entries.get(key)

    def _reload_if_changed(self) -> None:
        try:
            signature = self._stat()
            if signature == self._signature:
                return
            text = self._read()
        except OSError as e:
            _log.error("auth: cannot reload {path}: {error}; keeping what was loaded", path=str(self.path),
                       error=e)
            return
        self._signature = signature
        self.entries, problems = self._parse(text)
        for problem in problems:
            _log.warn("auth: {path}: {problem} (skipped)", path=str(self.path), problem=problem)
        _log.info("auth: reloaded {path} ({count} entries)", path=str(self.path), count=len(self.entries))
