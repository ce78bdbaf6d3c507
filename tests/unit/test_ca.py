"""crust.ca (private CA, node certificates, peer-id binding) and the `crust ca` CLI."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import stat
import tomllib
import warnings
from pathlib import Path

import pytest
from aioquic.tls import Alert
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crust import Config, Identity, PeerId
from crust.aio.quic import QuicSettings, verify_chain
from crust.ca import (
    CA_CERT_NAME,
    CA_KEY_NAME,
    TrustStore,
    certificate_peer_id,
    init_ca,
    issue_certificate,
    load_ca,
    load_node_credentials,
)
from crust.cli.main import main
from crust.errors import ConfigError, PeerAuthenticationError

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- init_ca


def test_init_ca_makes_a_ca_certificate_and_a_private_key(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca", name="test CA")
    assert ca.certificate_file == tmp_path / "ca" / CA_CERT_NAME
    assert mode(ca.private_key_file) == 0o600
    assert mode(tmp_path / "ca") == 0o700
    cert = x509.load_pem_x509_certificate(ca.certificate_file.read_bytes())
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "test CA"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and not ku.value.digital_signature
    key = serialization.load_pem_private_key(ca.private_key_file.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    cert.verify_directly_issued_by(cert)  # self-signed by that key
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 3649 * DAY < lifetime < 3652 * DAY
    assert cert.not_valid_before_utc < NOW
    # no temporary files are left behind
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == [CA_CERT_NAME, CA_KEY_NAME]


def test_init_ca_never_overwrites(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    before = ca.private_key_file.read_bytes()
    with pytest.raises(ConfigError) as info:
        init_ca(tmp_path)
    assert info.value.field == "directory" and "already holds a CA" in str(info.value)
    assert ca.private_key_file.read_bytes() == before


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"days": 0}, "days"), ({"days": True}, "days"), ({"name": "\n"}, "name")],
)
def test_init_ca_bad_arguments(tmp_path: Path, kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        init_ca(tmp_path / "x", **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert not (tmp_path / "x").exists()


def test_init_ca_on_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="not a directory") as info:
        init_ca(tmp_path / "f")
    assert info.value.field == "directory"


# ---------------------------------------------------------------- issue_certificate


def test_issued_certificate_names_the_peer_and_chains_to_the_ca(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca")
    ident = Identity.generate()
    issued = issue_certificate(tmp_path / "ca", ident, hosts=["node.example", "192.0.2.7"])
    assert issued.peer_id == ident.peer_id
    assert issued.certificate_file.parent == tmp_path / "ca" / "nodes" / str(ident.peer_id)
    assert mode(issued.private_key_file) == 0o600
    assert issued.ca_file == ca.certificate_file
    creds = load_node_credentials(issued.certificate_file, issued.private_key_file)
    cert = creds.certificate
    assert creds.peer_id == ident.peer_id == certificate_peer_id(cert)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == str(ident.peer_id)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"crust:{ident.peer_id}"]
    assert san.get_values_for_type(x509.DNSName) == ["node.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.7")]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.issuer == ca.certificate.subject
    cert.verify_directly_issued_by(ca.certificate)
    verify_chain(cert, [], TrustStore.from_file(ca.certificate_file))
    # ... and does not verify against another CA
    other = init_ca(tmp_path / "other")
    with pytest.raises(Alert):
        verify_chain(cert, [], TrustStore.from_file(other.certificate_file))


def test_issue_for_a_bare_peer_id_into_out_and_reissue(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    pid = Identity.generate().peer_id
    first = issue_certificate(tmp_path / "ca", pid, out=tmp_path / "node", days=10)
    assert first.certificate_file == tmp_path / "node" / "node.crt"
    second = issue_certificate(tmp_path / "ca", pid, out=tmp_path / "node", days=20)
    assert second.certificate_file == first.certificate_file
    assert second.not_valid_after > first.not_valid_after
    creds = load_node_credentials(second.certificate_file, second.private_key_file)
    assert creds.certificate.not_valid_after_utc == second.not_valid_after


def test_node_certificate_never_outlives_its_ca(tmp_path: Path) -> None:
    ca = init_ca(tmp_path, days=30)
    issued = issue_certificate(tmp_path, Identity.generate(), days=365)
    assert issued.not_valid_after == ca.certificate.not_valid_after_utc


def test_issue_with_an_expired_ca_is_refused(tmp_path: Path) -> None:
    init_ca(tmp_path, days=10, now=NOW - 20 * DAY)
    with pytest.raises(ConfigError, match="expired") as info:
        issue_certificate(tmp_path, Identity.generate())
    assert info.value.field == "directory"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"days": 0}, "days"),
        ({"days": 10**6}, "days"),
        ({"hosts": ["bad host"]}, "hosts"),
        ({"hosts": ["-x.example"]}, "hosts"),
        ({"hosts": [""]}, "hosts"),
        ({"now": datetime.datetime(2030, 1, 1)}, "now"),
    ],
)
def test_issue_bad_arguments(tmp_path: Path, kwargs: dict[str, object], field: str) -> None:
    init_ca(tmp_path)
    with pytest.raises(ConfigError) as info:
        issue_certificate(tmp_path, Identity.generate(), **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert not (tmp_path / "nodes").exists()


def test_issue_without_a_ca(tmp_path: Path) -> None:
    for where in (tmp_path / "missing", tmp_path):
        with pytest.raises(ConfigError, match=r"not a CA directory|cannot read") as info:
            issue_certificate(where, Identity.generate())
        assert info.value.field == "directory"
        assert str(where) in str(info.value)


def test_issue_with_a_broken_ca(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "a")
    other = init_ca(tmp_path / "b")
    ca.private_key_file.write_bytes(other.private_key_file.read_bytes())
    with pytest.raises(ConfigError, match="is not the key of") as info:
        issue_certificate(tmp_path / "a", Identity.generate())
    assert info.value.field == "directory"
    ca.certificate_file.write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a PEM certificate file"):
        load_ca(tmp_path / "a")
    # a node certificate is no CA
    issued = issue_certificate(tmp_path / "b", Identity.generate())
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / CA_CERT_NAME).write_bytes(issued.certificate_file.read_bytes())
    (tmp_path / "c" / CA_KEY_NAME).write_bytes(issued.private_key_file.read_bytes())
    with pytest.raises(ConfigError, match="not a CA certificate"):
        load_ca(tmp_path / "c")


def test_config_lines_make_a_valid_config(tmp_path: Path) -> None:
    init_ca(tmp_path / 'we"ird dir')
    issued = issue_certificate(tmp_path / 'we"ird dir', Identity.generate())
    data = tomllib.loads("\n".join(issued.config_lines()))
    config = Config.for_testing(**data)
    assert config.quic_certificates == "private-ca"
    assert config.quic_certificate_file == issued.certificate_file.resolve()
    assert config.quic_ca_file == issued.ca_file.resolve()


# ---------------------------------------------------------------- node credentials


def test_node_credentials_checks(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    a = issue_certificate(tmp_path / "ca", Identity.generate(), out=tmp_path / "a")
    b = issue_certificate(tmp_path / "ca", Identity.generate(), out=tmp_path / "b")
    with pytest.raises(ConfigError, match="is not the key of") as info:
        load_node_credentials(a.certificate_file, b.private_key_file)
    assert info.value.field == "quic_private_key_file"
    with pytest.raises(ConfigError, match="expired") as info:
        load_node_credentials(a.certificate_file, a.private_key_file, now=NOW + 400 * DAY)
    assert info.value.field == "quic_certificate_file"
    with pytest.raises(ConfigError, match="valid only from") as info:
        load_node_credentials(a.certificate_file, a.private_key_file, now=NOW - DAY)
    assert info.value.field == "quic_certificate_file"
    with pytest.raises(ConfigError, match="cannot read") as info:
        load_node_credentials(tmp_path / "nope", a.private_key_file)
    assert info.value.field == "quic_certificate_file"
    big = tmp_path / "big.pem"
    big.write_bytes(b"x" * (2 * 1024 * 1024))
    with pytest.raises(ConfigError, match="larger than"):
        load_node_credentials(a.certificate_file, big)
    with pytest.raises(ConfigError, match="holds no CA certificate") as info:
        TrustStore.from_file(a.certificate_file)
    assert info.value.field == "quic_ca_file"


def private_ca_config(ca_file: Path, cert: Path, key: Path) -> Config:
    return Config.for_testing(
        quic_certificates="private-ca",
        quic_ca_file=ca_file,
        quic_certificate_file=cert,
        quic_private_key_file=key,
    )


def test_quic_settings_refuse_a_mismatched_setup(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca")
    other = init_ca(tmp_path / "other")
    x, y = Identity.generate(), Identity.generate()
    issued = issue_certificate(tmp_path / "ca", x)
    good = private_ca_config(ca.certificate_file, issued.certificate_file, issued.private_key_file)
    settings = QuicSettings.from_config(good, x)
    assert settings.mode == "private-ca" and settings.requests_client_certificate
    # the certificate of identity X used by a service with identity Y
    with pytest.raises(ConfigError, match="is for peer") as info:
        QuicSettings.from_config(good, y)
    assert info.value.field == "quic_certificate_file"
    # a certificate that the configured CA did not issue
    with pytest.raises(ConfigError, match="does not verify against quic_ca_file") as info:
        QuicSettings.from_config(good.replace(quic_ca_file=other.certificate_file), x)
    assert info.value.field == "quic_certificate_file"
    # quic_ca_file that is no CA
    with pytest.raises(ConfigError) as info:
        QuicSettings.from_config(good.replace(quic_ca_file=issued.certificate_file), x)
    assert info.value.field == "quic_ca_file"


def test_private_ca_needs_a_peer_id_in_the_certificate(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca")
    _, ca_key = load_ca(tmp_path / "ca")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "host.example")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("host.example")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "n.crt", tmp_path / "n.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    assert load_node_credentials(cert_file, key_file).peer_id is None
    config = private_ca_config(ca.certificate_file, cert_file, key_file)
    with pytest.raises(ConfigError, match="names no crust peer id") as info:
        QuicSettings.from_config(config, Identity.generate())
    assert info.value.field == "quic_certificate_file"
    # public-ca accepts it (such a certificate names a host, as public CAs issue them)
    public = config.replace(quic_certificates="public-ca", quic_ca_file=None)
    assert QuicSettings.from_config(public, Identity.generate()).certificate == cert


# ---------------------------------------------------------------- certificates from the network


def cert_with_uris(uris: list[str]) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    return builder.sign(key, hashes.SHA256())


def test_certificate_peer_id_rules() -> None:
    a, b = Identity.generate().peer_id, Identity.generate().peer_id
    assert certificate_peer_id(cert_with_uris([])) is None
    assert certificate_peer_id(cert_with_uris(["https://example.com/"])) is None
    assert certificate_peer_id(cert_with_uris([f"crust:{a}"])) == a
    assert certificate_peer_id(cert_with_uris([f"crust:{a}", f"crust:{a}"])) == a
    assert certificate_peer_id(cert_with_uris([f"CRUST:{a}"])) == a
    with pytest.raises(PeerAuthenticationError, match="several"):
        certificate_peer_id(cert_with_uris([f"crust:{a}", f"crust:{b}"]))
    with pytest.raises(PeerAuthenticationError, match="malformed"):
        certificate_peer_id(cert_with_uris([f"crust:{str(a).upper()}"]))
    with pytest.raises(PeerAuthenticationError, match="malformed"):
        certificate_peer_id(cert_with_uris(["crust:"]))


uri_text = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=70
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(uri_text, uri_text.map(lambda t: "crust:" + t)), max_size=4))
def test_certificate_peer_id_any_uris(uris: list[str]) -> None:
    try:
        cert = cert_with_uris(uris)
    except ValueError:
        return  # cryptography itself refuses to encode it: nobody can send it
    try:
        pid = certificate_peer_id(cert)
    except PeerAuthenticationError:
        return
    if pid is not None:
        assert f"crust:{pid}" in {u.lower()[:6] + u[6:] for u in uris}


_ISSUED_DER: list[bytes] = []


def issued_der() -> bytes:
    """A real node certificate (DER), made once."""
    if not _ISSUED_DER:
        key = ec.generate_private_key(ec.SECP256R1())
        pid = Identity.generate().peer_id
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(pid))])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(12345)
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + DAY)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"crust:{pid}"), x509.DNSName("a.example")]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        _ISSUED_DER.append(cert.public_bytes(serialization.Encoding.DER))
    return _ISSUED_DER[0]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_certificates_raise_only_peer_authentication_error(
    edits: list[tuple[int, int]],
) -> None:
    """A certificate as a remote may send it (aioquic parses the DER; we read the
    extensions and verify the chain): any corruption is refused, never a crash."""
    der = bytearray(issued_der())
    for pos, value in edits:
        der[pos % len(der)] = value
    try:
        with warnings.catch_warnings():
            # a non-positive serial number parses with a deprecation warning (aioquic parses
            # the remote's certificate the same way); it must still be refused below
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            cert = x509.load_der_x509_certificate(bytes(der))
    except (ValueError, x509.InvalidVersion):
        return  # aioquic refuses it (or the mux drops the datagram) before crust sees it
    with contextlib.suppress(PeerAuthenticationError):
        certificate_peer_id(cert)
    with pytest.raises(Alert):
        verify_chain(cert, [], TrustStore.from_certificates([cert_with_uris([])]))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=3000))
def test_credential_files_with_any_bytes_raise_only_config_error(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    where = tmp_path_factory.mktemp("any")
    for name in ("f", CA_CERT_NAME, CA_KEY_NAME):
        (where / name).write_bytes(data)
    for call in (
        lambda: load_node_credentials(where / "f", where / "f"),
        lambda: TrustStore.from_file(where / "f"),
        lambda: load_ca(where),
    ):
        with pytest.raises(ConfigError):
            call()


# ---------------------------------------------------------------- CLI


def test_cli_ca_init_and_issue(tmp_path: Path) -> None:
    runner = CliRunner()
    ca_dir = tmp_path / "ca"
    result = runner.invoke(main, ["ca", "init", str(ca_dir)])
    assert result.exit_code == 0, result.output
    assert str(ca_dir / CA_CERT_NAME) in result.output
    assert str(ca_dir / CA_KEY_NAME) in result.output
    assert mode(ca_dir / CA_KEY_NAME) == 0o600
    # a second init refuses, naming the directory
    again = runner.invoke(main, ["ca", "init", str(ca_dir)])
    assert again.exit_code == 2 and "already holds a CA" in again.output
    ident = Identity.generate()
    ident.save(tmp_path / "id.pem")
    result = runner.invoke(
        main, ["ca", "issue", str(ca_dir), "--identity", str(tmp_path / "id.pem")]
    )
    assert result.exit_code == 0, result.output
    node_dir = ca_dir / "nodes" / str(ident.peer_id)
    assert str(node_dir / "node.crt") in result.output
    assert mode(node_dir / "node.key") == 0o600
    # the printed configuration lines are a valid config that uses these files
    lines = [ln.strip() for ln in result.output.splitlines() if ln.strip().startswith("quic_")]
    config = Config.for_testing(**tomllib.loads("\n".join(lines)))
    assert config.quic_certificate_file == (node_dir / "node.crt").resolve()
    settings_ = QuicSettings.from_config(config, ident)
    assert certificate_peer_id(settings_.certificate) == ident.peer_id


def test_cli_ca_issue_for_a_peer_id_with_out_days_host(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["ca", "init", str(tmp_path / "ca"), "--name", "Lab"]).exit_code == 0
    pid = Identity.generate().peer_id
    args = ["ca", "issue", str(tmp_path / "ca"), "--peer-id", str(pid), "--out"]
    args += [str(tmp_path / "out"), "--days", "7", "--host", "localhost"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    cert = x509.load_pem_x509_certificate((tmp_path / "out" / "node.crt").read_bytes())
    assert certificate_peer_id(cert) == pid
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= 7 * DAY + datetime.timedelta(
        hours=1
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--identity", "ID", "--peer-id", "x"], "exactly one of"),
        ([], "exactly one of"),
        (["--peer-id", "nonsense"], "not a peer id"),
        (["--identity", "MISSING"], "cannot read"),
        (["--identity", "ID", "--days", "0"], "days"),
        (["--identity", "ID", "--host", "a b"], "not a host name"),
    ],
)
def test_cli_ca_issue_errors(tmp_path: Path, args: list[str], message: str) -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["ca", "init", str(tmp_path / "ca")]).exit_code == 0
    Identity.generate().save(tmp_path / "id.pem")
    args = [a.replace("MISSING", str(tmp_path / "nope.pem")) for a in args]
    args = [a.replace("ID", str(tmp_path / "id.pem")) if a == "ID" else a for a in args]
    result = runner.invoke(main, ["ca", "issue", str(tmp_path / "ca"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "ca" / "nodes").exists()


def test_cli_ca_issue_without_a_ca(tmp_path: Path) -> None:
    Identity.generate().save(tmp_path / "id.pem")
    result = CliRunner().invoke(
        main, ["ca", "issue", str(tmp_path / "none"), "--identity", str(tmp_path / "id.pem")]
    )
    assert result.exit_code == 2
    assert "is not a CA directory" in result.output and "crust ca init" in result.output


def test_peer_id_round_trip_in_certificate_is_exact() -> None:
    pid = PeerId(bytes(range(32)))
    assert certificate_peer_id(cert_with_uris([f"crust:{pid}"])) == pid


def test_config_quic_ca_file_only_in_private_ca_mode(tmp_path: Path) -> None:
    files = {"quic_certificate_file": tmp_path / "c", "quic_private_key_file": tmp_path / "k"}
    for mode_ in ("self-signed", "public-ca"):
        with pytest.raises(ConfigError, match="only used when") as info:
            Config.for_testing(quic_certificates=mode_, quic_ca_file=tmp_path / "ca", **files)
        assert info.value.field == "quic_ca_file"
    with pytest.raises(ConfigError) as info:
        Config.for_testing(quic_certificates="private-ca", **files)
    assert info.value.field == "quic_ca_file"
    with pytest.raises(ConfigError) as info:
        Config.for_testing(quic_certificates="public-ca")
    assert info.value.field == "quic_certificate_file"
