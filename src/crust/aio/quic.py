"""QUIC transport: crust's own Session runs on the first bidirectional stream of a QUIC
connection (aioquic's sans-IO ``QuicConnection``), all connections of a listener share one
:class:`~crust.aio.udp_mux.UdpMux` socket.

:class:`QuicLink` is both the mux's view of one QUIC connection and the stream transport a
:class:`~crust.aio.connection.Connection` writes to (``writelines``/``close``/``abort``/
``pause_reading``/``resume_reading``/``is_closing``), so the Session (Noise XX, framing,
priorities, heartbeats) behaves exactly as over TCP.

aioquic internals used (no public API exists for them; all behind ``getattr`` with a safe
fallback): ``QuicConnection._close_event`` to notice a close at once rather than after the
3 PTO draining period, and the stream sender's ``_buffer_start``/``_buffer_stop`` (bytes
written but not yet acknowledged) to emulate ``pause_writing``. In the CA certificate modes
also ``QuicConnection._initialize`` (wrapped to set ``tls._request_client_certificate``, so
the server asks for the client's certificate) and ``tls._peer_certificate`` /
``tls._peer_certificate_chain`` (the certificate the remote presented); these fail closed:
a missing attribute refuses the connection. ``QuicConnection._pacing_at`` (when pacing
allows the next packet) lets one transmit build every packet that is already due. A dialer's
``tls._supported_groups`` is narrowed to X25519 (every crust peer accepts it), so its Initial
carries one key share instead of four (P-256, P-384, X25519, X448: about 0.4 ms of key
generation per dial); should the attribute disappear, all four are offered as before.
``tests/integration/test_quic.py`` and
``tests/integration/test_quic_certs.py`` fail loudly if aioquic renames any of them.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO, cast

from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode
from aioquic.tls import (
    Alert,
    AlertBadCertificate,
    AlertDescription,
    Group,
    verify_certificate,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from crust import errors
from crust.aio.connection import Connection
from crust.aio.keylog import track_first_random
from crust.aio.udp_mux import CID_LENGTH, Address, UdpMux
from crust.ca import (
    NodeKey,
    TrustStore,
    certificate_peer_id,
    load_node_credentials,
    system_trust_store,
)
from crust.config import MAX_QUIC_DATAGRAM, Config
from crust.contact import format_address
from crust.identity import Identity, PeerId
from crust.proto.session import State

log = logging.getLogger("crust.quic")

ALPN_PREFIX = "crust/1/"
MAX_ALPN_NAME = 48
WRITE_HIGH_WATER = 4 * 1024 * 1024
"""Stream bytes handed to aioquic and not yet acknowledged above which the Session stops
writing (what may be in flight: 4 MiB covers 10 MB/s at 400 ms round trip)."""
WRITE_LOW_WATER = 2 * 1024 * 1024
"""Writing resumes below this; half the window, so the sender refills while the peer still
has data to read (measured: 1 MiB / 256 KiB left both sides idle in turn)."""
PAUSED_BUFFER_LIMIT = 1024 * 1024
"""While reading is paused, stream data is buffered up to this much; beyond it the link's
datagrams are dropped unread, so the peer's QUIC stack backs off and resends later."""
TRANSMIT_EARLY = 256 * 1024
"""Once this much stream data is written since the last transmit, transmit at once."""
PACING_ROUNDS = 32
"""At most this many ``datagrams_to_send`` calls per transmit while aioquic's pacing time
has already passed (see :meth:`QuicLink._transmit`)."""
CLOSE_LINGER = 5.0
"""After our FIN, how long to wait for the peer's FIN before closing the QUIC connection."""
ALPN_MISMATCH = QuicErrorCode.CRYPTO_ERROR + AlertDescription.no_application_protocol
CERTIFICATE_ALERTS = frozenset(
    {
        AlertDescription.bad_certificate,
        AlertDescription.unsupported_certificate,
        AlertDescription.certificate_revoked,
        AlertDescription.certificate_expired,
        AlertDescription.certificate_unknown,
        AlertDescription.unknown_ca,
        AlertDescription.access_denied,
        AlertDescription.decrypt_error,
        AlertDescription.certificate_required,
    }
)
"""TLS alerts that mean "a certificate (or the proof of its key) was refused"."""
SELF_SIGNED = "self-signed"
PRIVATE_CA = "private-ca"
PUBLIC_CA = "public-ca"
INTERNET_DATAGRAM_SIZE = 1350
"""Default largest UDP payload towards any address but loopback (aioquic does no path MTU
discovery, so this must fit every path: see docs/design.md, QUIC)."""
LOOPBACK_DATAGRAM_SIZE = MAX_QUIC_DATAGRAM
"""Default largest UDP payload towards a loopback address (fits every loopback MTU)."""


