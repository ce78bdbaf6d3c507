"""A private certificate authority for QUIC's ``"private-ca"`` mode, and the certificate
checks the QUIC transport applies in the CA modes.

``init_ca(directory)`` makes a CA (ECDSA P-256 key + self-signed CA certificate);
``issue_certificate(directory, identity)`` gives a crust peer a node certificate whose subject
CN and URI subjectAltName ``crust:<peer id>`` name the peer id, so the TLS layer is bound to
the same identity the Noise handshake proves. Files are written atomically, private keys with
mode 0600. Every problem with a file or argument raises :class:`~crust.errors.ConfigError`
naming the path or field; a certificate received from the network that cannot be read raises
:class:`~crust.errors.PeerAuthenticationError` (a ``ProtocolError``).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from crust.errors import ConfigError, PeerAuthenticationError
from crust.identity import Identity, PeerId

CA_CERT_NAME = "ca.crt"
CA_KEY_NAME = "ca.key"
NODE_CERT_NAME = "node.crt"
NODE_KEY_NAME = "node.key"
NODES_DIR = "nodes"
PEER_URI_SCHEME = "crust"
"""A node certificate names its peer as the URI subjectAltName ``crust:<peer id>``."""
DEFAULT_CA_DAYS = 3650
DEFAULT_NODE_DAYS = 365
MAX_DAYS = 36500
MAX_PEM_FILE = 1024 * 1024
"""Certificate and key files larger than this are refused unread."""
MAX_CHAIN = 16
CLOCK_SKEW = datetime.timedelta(hours=1)
"""Certificates start this much before their issuing time (peers' clocks differ)."""

NodeKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
"""Private key types a node certificate (and a CA) may use."""


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA made by :func:`init_ca` (or loaded by :func:`load_ca`)."""

    directory: Path
    certificate_file: Path
    private_key_file: Path
    certificate: x509.Certificate


@dataclass(frozen=True)
class IssuedCertificate:
    """What :func:`issue_certificate` wrote."""

    peer_id: PeerId
    certificate_file: Path
    """The node's certificate chain (PEM): the node certificate first."""
    private_key_file: Path
    """The node certificate's private key (PEM PKCS#8, mode 0600)."""
    ca_file: Path
    """The CA certificate every peer of the network trusts (``quic_ca_file``)."""
    not_valid_after: datetime.datetime

    def config_lines(self) -> list[str]:
        """TOML lines for a crust config file using these files in ``private-ca`` mode."""
        return [
            'quic_certificates = "private-ca"',
            f"quic_ca_file = {_toml_string(self.ca_file)}",
            f"quic_certificate_file = {_toml_string(self.certificate_file)}",
            f"quic_private_key_file = {_toml_string(self.private_key_file)}",
        ]


@dataclass(frozen=True)
class NodeCredentials:
    """A node's certificate chain and key, checked to belong together."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    """Intermediate certificates after the node certificate (often empty)."""
    private_key: NodeKey
    peer_id: PeerId | None
    """The peer id the certificate names (``None``: it names none, e.g. a public-CA one)."""


@dataclass(frozen=True)
class TrustStore:
    """Certificates a peer's chain is verified against: a PEM file, a hashed directory
    (OpenSSL ``c_rehash`` layout) and/or PEM bytes. All ``None``: aioquic's default bundle."""

    cafile: str | None = None
    capath: str | None = None
    cadata: bytes | None = None

    @classmethod
    def from_certificates(cls, certificates: Iterable[x509.Certificate]) -> TrustStore:
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)
        if not pem:
            raise ConfigError("a trust store needs at least one certificate", "trust_store")
        return cls(cadata=pem)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, field: str = "quic_ca_file") -> TrustStore:
        """A PEM file of CA certificates, checked now (``ConfigError`` naming ``field``)."""
        certs = _read_certificates(Path(path), field)
        if not any(_is_ca(c) for c in certs):
            raise ConfigError(f"{path} holds no CA certificate (basicConstraints CA:true)", field)
        return cls(cafile=str(path))


def system_trust_store() -> TrustStore:
    """The operating system's root certificates as OpenSSL finds them (honouring the
    ``SSL_CERT_FILE``/``SSL_CERT_DIR`` environment variables); when the system has none,
    aioquic's default bundle."""
    paths = ssl.get_default_verify_paths()
    return TrustStore(cafile=paths.cafile or None, capath=paths.capath or None)


# ---------------------------------------------------------------- the CA


