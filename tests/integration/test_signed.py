"""Signed messages between two services on loopback, over TCP and QUIC."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import crust
from crust.events import AbuseDetected, MessageReceived, PeerConnected
from crust.proto.session import Kind
from crust.service import Service
from crust.signing import SIGNED_HEADER, SignedMessage, signing_input, verify_proof


@pytest.fixture(params=["tcp", "quic"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def contact(svc: Service, transport: str) -> str:
    return next(c for c in svc.contacts() if c.startswith(transport + "://"))


async def test_signed_messages_and_rejections(make: Callable[..., Any], transport: str) -> None:
    a, _ = await make(network_name="signed-net")
    b, wb = await make(network_name="signed-net")
    peer = await a.connect(contact(b, transport))
    await wb.wait(PeerConnected, lambda e: e.peer == a.peer_id)
    payloads = [b"hello", bytes(300_000), b"third"]
    for data in payloads:
        await a.send(peer, data, signed=True)
    await a.send(peer, b"unsigned")
    got = await wb.messages(4)
    assert [m.data for m in got] == [*payloads, b"unsigned"]
    assert got[3].signature is None and got[3].proof is None
    for m in got[:3]:
        assert m.proof is not None and m.signature == m.proof.signature
        kept = m.proof.to_bytes()
        assert verify_proof(
            SignedMessage.from_bytes(kept),
            sender=a.peer_id,
            receiver=b.peer_id,
            network="signed-net",
        )
    assert [m.proof.sequence for m in got[:3] if m.proof] == [1, 2, 3]

    # a hostile sender: a forged signature, then a replay of a genuine signed message
    conn = a._active[peer]
    session = conn.session
    impostor = crust.Identity.generate()
    forged_sig = impostor.sign(
        signing_input(a.peer_id, b.peer_id, session.handshake_hash, 4, "signed-net", b"forged")
    )
    first = got[0].proof
    assert first is not None
    session._control.append((Kind.SMSG, SIGNED_HEADER.pack(4, forged_sig) + b"forged"))
    session._control.append((Kind.SMSG, SIGNED_HEADER.pack(1, first.signature) + first.data))
    conn.control_changed()
    await wb.count(AbuseDetected, 2)
    abuse = [e for e in wb.of(AbuseDetected) if e.kind == "forged-signature"]
    assert len(abuse) == 2 and all(e.peer == a.peer_id for e in abuse)
    session._sign_seq = 4  # the forged message used sequence 4
    await a.send(peer, b"after", signed=True)
    await wb.wait(MessageReceived, lambda e: e.data == b"after")
    assert [m.data for m in wb.of(MessageReceived)] == [*payloads, b"unsigned", b"after"]
    assert b.is_connected(a.peer_id)  # rejected messages do not cost the connection
    sb, sa = b.statistics(), a.statistics()
    assert sb.signature_failures == 2
    assert sb.signed_messages_received == 4
    assert sa.signed_messages_sent == 4
    assert sb.abuse_by_kind == {"forged-signature": 2} and sb.abuse_events == 2
    assert sb.messages_received_by_transport == {transport: 5}
    assert sb.bytes_received_by_transport[transport] > 300_000
    assert sa.bytes_sent_by_transport[transport] == sa.bytes_sent


async def test_signed_messages_across_the_relay_to_direct_handover(
    make: Callable[..., Any], transport: str
) -> None:
    """Signed messages sent before and after a relayed connection is replaced by a punched
    one: every message arrives once, in order, verified; each connection numbers its own
    sequence."""
    listen = (f"{transport}://127.0.0.1:0",)
    node, wn = await make(listen=(*listen, "tcp://127.0.0.1:0"))
    a, wa = await make(listen=listen)
    b, wb = await make(listen=listen)
    await a.connect(node.contacts())
    await b.connect(node.contacts())
    await wn.count(PeerConnected, 2)
    assert await a._relayed(b.peer_id) == b.peer_id
    await wb.wait(PeerConnected, lambda e: e.path == "relayed")
    n = 200
    for i in range(n // 2):
        await a.send(b.peer_id, i.to_bytes(4, "big") + bytes(2000), signed=True)
    assert a._traversal is not None
    await a._traversal.punch(b.peer_id)  # the relayed path drains while the new one starts
    await wa.wait(PeerConnected, lambda e: e.path == "punched")
    for i in range(n // 2, n):
        await a.send(b.peer_id, i.to_bytes(4, "big") + bytes(2000), signed=True)
    got = await wb.messages(n, timeout=20)
    assert [int.from_bytes(m.data[:4], "big") for m in got] == list(range(n))
    proofs = [m.proof for m in got]
    assert all(p is not None and verify_proof(p, sender=a.peer_id) for p in proofs)
    by_conn: dict[bytes, list[int]] = {}
    for p in proofs:
        assert p is not None
        by_conn.setdefault(p.connection, []).append(p.sequence)
    for seqs in by_conn.values():
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert len(by_conn) == 2  # each connection signed with its own id and sequence
    assert b.statistics().signature_failures == 0
    assert b.connection(a.peer_id).path == "punched"
