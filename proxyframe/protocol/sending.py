"""
Writing to a TCP transport without waiting for the next turn of the
reactor when nothing is queued.

Twisted's ``transport.write`` only queues: the bytes go out when the
reactor next finds the socket writable, which costs a registration with
epoll, one more pass through the event loop and a deregistration — for
every response of a keep-alive exchange.  When the transport has nothing
queued, :func:`write` hands the bytes to the socket at once (through the
transport's own ``writeSomeData``), and queues only what the socket did
not take.  Order is kept, as nothing was queued before; flow control is
unchanged, as only queued bytes count toward the transport's buffer.
"""

from __future__ import annotations

from twisted.internet.tcp import Connection

__all__ = ["nothing_queued", "write", "write_sequence"]


def nothing_queued(transport) -> bool:
    """Whether *transport* is a TCP connection with nothing queued, open for writing."""
    return (isinstance(transport, Connection) and transport.connected and not transport.disconnecting
            and not transport._writeDisconnecting and not transport._tempDataLen
            and transport.offset == len(transport.dataBuffer))


def write(transport, data: bytes) -> None:
    """
    Send *data* on *transport* now if it can go at once, else queue it (as
    ``transport.write``).  A lost connection is left for the transport to
    notice, as with a queued write.
    """
    if data and nothing_queued(transport):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)


def write_sequence(transport, pieces: list[bytes]) -> None:
    """:func:`write` for several pieces (joined when they can go at once)."""
    if nothing_queued(transport):
        write(transport, b"".join(pieces))
    else:
        transport.writeSequence(pieces)