def init_ca(
    directory: str | os.PathLike[str],
    *,
    name: str | None = None,
    days: int = DEFAULT_CA_DAYS,
    now: datetime.datetime | None = None,
) -> CertificateAuthority:
    """Create a private CA in ``directory`` (created with mode 0700 when missing):
    ``ca.key`` (ECDSA P-256, mode 0600) and ``ca.crt`` (self-signed, basicConstraints
    CA:true with path length 0, keyUsage keyCertSign + cRLSign). Refuses to overwrite an
    existing CA."""
    root = Path(directory)
    _check_days(days)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} exists and is not a directory", "directory")
    cert_file, key_file = root / CA_CERT_NAME, root / CA_KEY_NAME
    for existing in (cert_file, key_file):
        if existing.exists():
            raise ConfigError(f"{existing} exists: {root} already holds a CA", "directory")
    if name is None:
        name = f"crust private CA {os.urandom(4).hex()}"
    if not name or len(name) > 64 or not name.isprintable():
        raise ConfigError("a CA name is 1 to 64 printable characters", "name")
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {root}: {exc.strerror or exc}", "directory") from exc
    start = _now(now)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    # key first: a crash in between leaves no certificate without its key
    _write_private(key_file, _key_pem(key), "directory")
    _write_public(cert_file, cert.public_bytes(serialization.Encoding.PEM), "directory")
    return CertificateAuthority(root, cert_file, key_file, cert)


def load_ca(directory: str | os.PathLike[str]) -> tuple[CertificateAuthority, NodeKey]:
    """The CA in ``directory`` and its key; ``ConfigError`` (field ``directory``) when the
    directory or its files are missing, malformed or do not belong together."""
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a CA directory (run `crust ca init {root}`)", "directory")
    cert_file, key_file = root / CA_CERT_NAME, root / CA_KEY_NAME
    certs = _read_certificates(cert_file, "directory")
    cert = certs[0]
    key = _read_private_key(key_file, "directory")
    if not _is_ca(cert):
        raise ConfigError(f"{cert_file} is not a CA certificate", "directory")
    if not _same_public_key(cert, key):
        raise ConfigError(f"{key_file} is not the key of {cert_file}", "directory")
    return CertificateAuthority(root, cert_file, key_file, cert), key


def issue_certificate(
    directory: str | os.PathLike[str],
    identity: Identity | PeerId,
    *,
    out: str | os.PathLike[str] | None = None,
    days: int = DEFAULT_NODE_DAYS,
    hosts: Sequence[str] = (),
    now: datetime.datetime | None = None,
) -> IssuedCertificate:
    """Issue a node certificate for ``identity`` (an :class:`Identity` or just its
    :class:`PeerId`: the CA never needs the peer's private identity key) with the CA in
    ``directory``.

    The certificate has CN = peer id and the URI subjectAltName ``crust:<peer id>``, plus a
    DNS/IP subjectAltName per entry of ``hosts``; it gets a fresh ECDSA P-256 key. It is
    valid for ``days`` (never past the CA's own expiry). Writes ``node.crt`` and ``node.key``
    (mode 0600) into ``out`` (default ``DIRECTORY/nodes/<peer id>/``), replacing earlier
    ones, and returns their paths.
    """
    peer = identity.peer_id if isinstance(identity, Identity) else identity
    if not isinstance(peer, PeerId):
        raise ConfigError("issue a certificate for an Identity or a PeerId", "identity")
    _check_days(days)
    alt_names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(f"{PEER_URI_SCHEME}:{peer}")
    ]
    alt_names += [_host_name(h) for h in hosts]
    ca, ca_key = load_ca(directory)
    start = _now(now)
    ca_end = ca.certificate.not_valid_after_utc
    if ca_end <= start:
        raise ConfigError(f"the CA certificate {ca.certificate_file} has expired", "directory")
    end = min(start + datetime.timedelta(days=days), ca_end)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(peer))]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(start - CLOCK_SKEW, ca.certificate.not_valid_before_utc))
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, _hash_for(ca_key))
    )
    target = Path(out) if out is not None else ca.directory / NODES_DIR / str(peer)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{target} exists and is not a directory", "out")
    try:
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {target}: {exc.strerror or exc}", "out") from exc
    cert_file, key_file = target / NODE_CERT_NAME, target / NODE_KEY_NAME
    _write_private(key_file, _key_pem(key), "out")
    _write_public(cert_file, cert.public_bytes(serialization.Encoding.PEM), "out")
    return IssuedCertificate(
        peer, cert_file, key_file, ca.certificate_file, cert.not_valid_after_utc
    )


# ---------------------------------------------------------------- node credentials


def load_node_credentials(
    certificate_file: str | os.PathLike[str],
    private_key_file: str | os.PathLike[str],
    *,
    now: datetime.datetime | None = None,
) -> NodeCredentials:
    """Read a node's certificate chain and key (the config's ``quic_certificate_file`` and
    ``quic_private_key_file``) and check that the key belongs to the certificate and that the
    certificate is valid now. ``ConfigError`` names the offending field."""
    cert_field, key_field = "quic_certificate_file", "quic_private_key_file"
    certs = _read_certificates(Path(certificate_file), cert_field)
    if len(certs) > MAX_CHAIN:
        raise ConfigError(f"{certificate_file}: more than {MAX_CHAIN} certificates", cert_field)
    leaf = certs[0]
    key = _read_private_key(Path(private_key_file), key_field)
    if not _same_public_key(leaf, key):
        raise ConfigError(
            f"{private_key_file} is not the key of the certificate in {certificate_file}",
            key_field,
        )
    moment = _now(now)
    if moment > leaf.not_valid_after_utc:
        raise ConfigError(
            f"{certificate_file}: the certificate expired on "
            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
            cert_field,
        )
    if moment < leaf.not_valid_before_utc:
        raise ConfigError(
            f"{certificate_file}: the certificate is valid only from "
            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
            cert_field,
        )
    try:
        peer = certificate_peer_id(leaf)
    except PeerAuthenticationError as exc:
        raise ConfigError(f"{certificate_file}: {exc}", cert_field) from exc
    return NodeCredentials(leaf, tuple(certs[1:]), key, peer)


