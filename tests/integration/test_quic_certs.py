"""QUIC certificate modes on loopback: private-ca (both sides present a node certificate of
a private CA, bound to their peer id), public-ca (the listener's chain against a trust
store, names checked) and what each refuses."""

from __future__ import annotations

import dataclasses
import datetime
import ssl
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from aioquic._buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import HandshakeCompleted
from aioquic.quic.packet import pull_quic_header
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import crust
from crust import errors
from crust.aio.quic import (
    ClientCertificateQuicConnection,
    QuicSettings,
    alpn_for,
    peer_certificates,
)
from crust.ca import TrustStore, init_ca, issue_certificate, load_ca, load_node_credentials
from crust.cli.main import main
from crust.events import ConnectFailed, ListenerFailed, MessageReceived, PeerConnected
from crust.identity import Identity
from crust.service import Service
from crust.testing.watcher import EventWatcher

TIMEOUT = 10.0
QUIC_ONLY = ("quic://127.0.0.1:0",)
NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


class Pki:
    """Test CAs and node certificates in a temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._n = 0

    def ca(self, name: str, **kwargs: Any) -> Path:
        init_ca(self.root / name, **kwargs)
        return self.root / name

    def node(self, ca: Path, identity: Identity, **kwargs: Any) -> dict[str, Any]:
        """Config fields for a private-ca node of ``ca`` with a new certificate."""
        self._n += 1
        issued = issue_certificate(ca, identity, out=self.root / f"n{self._n}", **kwargs)
        return {
            "quic_certificates": "private-ca",
            "quic_ca_file": issued.ca_file,
            "quic_certificate_file": issued.certificate_file,
            "quic_private_key_file": issued.private_key_file,
        }

    def bundle(self, *cas: Path) -> Path:
        """One PEM file trusting several CAs."""
        self._n += 1
        path = self.root / f"bundle{self._n}.crt"
        path.write_bytes(b"".join((ca / "ca.crt").read_bytes() for ca in cas))
        return path

    def hostname_certificate(self, ca: Path, host: str) -> dict[str, Any]:
        """A certificate naming only a DNS host (as public CAs issue them), no peer id."""
        authority, ca_key = load_ca(ca)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(authority.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + DAY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        self._n += 1
        cert_file, key_file = self.root / f"h{self._n}.crt", self.root / f"h{self._n}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return {"quic_certificate_file": cert_file, "quic_private_key_file": key_file}


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


Make = Callable[..., Awaitable[tuple[Service, EventWatcher]]]


@pytest.fixture
async def node() -> AsyncIterator[Make]:
    """``await node(identity, settings=None, quic_trust=None, **config)`` -> (service,
    watcher). ``settings`` installs prepared QUIC settings (a misconfigured peer that
    skipped the local checks)."""
    async with AsyncExitStack() as stack:
        watchers: list[EventWatcher] = []

        async def factory(
            identity: Identity,
            settings: QuicSettings | None = None,
            quic_trust: TrustStore | None = None,
            **overrides: Any,
        ) -> tuple[Service, EventWatcher]:
            overrides.setdefault("listen", QUIC_ONLY)
            svc = Service(
                crust.Config.for_testing(**overrides), identity=identity, quic_trust=quic_trust
            )
            if settings is not None:
                svc._quic_settings = settings
            watcher = EventWatcher(svc)
            watchers.append(watcher)
            await stack.enter_async_context(svc)
            return svc, watcher

        yield factory
        for w in watchers:
            await w.stop()


def quic_contact(svc: Service, *, pinned: bool = True, host: str | None = None) -> str:
    contact = next(c for c in svc.contacts() if c.startswith("quic://"))
    if not pinned:
        contact = contact.partition("#")[0]
    if host is not None:
        port = contact.partition("#")[0].rpartition(":")[2]
        contact = f"quic://{host}:{port}" + (f"#{svc.peer_id}" if pinned else "")
    return contact


async def exchange(a: Service, wa: EventWatcher, b: Service, wb: EventWatcher, target: str) -> None:
    """a connects to b through ``target``; one message each way."""
    peer = await a.connect(target)
    assert peer == b.peer_id
    await a.send(peer, b"ping from a")
    got = await wb.wait(MessageReceived)
    assert (got.peer, got.data) == (a.peer_id, b"ping from a")
    await b.send(a.peer_id, b"pong from b")
    back = await wa.wait(MessageReceived)
    assert (back.peer, back.data) == (b.peer_id, b"pong from b")
    assert a.connection(b.peer_id).transport == "quic"
    assert b.connection(a.peer_id).transport == "quic"
    ev = await wb.wait(PeerConnected)
    assert (ev.peer, ev.transport, ev.outbound) == (a.peer_id, "quic", False)


async def refused(
    a: Service, wa: EventWatcher, b: Service, wb: EventWatcher, target: str
) -> errors.CrustError:
    """a's connect to b fails with an authentication-class error and leaves no connection
    on either side: afterwards b still accepts a well-configured peer, and that peer is the
    only one it ever reported."""
    with pytest.raises(errors.CrustError) as info:
        await a.connect(target)
    err = info.value
    assert isinstance(err, errors.HandshakeError | errors.ConnectError), repr(err)
    failed = await wa.wait(ConnectFailed)
    assert failed.error is err
    assert a.peers() == [] and not wa.of(PeerConnected)
    assert b.peers() == [] and not wb.of(PeerConnected)
    return err


async def still_serves(
    b: Service, wb: EventWatcher, good: tuple[Service, EventWatcher], target: str
) -> None:
    """A barrier: b accepts ``good``; the only peer b ever reported is ``good``."""
    c, wc = good
    await exchange(c, wc, b, wb, target)
    assert [e.peer for e in wb.of(PeerConnected)] == [c.peer_id]


def presenting(ca: Path, identity: Identity, fields: dict[str, Any]) -> QuicSettings:
    """Settings of a peer that presents the certificate in ``fields`` without the local
    start-up checks (e.g. an expired one): valid settings with the certificate swapped."""
    good = issue_certificate(ca, identity, out=Path(fields["quic_certificate_file"]).parent / "ok")
    config = crust.Config.for_testing(
        quic_certificates="private-ca",
        quic_ca_file=good.ca_file,
        quic_certificate_file=good.certificate_file,
        quic_private_key_file=good.private_key_file,
    )
    settings = QuicSettings.from_config(config, identity)
    creds = load_node_credentials(
        fields["quic_certificate_file"], fields["quic_private_key_file"], now=NOW - 390 * DAY
    )
    return dataclasses.replace(
        settings, certificate=creds.certificate, private_key=creds.private_key, chain=creds.chain
    )


def auth_error(err: BaseException) -> errors.PeerAuthenticationError:
    """The authentication failure in ``err``: itself, or one of a race's errors (a host
    name may also resolve to an address where nothing listens)."""
    if isinstance(err, errors.PeerAuthenticationError):
        return err
    assert isinstance(err, errors.ConnectError), repr(err)
    found = [e for e in err.errors if isinstance(e, errors.PeerAuthenticationError)]
    assert found, repr(err)
    return found[0]


# ================================================================= private-ca


async def test_private_ca_connects_and_exchanges(pki: Pki, node: Make) -> None:
    ca = pki.ca("ca")
    ia, ib = Identity.generate(), Identity.generate()
    a, wa = await node(ia, **pki.node(ca, ia))
    b, wb = await node(ib, **pki.node(ca, ib))
    # unpinned: the certificate's peer id must be the one Noise proves
    await exchange(a, wa, b, wb, quic_contact(b, pinned=False))
    assert b.statistics().handshake_failures == 0


async def test_private_ca_pinned_and_raced_with_tcp(pki: Pki, node: Make) -> None:
    ca = pki.ca("ca")
    ia, ib = Identity.generate(), Identity.generate()
    both = ("tcp://127.0.0.1:0", "quic://127.0.0.1:0")
    a, wa = await node(ia, listen=both, **pki.node(ca, ia))
    b, wb = await node(ib, listen=both, **pki.node(ca, ib))
    await exchange(a, wa, b, wb, quic_contact(b))
    # TCP is unaffected by the QUIC certificate mode
    tcp = next(c for c in a.contacts() if c.startswith("tcp://"))
    assert await b.connect(tcp) == a.peer_id


async def test_certificate_from_another_ca_is_refused_by_the_dialer(pki: Pki, node: Make) -> None:
    ca1, ca2 = pki.ca("ca1"), pki.ca("ca2")
    ia, ib, ic = Identity.generate(), Identity.generate(), Identity.generate()
    a, wa = await node(ia, **pki.node(ca1, ia))
    b, wb = await node(ib, **pki.node(ca2, ib))  # a stranger's network, same network_name
    err = await refused(a, wa, b, wb, quic_contact(b))
    assert isinstance(err, errors.PeerAuthenticationError)
    assert "certificate refused" in str(err)
    # the listener saw the dialer abort its TLS handshake
    assert b.statistics().handshake_failures == 1
    await still_serves(b, wb, await node(ic, **pki.node(ca2, ic)), quic_contact(b))


async def test_certificate_from_another_ca_is_refused_by_the_listener(pki: Pki, node: Make) -> None:
    ca1, ca2 = pki.ca("ca1"), pki.ca("ca2")
    ia, ib, ic = Identity.generate(), Identity.generate(), Identity.generate()
    # a trusts both CAs (so it accepts b), but its own certificate is from ca2, which b
    # does not trust: b must refuse a although a verified b
    a_fields = pki.node(ca2, ia) | {"quic_ca_file": pki.bundle(ca1, ca2)}
    a, wa = await node(ia, **a_fields)
    b, wb = await node(ib, **pki.node(ca1, ib))
    err = await refused(a, wa, b, wb, quic_contact(b))
    assert isinstance(err, errors.PeerAuthenticationError)
    assert "dialer's certificate does not verify" in str(err)
    assert b.statistics().handshake_failures == 1
    await still_serves(b, wb, await node(ic, **pki.node(ca1, ic)), quic_contact(b))


async def test_expired_listener_certificate_is_refused(pki: Pki, node: Make) -> None:
    ca = pki.ca("ca", now=NOW - 400 * DAY)
    ia, ib = Identity.generate(), Identity.generate()
    expired = pki.node(ca, ib, days=30, now=NOW - 400 * DAY)
    config_b = crust.Config.for_testing(listen=QUIC_ONLY, **expired)
    # b's own start-up check refuses the expired certificate ...
    with pytest.raises(errors.ConfigError, match="expired"):
        QuicSettings.from_config(config_b, ib)
    # ... so b is a peer that skipped it
    b, wb = await node(ib, settings=presenting(ca, ib, expired), **expired)
    a, wa = await node(ia, **pki.node(ca, ia))
    err = await refused(a, wa, b, wb, quic_contact(b))
    assert isinstance(err, errors.PeerAuthenticationError)
    assert "no longer valid" in str(err)
    assert b.statistics().handshake_failures == 1


async def test_expired_dialer_certificate_is_refused(pki: Pki, node: Make) -> None:
    ca = pki.ca("ca", now=NOW - 400 * DAY)
    ia, ib, ic = Identity.generate(), Identity.generate(), Identity.generate()
    expired = pki.node(ca, ia, days=30, now=NOW - 400 * DAY)
    a, wa = await node(ia, settings=presenting(ca, ia, expired), **expired)
    b, wb = await node(ib, **pki.node(ca, ib))
    err = await refused(a, wa, b, wb, quic_contact(b))
    assert isinstance(err, errors.PeerAuthenticationError)
    assert "no longer valid" in str(err)
    assert b.statistics().handshake_failures == 1
    await still_serves(b, wb, await node(ic, **pki.node(ca, ic)), quic_contact(b))


async def test_service_refuses_to_use_another_identitys_certificate(pki: Pki, node: Make) -> None:
    ca = pki.ca("ca")
    ix, iy = Identity.generate(), Identity.generate()
    y, wy = await node(iy, **pki.node(ca, ix))
    failed = await wy.wait(ListenerFailed)
    assert isinstance(failed.error, errors.ConfigError)
    assert failed.error.field == "quic_certificate_file"
    assert not y.contacts()
    with pytest.raises(errors.ConfigError, match="is for peer"):
        await y.connect(f"quic://127.0.0.1:9#{ix.peer_id}")


async def test_listener_with_another_identitys_certificate_is_refused(pki: Pki, node: Make) -> None:
    ca = pki.ca("ca")
    ia, ix, iy = Identity.generate(), Identity.generate(), Identity.generate()
    x_fields = pki.node(ca, ix)
    # y presents x's certificate (copied from x): a valid chain naming peer x
    stolen = QuicSettings.from_config(crust.Config.for_testing(**x_fields), ix)
    y, wy = await node(iy, settings=stolen, **x_fields)
    a, wa = await node(ia, **pki.node(ca, ia))
    # unpinned: TLS passes (x's certificate is genuine), Noise proves y != x
    err = await refused(a, wa, y, wy, quic_contact(y, pinned=False))
    assert isinstance(err, errors.PeerAuthenticationError)
    assert str(ix.peer_id) in str(err)
    # pinned to y: refused at the TLS layer already (the certificate names x)
    with pytest.raises(errors.PeerAuthenticationError, match="listener's certificate is for"):
        await a.connect(quic_contact(y))
    # pinned to x (whose certificate y shows): Noise still proves y
    with pytest.raises(errors.PeerAuthenticationError):
        await a.connect(quic_contact(y, pinned=False) + f"#{ix.peer_id}")
    assert a.peers() == [] and y.peers() == [] and not wy.of(PeerConnected)


async def test_dialer_with_another_identitys_certificate_is_refused(pki: Pki, node: Make) -> None:
    ca = pki.ca("ca")
    ib, ic, ix, iy = (Identity.generate() for _ in range(4))
    x_fields = pki.node(ca, ix)
    stolen = QuicSettings.from_config(crust.Config.for_testing(**x_fields), ix)
    y, wy = await node(iy, settings=stolen, **x_fields)
    b, wb = await node(ib, **pki.node(ca, ib))
    err = await refused(y, wy, b, wb, quic_contact(b))
    assert isinstance(err, errors.PeerAuthenticationError)
    assert "peer id was not proven" in str(err) and str(ix.peer_id) in str(err)
    assert b.statistics().handshake_failures == 1
    await still_serves(b, wb, await node(ic, **pki.node(ca, ic)), quic_contact(b))


async def test_pin_that_the_certificate_contradicts_is_refused_before_noise(
    pki: Pki, node: Make
) -> None:
    ca = pki.ca("ca")
    ia, ib = Identity.generate(), Identity.generate()
    a, wa = await node(ia, **pki.node(ca, ia))
    b, wb = await node(ib, **pki.node(ca, ib))
    other = Identity.generate().peer_id
    target = quic_contact(b, pinned=False) + f"#{other}"
    err = await refused(a, wa, b, wb, target)
    assert isinstance(err, errors.PeerAuthenticationError)
    assert f"is for peer {b.peer_id}, the contact expects {other}" in str(err)


async def test_self_signed_dialer_cannot_join_a_private_ca_listener(pki: Pki, node: Make) -> None:
    ca = pki.ca("ca")
    ia, ib = Identity.generate(), Identity.generate()
    a, wa = await node(ia)  # self-signed: presents no certificate when asked
    b, wb = await node(ib, **pki.node(ca, ib))
    err = await refused(a, wa, b, wb, quic_contact(b))
    assert isinstance(err, errors.PeerAuthenticationError)
    assert "certificate is missing" in str(err)
    assert b.statistics().handshake_failures == 1


async def test_self_signed_mode_is_unchanged(node: Make) -> None:
    ia, ib = Identity.generate(), Identity.generate()
    a, wa = await node(ia)
    b, wb = await node(ib)
    await exchange(a, wa, b, wb, quic_contact(b))
    settings = b._quic()
    assert settings.mode == "self-signed" and not settings.requests_client_certificate
    client = settings.configuration(is_client=True)
    assert client.verify_mode == ssl.CERT_NONE and client.certificate is None


# ================================================================= public-ca


async def test_public_ca_with_an_injected_trust_store(pki: Pki, node: Make) -> None:
    """public-ca verifies the listener's chain against the trust store; a listener whose
    certificate names its peer id can be dialed by IP address."""
    ca = pki.ca("public")
    trust = TrustStore.from_file(ca / "ca.crt")
    ia, ib = Identity.generate(), Identity.generate()
    public = {"quic_certificates": "public-ca", "quic_ca_file": None}
    a, wa = await node(ia, quic_trust=trust, **(pki.node(ca, ia) | public))
    b, wb = await node(ib, quic_trust=trust, **(pki.node(ca, ib) | public))
    await exchange(a, wa, b, wb, quic_contact(b))


async def test_public_ca_matches_the_contact_host_name(pki: Pki, node: Make) -> None:
    ca = pki.ca("public")
    trust = TrustStore.from_file(ca / "ca.crt")
    ia, ib, ic = Identity.generate(), Identity.generate(), Identity.generate()
    public = {"quic_certificates": "public-ca", "quic_ca_file": None}
    a, wa = await node(ia, quic_trust=trust, **(pki.node(ca, ia) | public))
    # b's certificate names only the DNS name "localhost" (no peer id): fine by name ...
    b, wb = await node(ib, quic_trust=trust, **(pki.hostname_certificate(ca, "localhost") | public))
    await exchange(a, wa, b, wb, quic_contact(b, pinned=False, host="localhost"))
    await a.disconnect(b.peer_id)
    # ... but by IP address the certificate names nothing we can check
    with pytest.raises(errors.PeerAuthenticationError, match="names no crust peer id"):
        await a.connect(quic_contact(b))
    # a certificate for another host name is refused
    c, wc = await node(
        ic, quic_trust=trust, **(pki.hostname_certificate(ca, "other.test") | public)
    )
    with pytest.raises(errors.CrustError) as info:
        await a.connect(quic_contact(c, host="localhost"))
    message = str(auth_error(info.value))
    assert "'localhost' doesn't match" in message and "other.test" in message
    assert not wc.of(PeerConnected)


async def test_self_signed_listener_fails_public_ca(pki: Pki, node: Make) -> None:
    ca = pki.ca("public")
    ia, ib = Identity.generate(), Identity.generate()
    public = {"quic_certificates": "public-ca", "quic_ca_file": None}
    b, wb = await node(ib)  # self-signed listener
    # against the injected test roots
    a, wa = await node(
        ia, quic_trust=TrustStore.from_file(ca / "ca.crt"), **(pki.node(ca, ia) | public)
    )
    err = await refused(a, wa, b, wb, quic_contact(b))
    assert isinstance(err, errors.PeerAuthenticationError)
    # and against the system roots (read only, never modified)
    ia2 = Identity.generate()
    a2, wa2 = await node(ia2, **(pki.node(ca, ia2) | public))
    assert a2._quic().trust is not None and a2._quic().trust != TrustStore()
    err = await refused(a2, wa2, b, wb, quic_contact(b))
    assert isinstance(err, errors.PeerAuthenticationError)


# ================================================================= aioquic internals


def test_aioquic_client_certificate_internals() -> None:
    """crust asks for the dialer's certificate through aioquic's private TLS switch and
    reads the certificates both sides presented from private attributes: this test does a
    full in-memory handshake and fails loudly if aioquic renames any of them."""
    ca_key = ec.generate_private_key(ec.SECP256R1())

    def cert(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        c = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")]))
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + DAY)
            .sign(ca_key, hashes.SHA256())
        )
        return c, key

    server_cert, server_key = cert("server")
    client_cert, client_key = cert("client")
    alpn = [alpn_for("crust")]
    cconf = QuicConfiguration(is_client=True, alpn_protocols=alpn, verify_mode=ssl.CERT_NONE)
    cconf.certificate, cconf.private_key = client_cert, client_key
    sconf = QuicConfiguration(is_client=False, alpn_protocols=alpn)
    sconf.certificate, sconf.private_key = server_cert, server_key
    client = QuicConnection(configuration=cconf)
    server: QuicConnection | None = None
    now = 0.0
    client.connect(("127.0.0.1", 2), now=now)
    assert peer_certificates(client) == (None, [])
    done = {"client": False, "server": False}
    for _ in range(20):
        for data, _ in client.datagrams_to_send(now=now):
            if server is None:
                header = pull_quic_header(Buffer(data=data), host_cid_length=8)
                server = ClientCertificateQuicConnection(
                    configuration=sconf,
                    original_destination_connection_id=header.destination_cid,
                )
            server.receive_datagram(data, ("127.0.0.1", 1), now=now)
        assert server is not None
        assert server.tls._request_client_certificate is True
        for data, _ in server.datagrams_to_send(now=now):
            client.receive_datagram(data, ("127.0.0.1", 2), now=now)
        for name, conn in (("client", client), ("server", server)):
            while (ev := conn.next_event()) is not None:
                if isinstance(ev, HandshakeCompleted):
                    done[name] = True
        if all(done.values()):
            break
        now += 0.01
    assert done == {"client": True, "server": True}
    assert server is not None
    assert peer_certificates(client) == (server_cert, [])
    assert peer_certificates(server) == (client_cert, [])
    # without the switch the server never learns the client's certificate
    plain = QuicConnection(configuration=sconf, original_destination_connection_id=bytes(8))
    assert peer_certificates(plain) == (None, [])


async def test_cli_made_ca_and_printed_config_lines_connect(tmp_path: Path, node: Make) -> None:
    """The user's path: `crust ca init`, `crust ca issue` per node, paste the printed lines
    into each node's config file."""
    runner = CliRunner()
    assert runner.invoke(main, ["ca", "init", str(tmp_path / "ca")]).exit_code == 0
    services = []
    for name in ("a", "b"):
        ident = Identity.generate()
        ident.save(tmp_path / f"{name}.pem")
        result = runner.invoke(
            main, ["ca", "issue", str(tmp_path / "ca"), "--identity", str(tmp_path / f"{name}.pem")]
        )
        assert result.exit_code == 0, result.output
        lines = [ln.strip() for ln in result.output.splitlines() if ln.strip().startswith("quic")]
        config_file = tmp_path / f"{name}.toml"
        config_file.write_text("\n".join(lines) + "\n")
        config = crust.Config.load(config_file)
        fields = {k: getattr(config, k) for k in tomllib.loads(config_file.read_text())}
        services.append(await node(Identity.load(tmp_path / f"{name}.pem"), **fields))
    (a, wa), (b, wb) = services
    await exchange(a, wa, b, wb, quic_contact(b))