def datagram_size_for(host: str, configured: int | None = None) -> int:
    """The largest UDP payload to send to ``host``: ``configured`` if given, else
    :data:`LOOPBACK_DATAGRAM_SIZE` for a loopback address and
    :data:`INTERNET_DATAGRAM_SIZE` otherwise."""
    if configured is not None:
        return configured
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return LOOPBACK_DATAGRAM_SIZE if loopback else INTERNET_DATAGRAM_SIZE


def alpn_for(network_name: str) -> str:
    """``crust/1/<name>``; a long or non-ASCII name becomes a short hash of it."""
    if network_name.isascii() and len(network_name) <= MAX_ALPN_NAME:
        return ALPN_PREFIX + network_name
    return ALPN_PREFIX + "h:" + hashlib.sha256(network_name.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class QuicSettings:
    """What every QUIC connection of one service shares."""

    alpn: str
    certificate: x509.Certificate
    private_key: NodeKey
    idle_timeout: float
    handshake_timeout: float
    secrets_log: TextIO | None = None
    """The key log (``Config.keylog_file``): aioquic appends TLS secrets in NSS format."""
    mode: str = SELF_SIGNED
    """``quic_certificates``: what the TLS layer verifies (docs/design.md, "QUIC
    certificate modes")."""
    chain: tuple[x509.Certificate, ...] = ()
    """Intermediate certificates sent after ours (CA modes)."""
    trust: TrustStore | None = None
    """What the remote's chain is verified against (CA modes)."""

    @classmethod
    def from_config(
        cls,
        config: Config,
        identity: Identity,
        *,
        trust: TrustStore | None = None,
        secrets_log: TextIO | None = None,
    ) -> QuicSettings:
        """The QUIC/TLS side of a service. ``trust`` replaces the system roots in
        ``public-ca`` mode. Raises ConfigError naming the config field at fault."""
        idle = max(2 * config.heartbeat_timeout, config.handshake_timeout)
        alpn = alpn_for(config.network_name)
        mode = config.quic_certificates
        if mode == SELF_SIGNED:
            return cls.self_signed(
                config.network_name,
                idle_timeout=idle,
                handshake_timeout=config.handshake_timeout,
                secrets_log=secrets_log,
            )
        if config.quic_certificate_file is None or config.quic_private_key_file is None:
            raise errors.ConfigError(f"required in {mode!r} mode", "quic_certificate_file")
        creds = load_node_credentials(config.quic_certificate_file, config.quic_private_key_file)
        if creds.peer_id is not None and creds.peer_id != identity.peer_id:
            raise errors.ConfigError(
                f"the certificate is for peer {creds.peer_id}, this service is {identity.peer_id}",
                "quic_certificate_file",
            )
        if mode == PRIVATE_CA:
            if config.quic_ca_file is None:
                raise errors.ConfigError("required in 'private-ca' mode", "quic_ca_file")
            if creds.peer_id is None:
                raise errors.ConfigError(
                    "the certificate names no crust peer id (issue it with `crust ca issue`)",
                    "quic_certificate_file",
                )
            trust = TrustStore.from_file(config.quic_ca_file)
            try:
                verify_chain(creds.certificate, creds.chain, trust)
            except Alert as exc:
                raise errors.ConfigError(
                    f"the certificate does not verify against quic_ca_file: {exc}",
                    "quic_certificate_file",
                ) from exc
        elif trust is None:
            trust = system_trust_store()
        return cls(
            alpn,
            creds.certificate,
            creds.private_key,
            idle,
            config.handshake_timeout,
            mode=mode,
            chain=creds.chain,
            trust=trust,
            secrets_log=secrets_log,
        )

    @classmethod
    def self_signed(
        cls,
        network_name: str,
        *,
        idle_timeout: float,
        handshake_timeout: float,
        secrets_log: TextIO | None = None,
    ) -> QuicSettings:
        cert, key = self_signed_certificate()
        return cls(alpn_for(network_name), cert, key, idle_timeout, handshake_timeout, secrets_log)

    @property
    def requests_client_certificate(self) -> bool:
        """Whether a listener asks dialers for their certificate (private-ca)."""
        return self.mode == PRIVATE_CA

    def configuration(
        self, *, is_client: bool, server_name: str | None = None
    ) -> QuicConfiguration:
        config = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[self.alpn],
            connection_id_length=CID_LENGTH,
            idle_timeout=self.idle_timeout,
            max_data=16 * 1024 * 1024,
            max_stream_data=8 * 1024 * 1024,
            secrets_log_file=self.secrets_log,
        )
        if self.mode == SELF_SIGNED:
            if is_client:
                # identity comes from the Noise XX handshake inside the stream, not from TLS
                config.verify_mode = ssl.CERT_NONE
            else:
                config.certificate = self.certificate
                config.private_key = self.private_key
            return config
        # CA modes: both sides carry their certificate (a dialer sends it when asked); a
        # dialer verifies the listener's chain (and, given a DNS name, that it names it)
        config.certificate = self.certificate
        config.certificate_chain = list(self.chain)
        config.private_key = self.private_key
        if is_client:
            config.verify_mode = ssl.CERT_REQUIRED
            config.server_name = server_name
            trust = self.trust or TrustStore()
            config.load_verify_locations(trust.cafile, trust.capath, trust.cadata)
        return config

    def check_peer(
        self,
        quic: QuicConnection,
        *,
        pin: PeerId | None = None,
        server_name: str | None = None,
    ) -> PeerId | None:
        """After the TLS handshake: the peer id the remote's certificate names (the Noise
        handshake must then prove that very id), or ``None`` when the mode binds none.
        Raises :class:`CertificateRefused` (its ``alert`` is the TLS alert to close with).

        A dialer's view of the listener's chain (and host name) was already verified by
        aioquic; a private-ca listener verifies the dialer's chain here (aioquic checks only
        the dialer's proof of possession of the certificate key)."""
        is_client = quic.configuration.is_client
        if self.mode == SELF_SIGNED or (not is_client and not self.requests_client_certificate):
            return None  # nothing to bind: the Noise handshake alone proves the peer id
        whose = "the listener's certificate" if is_client else "the dialer's certificate"
        cert, chain = peer_certificates(quic)
        if cert is None:
            raise _refusal(f"{whose} is missing", AlertDescription.certificate_required)
        if not is_client:
            try:
                verify_chain(cert, chain, self.trust or TrustStore())
            except Alert as exc:
                raise _refusal(f"{whose} does not verify: {exc}", exc.description) from exc
        try:
            peer = certificate_peer_id(cert)
        except errors.PeerAuthenticationError as exc:
            raise _refusal(f"{whose}: {exc}") from exc
        if self.mode == PRIVATE_CA and peer is None:
            raise _refusal(f"{whose} names no crust peer id")
        if peer is None and server_name is None:
            # public-ca, dialed by IP address: the certificate must name something we know
            raise _refusal(f"{whose} names no crust peer id and the contact no host name")
        if pin is not None and peer is not None and peer != pin:
            raise _refusal(f"{whose} is for peer {peer}, the contact expects {pin}")
        return peer


