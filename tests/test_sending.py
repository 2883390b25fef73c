"""
``proxyframe.protocol.sending``: bytes for an idle TCP transport go to the
socket at once; anything else keeps Twisted's queue and its order.  Real
sockets (a socket pair), no reactor loop: what is not sent at once stays
queued, so the tests see which path the bytes took.
"""

from __future__ import annotations

import socket

from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor

from proxyframe.protocol.sending import write, write_sequence


def connection() -> tuple[tcp.Connection, socket.socket, MemoryReactor]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5)
    reactor = MemoryReactor()
    conn = tcp.Connection(ours, Protocol(), reactor=reactor)
    conn.connected = True
    return conn, theirs, reactor


def test_idle_transport_sends_at_once():
    """With nothing queued, the bytes reach the peer without the reactor writing them."""
    conn, peer, reactor = connection()
    write(conn, b"HTTP/1.1 200 OK\r\n\r\n")
    write_sequence(conn, [b"5\r\n", b"hello", b"\r\n"])
    assert peer.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n5\r\nhello\r\n"
    assert conn._tempDataLen == 0 and conn not in reactor.getWriters()


def test_what_the_socket_does_not_take_is_queued_in_order():
    """A full socket: the rest is queued for the reactor; later writes queue behind it, never ahead."""
    conn, peer, reactor = connection()
    big = bytes(range(256)) * 40000
    write(conn, big)
    sent_at_once = len(big) - conn._tempDataLen
    assert 0 < sent_at_once < len(big)
    assert conn in reactor.getWriters()
    write(conn, b"after")
    assert conn._tempDataLen == len(big) - sent_at_once + len(b"after")
    received = bytearray()
    while len(received) < len(big) + len(b"after"):
        if conn._tempDataLen or conn.offset < len(conn.dataBuffer):
            conn.doWrite()
        received += peer.recv(1 << 20)
    assert bytes(received) == big + b"after"


def test_half_closed_transport_is_left_to_twisted():
    """After loseWriteConnection nothing is sent directly (Twisted drops writes after a half-close)."""
    conn, peer, reactor = connection()
    conn.loseWriteConnection()
    write(conn, b"late")
    peer.setblocking(False)
    try:
        data = peer.recv(10)
    except BlockingIOError:
        data = b""
    assert data == b""
