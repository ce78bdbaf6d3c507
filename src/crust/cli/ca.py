"""``crust ca init DIR`` and ``crust ca issue DIR --identity PATH``: a private certificate
authority for QUIC's ``private-ca`` mode, without an openssl recipe."""

from __future__ import annotations

from pathlib import Path

import click

from crust.ca import DEFAULT_CA_DAYS, DEFAULT_NODE_DAYS, init_ca, issue_certificate
from crust.errors import ConfigError
from crust.identity import Identity, PeerId

_OPTION_FOR_FIELD = {
    "directory": "DIR",
    "identity": "--identity",
    "peer_id": "--peer-id",
    "out": "--out",
    "days": "--days",
    "hosts": "--host",
    "name": "--name",
}


def _bad(exc: ConfigError) -> click.BadParameter:
    """A usage error (exit code 2) naming the argument at fault."""
    message = str(exc)
    if exc.field is not None:
        message = message.removeprefix(f"{exc.field}: ")
    return click.BadParameter(message, param_hint=_OPTION_FOR_FIELD.get(exc.field or ""))


@click.group("ca")
def ca_group() -> None:
    """A private certificate authority for quic_certificates = "private-ca".

    `crust ca init DIR` once, then `crust ca issue DIR --identity PATH` for every node;
    each node's config gets the lines `issue` prints.
    """


@ca_group.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default=None, help="The CA's common name (default: a random one).")
@click.option(
    "--days",
    type=int,
    default=DEFAULT_CA_DAYS,
    show_default=True,
    help="How long the CA certificate is valid.",
)
def init_command(directory: Path, name: str | None, days: int) -> None:
    """Create a private CA in DIRECTORY: ca.crt (share it) and ca.key (mode 0600, keep it
    secret; only `crust ca issue` needs it)."""
    try:
        ca = init_ca(directory, name=name, days=days)
    except ConfigError as exc:
        raise _bad(exc) from None
    until = ca.certificate.not_valid_after_utc
    click.echo(f"created {ca.certificate_file}  (CA certificate, valid until {until:%Y-%m-%d})")
    click.echo(f"created {ca.private_key_file}  (CA private key, mode 0600: keep it secret)")
    click.echo(f"next: crust ca issue {directory} --identity PATH")


@ca_group.command("issue")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--identity",
    "identity_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The node's identity file (as used by `crust node --identity`).",
)
@click.option(
    "--peer-id",
    "peer_id_text",
    default=None,
    metavar="PEER_ID",
    help="Issue for this peer id instead (the CA then never sees the identity key).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory for node.crt and node.key (default: DIR/nodes/<peer id>).",
)
@click.option(
    "--days",
    type=int,
    default=DEFAULT_NODE_DAYS,
    show_default=True,
    help="How long the certificate is valid (never past the CA's expiry).",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    metavar="NAME_OR_IP",
    help="Also name this DNS name or IP address in the certificate (repeatable).",
)
def issue_command(
    directory: Path,
    identity_path: Path | None,
    peer_id_text: str | None,
    out: Path | None,
    days: int,
    hosts: tuple[str, ...],
) -> None:
    """Issue a node certificate for a crust identity with the CA in DIRECTORY, and print
    the configuration lines that use it."""
    if (identity_path is None) == (peer_id_text is None):
        raise click.UsageError("give exactly one of --identity PATH and --peer-id PEER_ID")
    try:
        subject: Identity | PeerId
        if identity_path is not None:
            subject = Identity.load(identity_path)
        else:
            assert peer_id_text is not None
            subject = PeerId.parse(peer_id_text)
        issued = issue_certificate(directory, subject, out=out, days=days, hosts=hosts)
    except ConfigError as exc:
        raise _bad(exc) from None
    click.echo(f"peer id {issued.peer_id}")
    click.echo(
        f"created {issued.certificate_file}  "
        f"(node certificate, valid until {issued.not_valid_after:%Y-%m-%d})"
    )
    click.echo(f"created {issued.private_key_file}  (its private key, mode 0600)")
    click.echo("configuration (TOML, e.g. crust node --config FILE):")
    for line in issued.config_lines():
        click.echo(f"  {line}")