def verify_chain(
    certificate: x509.Certificate,
    chain: tuple[x509.Certificate, ...] | list[x509.Certificate],
    trust: TrustStore,
) -> None:
    """aioquic's own chain check (dates, then the chain via OpenSSL), the same one its
    client applies to a server: raises an aioquic TLS ``Alert``."""
    try:
        verify_certificate(
            certificate=certificate,
            chain=list(chain),
            cadata=trust.cadata,
            cafile=trust.cafile,
            capath=trust.capath,
        )
    except Alert:
        raise
    except Exception as exc:  # an unreadable certificate or trust store: refuse
        raise AlertBadCertificate(f"cannot verify: {exc}") from exc


def peer_certificates(
    quic: QuicConnection,
) -> tuple[x509.Certificate | None, list[x509.Certificate]]:
    """The certificate (and chain) the remote presented in the TLS handshake. aioquic has
    no public API for it: read its private attributes, and fail closed if they are gone."""
    tls: Any = getattr(quic, "tls", None)
    cert = getattr(tls, "_peer_certificate", None)
    chain = getattr(tls, "_peer_certificate_chain", None)
    if not isinstance(cert, x509.Certificate) or not isinstance(chain, list):
        return None, []
    return cert, [c for c in chain if isinstance(c, x509.Certificate)]