def certificate_peer_id(certificate: x509.Certificate) -> PeerId | None:
    """The peer id a certificate names in a ``crust:<peer id>`` URI subjectAltName, or
    ``None`` when it names none. Raises only :class:`PeerAuthenticationError` (for a
    certificate from the network: malformed extensions, a malformed ``crust:`` URI, or
    several different peer ids)."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    except (ValueError, TypeError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as e:
        raise PeerAuthenticationError(f"unreadable certificate extensions: {e}") from e
    found: set[PeerId] = set()
    try:
        uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    except (ValueError, TypeError, x509.UnsupportedGeneralNameType) as exc:
        raise PeerAuthenticationError(f"unreadable subjectAltName: {exc}") from exc
    for uri in uris:
        scheme, colon, rest = uri.partition(":")
        if not colon or scheme.lower() != PEER_URI_SCHEME:
            continue
        try:
            found.add(PeerId.parse(rest))
        except ConfigError:
            raise PeerAuthenticationError(
                f"certificate names a malformed crust peer id {uri[:80]!r}"
            ) from None
    if len(found) > 1:
        raise PeerAuthenticationError("certificate names several crust peer ids")
    return found.pop() if found else None


# ---------------------------------------------------------------- helpers


def _now(now: datetime.datetime | None) -> datetime.datetime:
    if now is None:
        return datetime.datetime.now(datetime.UTC)
    if now.tzinfo is None:
        raise ConfigError("give a timezone-aware time", "now")
    return now


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise ConfigError(f"must be a whole number of days from 1 to {MAX_DAYS}", "days")


def _host_name(host: str) -> x509.GeneralName:
    """A DNS name or IP address subjectAltName."""
    if not isinstance(host, str) or not host:
        raise ConfigError(f"{host!r} is not a host name or IP address", "hosts")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    name = host.rstrip(".").lower()
    labels = name.split(".")
    if len(name) > 253 or not all(
        0 < len(label) <= 63
        and label.isascii()
        and label.replace("-", "").isalnum()
        and not label.startswith("-")
        and not label.endswith("-")
        for label in labels
    ):
        raise ConfigError(f"{host!r} is not a host name or IP address", "hosts")
    return x509.DNSName(name)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError, x509.DuplicateExtension):
        return False
    return bc.ca


def _public_der(key: object) -> bytes | None:
    if isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey):
        return key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return None


def _same_public_key(cert: x509.Certificate, key: NodeKey) -> bool:
    try:
        cert_key = cert.public_key()
    except (ValueError, TypeError):
        return False
    mine = _public_der(key.public_key())
    return mine is not None and mine == _public_der(cert_key)


def _hash_for(key: NodeKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _key_pem(key: NodeKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _read_bounded(path: Path, field: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_PEM_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}", field) from exc
    if len(data) > MAX_PEM_FILE:
        raise ConfigError(f"{path} is larger than {MAX_PEM_FILE} bytes", field)
    return data


def _read_certificates(path: Path, field: str) -> list[x509.Certificate]:
    data = _read_bounded(path, field)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM certificate file", field) from exc
    if not certs:
        raise ConfigError(f"{path} holds no certificate", field)
    return certs


def _read_private_key(path: Path, field: str) -> NodeKey:
    data = _read_bounded(path, field)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path} is not an unencrypted PEM private key", field) from exc
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    ):
        raise ConfigError(f"{path}: use an ECDSA, Ed25519 or RSA key", field)
    return key


def _write_private(path: Path, data: bytes, field: str) -> None:
    _write_atomic(path, data, 0o600, field)


def _write_public(path: Path, data: bytes, field: str) -> None:
    _write_atomic(path, data, 0o644, field)


def _write_atomic(path: Path, data: bytes, mode: int, field: str) -> None:
    """Write ``data`` to ``path`` through a temporary file (mode set before any byte is
    written) and a rename, so readers see the old file or the complete new one."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    except OSError as exc:
        raise ConfigError(f"cannot write in {path.parent}: {exc.strerror or exc}", field) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}", field) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _toml_string(path: Path) -> str:
    """A TOML basic string for ``path`` (absolute, so the config works from anywhere)."""
    text = str(path.resolve())
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
