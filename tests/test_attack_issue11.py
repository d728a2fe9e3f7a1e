"""Attacks on XFORWARD and XCLIENT (docs/protocol.md, "XFORWARD and XCLIENT"):
an in-process smtpguard on loopback, a strict next hop that records XFORWARD,
raw sockets.  Each test states what the attacker does and what the docs promise."""

from __future__ import annotations

import pytest_twisted
from twisted.internet.interfaces import IListeningPort

from smtpguard.replies import Reply
from tests.conftest import StrictHops
from tests.test_forwarding_end_to_end import start
from tests.test_hostile import RawClient
from tests.test_integration import CLIENT_HELO, in_thread


def name_client(port: int, address: str) -> tuple[RawClient, Reply]:
    """A proxy's connection: greeting, EHLO, XCLIENT ADDR=address; the open client and the reply to XCLIENT."""
    client = RawClient(port)
    client.reply()
    client.send(f"EHLO {CLIENT_HELO}\r\n".encode())
    client.reply()
    client.send(f"XCLIENT ADDR={address}\r\n".encode())
    return client, client.reply()


@pytest_twisted.ensureDeferred
async def test_xclient_repeated_does_not_free_a_client_under_max_connections_per_client(
    listening: list[IListeningPort], strict_hops: StrictHops
) -> None:
    """A proxy connection names 127.0.0.5, then (127.0.0.5 is in xclient_hosts =
    127.0.0.0/8) names 127.0.0.6; a second connection names 127.0.0.5 (now free), a
    third names 127.0.0.5 too while the second is open.  docs/protocol.md: the
    third is over max_connections_per_client (1): 421 4.7.0.  Re-sending XCLIENT
    must not let a connection escape the per-client count."""
    port = await start(listening, strict_hops(), {"xclient_hosts": ["127.0.0.0/8"], "max_connections_per_client": 1})

    def attack() -> list[Reply]:
        first, _ = name_client(port, "127.0.0.5")
        first.send(b"XCLIENT ADDR=127.0.0.6\r\n")
        moved = first.reply()
        second, free = name_client(port, "127.0.0.5")
        third, over = name_client(port, "127.0.0.5")
        for client in (first, second, third):
            client.close()
        return [moved, free, over]

    [moved, free, over] = await in_thread(attack)
    assert (moved.code, free.code) == (220, 220)
    assert (over.code, over.enhanced) == (421, "4.7.0")