class DialerQuicConnection(QuicConnection):
    """A dialer's QUIC connection offering one key share (X25519) in its ClientHello."""

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if hasattr(self.tls, "_supported_groups"):
            self.tls._supported_groups = [Group.X25519]


class ClientCertificateQuicConnection(QuicConnection):
    """A listener's QUIC connection that asks the dialer for its certificate (TLS
    CertificateRequest). aioquic has a switch for it only on its private TLS context."""

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        # should aioquic rename the switch, no certificate arrives and check_peer refuses
        self.tls._request_client_certificate = True


class CertificateRefused(errors.PeerAuthenticationError):
    """The remote's certificate failed a check; ``alert`` is the TLS alert to close with."""

    def __init__(self, message: str, alert: int = AlertDescription.bad_certificate) -> None:
        super().__init__(message)
        self.alert = int(alert)


def _refusal(message: str, alert: int = AlertDescription.bad_certificate) -> CertificateRefused:
    return CertificateRefused(message, alert)


def self_signed_certificate() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A throwaway ECDSA P-256 certificate (TLS only encrypts; Noise authenticates)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crust")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    return cert, key


def termination_error(event: qe.ConnectionTerminated) -> errors.CrustError:
    if event.error_code == ALPN_MISMATCH:
        return errors.NetworkMismatch("the peer belongs to another network (QUIC ALPN mismatch)")
    if event.error_code - QuicErrorCode.CRYPTO_ERROR in CERTIFICATE_ALERTS:
        return errors.PeerAuthenticationError(
            f"TLS certificate refused: {event.reason_phrase or 'no reason given'}"
        )
    if event.error_code == QuicErrorCode.CONNECTION_REFUSED:
        return errors.Refused(f"refused by the peer: {event.reason_phrase or 'no reason'}")
    what = event.reason_phrase or f"error 0x{event.error_code:x}"
    return errors.ConnectError(f"QUIC connection closed: {what}")


class QuicLink:
    """One QUIC connection on a mux, presenting its first bidirectional stream as a stream
    transport to a :class:`Connection`.

    ``ready`` completes when the QUIC handshake is done (ALPN agreed); for a server link
    ``on_ready(link)`` is called at that moment to attach a Connection (or abort).
    ``on_failed(link, error)`` reports a handshake that failed (server side statistics).
    """

    def __init__(
        self,
        mux: UdpMux,
        quic: QuicConnection,
        remote: Address,
        settings: QuicSettings,
        *,
        on_ready: Callable[[QuicLink], None] | None = None,
        on_failed: Callable[[QuicLink, BaseException], None] | None = None,
    ) -> None:
        self.mux = mux
        self.quic = quic
        self.remote_address = remote
        self.settings = settings
        self.is_client = quic.configuration.is_client
        self.remote = format_address("quic", remote)
        self.local = format_address("quic", mux.local_address)
        self.conn: Connection | None = None
        self.on_ready = on_ready
        self.on_failed = on_failed
        self.refusal: str | None = None
        """Set on a server link to refuse the client once its first Initial is processed."""
        self.pin: PeerId | None = None
        """A dialer's expected peer id (the contact's ``#PEER_ID``)."""
        self.server_name: str | None = None
        """A dialer's contact host name (public-ca verifies the certificate names it)."""
        self.certified_peer: PeerId | None = None
        """The peer id the remote's certificate names (CA modes), once the QUIC handshake
        is done: the crust session must prove this very id."""
        self.close_error: errors.CrustError | None = None
        """Why the peer closed the QUIC connection, when it said (e.g. refused our
        certificate): reported to a crust session that was still handshaking."""
        self._loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self.ready.add_done_callback(_retrieve)
        self._stream_id: int | None = None
        self._handshake_done = False
        self._closing = False
        self._fin_sent = False
        self._fin_received = False
        self._lost_reported = False
        self._terminated = False
        self._read_paused = False
        self._write_paused = False
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._pending_fin = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._transmit_scheduled = False
        self._untransmitted = 0
        """Stream bytes written since the last transmit."""
        self._coalesce_next = False
        self._linger: asyncio.TimerHandle | None = None
        self._deadline: asyncio.TimerHandle | None = self._loop.call_later(
            settings.handshake_timeout, self._handshake_expired
        )
        mux.add_client(self)
        mux.register(quic.host_cid, self)

    def __repr__(self) -> str:
        side = "client" if self.is_client else "server"
        return f"<QuicLink {side} {self.remote}>"

    # ------------------------------------------------------------ construction

    @classmethod
    def dial(
        cls,
        mux: UdpMux,
        remote: Address,
        settings: QuicSettings,
        *,
        pin: PeerId | None = None,
        server_name: str | None = None,
        datagram_size: int | None = None,
    ) -> QuicLink:
        """Start a client connection from ``mux``'s socket; await ``link.ready``.
        ``server_name`` is only used in public-ca mode (the certificate must name it);
        ``datagram_size``: the configured maximum, None for :func:`datagram_size_for`'s."""
        if settings.mode != PUBLIC_CA:
            server_name = None
        config = settings.configuration(is_client=True, server_name=server_name)
        config.max_datagram_size = datagram_size_for(remote[0], datagram_size)
        quic = DialerQuicConnection(configuration=config)
        link = cls(mux, quic, remote, settings)
        link.pin = pin
        link.server_name = server_name
        quic.connect(remote, now=link._loop.time())
        track_first_random(quic)  # key log only: TLS secrets also under the first random
        link._stream_id = quic.get_next_available_stream_id()
        link._transmit()
        return link

    @classmethod
    def accept(
        cls,
        mux: UdpMux,
        remote: Address,
        original_dcid: bytes,
        retry_scid: bytes | None,
        settings: QuicSettings,
        on_ready: Callable[[QuicLink], None],
        on_failed: Callable[[QuicLink, BaseException], None],
        *,
        datagram_size: int | None = None,
    ) -> QuicLink:
        kind = (
            ClientCertificateQuicConnection
            if settings.requests_client_certificate
            else QuicConnection
        )
        config = settings.configuration(is_client=False)
        config.max_datagram_size = datagram_size_for(remote[0], datagram_size)
        quic = kind(
            configuration=config,
            original_destination_connection_id=original_dcid,
            retry_source_connection_id=retry_scid,
        )
        return cls(mux, quic, remote, settings, on_ready=on_ready, on_failed=on_failed)

    def attach(self, conn: Connection) -> None:
        self.conn = conn
        conn.attach(self)
        if self._pending and not self._read_paused:
            self._loop.call_soon(self._deliver_pending)

    # ------------------------------------------------------------ MuxClient

    @property
    def handshake_done(self) -> bool:
        return self._handshake_done

    @property
    def accepting_datagrams(self) -> bool:
        return not (self._read_paused and self._pending_bytes >= PAUSED_BUFFER_LIMIT)

    def datagram_received(self, data: bytes, addr: Address, now: float) -> None:
        self.quic.receive_datagram(data, addr, now)

    def after_batch(self) -> None:
        if self.refusal is not None and not self._closing:
            self._closing = True
            self.on_ready = self.on_failed = None
            self.quic.close(error_code=QuicErrorCode.CONNECTION_REFUSED, reason_phrase=self.refusal)
        self._process()
        if self._coalesce_next:
            # the dialler's handshake just completed: its Finished waits one loop iteration
            # so that the Session's first handshake message (written when the dialling
            # task resumes) leaves in the same datagram
            self._coalesce_next = False
            self._transmit_soon()
        else:
            self._transmit()

    def detach(self) -> None:
        """The mux is gone: stop every timer."""
        self._terminated = True
        for handle in (self._timer, self._linger, self._deadline):
            if handle is not None:
                handle.cancel()
        self._timer = self._linger = self._deadline = None
        self._report_lost()

    # ------------------------------------------------------------ StreamTransport

    def writelines(self, data: list[bytes | bytearray], /) -> None:
        if self._closing or self._stream_id is None:
            return
        # one call per record: aioquic copies each into its stream buffer at once (so a
        # bytearray is as good as bytes), joining them first would copy everything twice
        send, stream_id = self.quic.send_stream_data, self._stream_id
        written = 0
        for record in data:
            send(stream_id, cast(bytes, record))
            written += len(record)
        if not self._write_paused and self._unacked() > WRITE_HIGH_WATER:
            self._write_paused = True
            if self.conn is not None:
                self.conn.pause_writing()
        self._untransmitted += written
        if self._untransmitted >= TRANSMIT_EARLY:
            # the Session may hand over up to the whole window in one flush: let the first
            # packets leave now rather than after all of it is written
            self._transmit()
        else:
            self._transmit_soon()

    def close(self) -> None:
        """FIN our stream (after what is written); the QUIC connection closes once the peer
        has sent its FIN too, or after :data:`CLOSE_LINGER`."""
        if self._closing:
            return
        self._closing = True
        refusal = self._identity_refusal()
        if refusal is not None and not self._terminated:
            self.quic.close(
                error_code=QuicErrorCode.CRYPTO_ERROR + AlertDescription.bad_certificate,
                reason_phrase=refusal,
            )
            self._transmit_soon()
            self._loop.call_soon(self._report_lost)
            return
        if self._stream_id is not None and self._handshake_done and not self._terminated:
            self.quic.send_stream_data(self._stream_id, b"", end_stream=True)
            self._fin_sent = True
            if self._fin_received:
                self.quic.close()
            else:
                self._linger = self._loop.call_later(CLOSE_LINGER, self._linger_expired)
        else:
            self.quic.close()
        self._transmit_soon()
        self._loop.call_soon(self._report_lost)

    def abort(self) -> None:
        self._closing = True
        if not self._terminated:
            self.quic.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase="aborted")
            self._transmit()
        if not self.ready.done():
            self.ready.set_exception(errors.ConnectionClosed("QUIC connection aborted"))
        self._loop.call_soon(self._report_lost)

    def pause_reading(self) -> None:
        self._read_paused = True

    def resume_reading(self) -> None:
        if self._read_paused:
            self._read_paused = False
            if self._pending or self._pending_fin:
                self._loop.call_soon(self._deliver_pending)

    def is_closing(self) -> bool:
        return self._closing or self._terminated

    # ------------------------------------------------------------ internals

    def _unacked(self) -> int:
        """Stream bytes handed to aioquic and not yet acknowledged by the peer."""
        streams: Any = getattr(self.quic, "_streams", None)
        stream = streams.get(self._stream_id) if streams is not None else None
        sender = getattr(stream, "sender", None)
        start = getattr(sender, "_buffer_start", None)
        stop = getattr(sender, "_buffer_stop", None)
        if not isinstance(start, int) or not isinstance(stop, int):
            return 0
        return stop - start

    def _process(self) -> None:
        quic = self.quic
        while (event := quic.next_event()) is not None:
            if type(event) is qe.StreamDataReceived:
                self._stream_data(event)
            elif isinstance(event, qe.ConnectionIdIssued):
                self.mux.register(event.connection_id, self)
            elif isinstance(event, qe.ConnectionIdRetired):
                self.mux.unregister(event.connection_id, self)
            elif isinstance(event, qe.HandshakeCompleted):
                self._handshake_completed(event)
            elif isinstance(event, qe.ConnectionTerminated):
                self._closed_by(event)
                self._end()
                return
        # the stream data of the whole batch goes to the session in one piece
        if (self._pending or self._pending_fin) and not self._read_paused:
            self._deliver_pending()
        # aioquic reports ConnectionTerminated only after draining (3 PTO): react at once
        early: Any = getattr(quic, "_close_event", None)
        if isinstance(early, qe.ConnectionTerminated):
            self._closed_by(early)
        if self._write_paused and self._unacked() <= WRITE_LOW_WATER:
            self._write_paused = False
            if self.conn is not None and not self._closing:
                self.conn.resume_writing()

    def _handshake_completed(self, event: qe.HandshakeCompleted) -> None:
        if event.alpn_protocol != self.settings.alpn:
            self.quic.close(
                error_code=ALPN_MISMATCH, reason_phrase="no common application protocol"
            )
            return
        try:
            self.certified_peer = self.settings.check_peer(
                self.quic, pin=self.pin, server_name=self.server_name
            )
        except CertificateRefused as exc:
            self._refuse_certificate(exc)
            return
        self._handshake_done = True
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if not self.ready.done():
            self.ready.set_result(None)
            self._coalesce_next = self.is_client
        if self.on_ready is not None:
            self.on_ready(self)

    def _identity_refusal(self) -> str | None:
        """Why to close with a certificate alert rather than a FIN: the crust handshake
        failed to prove the peer id the remote's certificate names (so the dialer learns it
        was refused, as it would at the TLS layer)."""
        conn = self.conn
        if self.certified_peer is None or conn is None or conn.session.peer_id is not None:
            return None
        final = conn.session.closed_event
        if final is None or not isinstance(final.error, errors.PeerAuthenticationError):
            return None
        return f"the certificate's peer id was not proven: {final.error}"[:200]

    def _refuse_certificate(self, exc: CertificateRefused) -> None:
        """The remote's certificate failed our check: close with the TLS alert, fail the
        dial (or count the listener's failed handshake); no crust session starts."""
        log.debug("%r: %s", self, exc)
        self._closing = True
        self.quic.close(
            error_code=QuicErrorCode.CRYPTO_ERROR + exc.alert, reason_phrase=str(exc)[:200]
        )
        self.on_ready = None
        if not self.ready.done():
            self.ready.set_exception(exc)
        if self.on_failed is not None:
            on_failed, self.on_failed = self.on_failed, None
            on_failed(self, exc)

    def _stream_data(self, event: qe.StreamDataReceived) -> None:
        if self._stream_id is None and not self.is_client and event.stream_id == 0:
            self._stream_id = 0  # the client's first bidirectional stream
        if event.stream_id != self._stream_id:
            return  # crust uses one stream; anything else is ignored
        if event.data:
            self._pending.append(event.data)
            self._pending_bytes += len(event.data)
        if event.end_stream:
            self._pending_fin = True

    def _deliver_pending(self) -> None:
        conn = self.conn
        if conn is None:
            return
        while self._pending and not self._read_paused:
            if conn.closed:  # the session is over: what is left has no reader
                self._pending.clear()
                self._pending_bytes = 0
                break
            # one call for everything pending: the session then parses whole records in
            # place instead of completing one record per QUIC packet
            pending = self._pending
            chunk = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            self._pending_bytes = 0
            conn.data_received(chunk)
        if self._pending_fin and not self._pending and (not self._read_paused or conn.closed):
            self._pending_fin = False
            self._fin_received = True
            if self._fin_sent:
                self.quic.close()
                self._transmit_soon()
            elif not self._closing:
                # the peer ended its stream without a clean close: like EOF on TCP
                self.close()

    def _closed_by(self, event: qe.ConnectionTerminated) -> None:
        """The QUIC connection is closing (either side): fail or end what uses it."""
        if self._terminated and self._lost_reported:
            return
        self._closing = True
        err = termination_error(event)
        if self._handshake_done:
            if isinstance(err, errors.HandshakeError):
                self.close_error = err  # e.g. the listener refused our certificate
        else:
            if not self.ready.done():
                self.ready.set_exception(err)
            if self.on_failed is not None:
                on_failed, self.on_failed = self.on_failed, None
                on_failed(self, err)
        self._report_lost()

    def _report_lost(self) -> None:
        if self._lost_reported:
            return
        self._lost_reported = True
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if not self.ready.done():
            self.ready.set_exception(errors.ConnectionClosed("QUIC connection closed"))
        conn = self.conn
        if conn is not None:
            # data already received is delivered first (the CLOSE frame may be in it)
            if self._pending and not conn.closed:
                self._read_paused = False
                self._deliver_pending()
            if self.close_error is not None and conn.session.state in (
                State.HANDSHAKE,
                State.ESTABLISHED,
            ):
                # e.g. the listener refused our certificate: say so, not "closed"
                conn.session.connection_lost(self.close_error)
            conn.connection_lost(None)

    def _end(self) -> None:
        """aioquic has terminated the connection: forget it."""
        self._terminated = True
        self._closing = True
        for handle in (self._timer, self._linger, self._deadline):
            if handle is not None:
                handle.cancel()
        self._timer = self._linger = self._deadline = None
        self.mux.remove_client(self)
        self._report_lost()

    def _transmit_soon(self) -> None:
        if not self._transmit_scheduled:
            self._transmit_scheduled = True
            self._loop.call_soon(self._transmit)

    def _transmit(self) -> None:
        self._transmit_scheduled = False
        self._untransmitted = 0
        if self._terminated:
            return
        quic = self.quic
        clock = self._loop.time
        datagrams = quic.datagrams_to_send(now=clock())
        # aioquic paces packet by packet; when the path is fast (loopback, LAN) its next
        # send time is a few microseconds away and each call yields one or two packets.
        # Going through the event loop for every one of them (a call_at, an epoll) costs
        # more than the packet: keep building while the pacing time has already come.
        rounds = 1
        while rounds < PACING_ROUNDS:
            pacing_at: Any = getattr(quic, "_pacing_at", None)
            if not isinstance(pacing_at, float) or pacing_at > clock():
                break
            more = quic.datagrams_to_send(now=clock())
            if not more:
                break
            datagrams += more
            rounds += 1
        if datagrams:
            self.mux.send_datagrams(datagrams)
        self._arm_timer()

    def _arm_timer(self) -> None:
        when = self.quic.get_timer()
        if when == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._terminated:
            return
        self.quic.handle_timer(now=self._loop.time())
        self._process()
        self._transmit()

    def _linger_expired(self) -> None:
        self._linger = None
        if not self._terminated:
            self.quic.close()
            self._transmit()

    def _handshake_expired(self) -> None:
        self._deadline = None
        if not self._handshake_done and not self._terminated:
            if not self.ready.done():
                self.ready.set_exception(
                    errors.HandshakeTimeout("QUIC handshake did not complete in time")
                )
            self.quic.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase="handshake timeout")
            self._transmit()


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()
