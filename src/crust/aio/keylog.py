"""The key log (``Config.keylog_file``): session secrets for Wireshark, debugging only.

One append-only text file holds two kinds of lines:

* QUIC's TLS secrets in the NSS key log format, written by aioquic itself
  (``CLIENT_HANDSHAKE_TRAFFIC_SECRET <client random> <secret>`` …): Wireshark's TLS/QUIC
  dissectors read them (``tls.keylog_file``) and ignore every other line;
* one line per crust session (TCP or QUIC stream) with its Noise transport keys::

      CRUST_NOISE <initiator ephemeral> <handshake hash> <key i->r> <key r->i>

  all four fields lowercase hex of 32 bytes: the initiator's ephemeral public key, which is
  sent in clear in handshake message 1 (how the dissector finds the keys of a capture's
  session), the final Noise handshake hash, and the AES-256-GCM keys of the
  initiator-to-responder and responder-to-initiator directions.

QUIC and Retry: crust's listeners always answer a first Initial with Retry, and aioquic's
client then restarts TLS with a *new* ClientHello random, while Wireshark keeps the random of
the first ClientHello it saw.  So on the dialing side every TLS line is written twice: as
aioquic logs it, and with the first ClientHello's random (see :func:`track_first_random`).
A key log on the listening side alone therefore does not decrypt QUIC in Wireshark.

Anyone holding this file can decrypt the recorded traffic, so opening it logs a warning,
and the file is created readable by its owner only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, TextIO, cast

from crust.errors import ConfigError
from crust.proto.noise import TransportKeys

if TYPE_CHECKING:
    from aioquic.quic.connection import QuicConnection

log = logging.getLogger("crust.keylog")

NOISE_LABEL = "CRUST_NOISE"


def noise_line(keys: TransportKeys) -> str:
    """The key log line of one session (with its newline)."""
    return (
        f"{NOISE_LABEL} {keys.initiator_ephemeral.hex()} {keys.handshake_hash.hex()} "
        f"{keys.initiator_to_responder.hex()} {keys.responder_to_initiator.hex()}\n"
    )


class KeyLog:
    """An open key log file; :attr:`file` is what aioquic's ``secrets_log_file`` takes."""

    def __init__(self, path: Path, file: TextIO) -> None:
        self.path = path
        self.file = file
        self._failed = False

    @classmethod
    def open(cls, path: Path) -> KeyLog:
        """Open ``path`` for appending (created with mode 0600) and warn loudly."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot open {path}: {exc.strerror or exc}", "keylog_file") from exc
        file = os.fdopen(fd, "a", encoding="ascii", buffering=1)
        log.warning(
            "KEY LOG ENABLED: the secrets of every crust session (TCP and QUIC) are written "
            "to %s; anyone who reads it can decrypt captured traffic. Debugging only: unset "
            "keylog_file in production.",
            path,
        )
        return cls(path, file)

    def write_noise(self, keys: TransportKeys) -> None:
        """Append one session's Noise transport keys (errors are logged, never raised: the
        connection must not fail because of its debugging aid)."""
        if self.file.closed:
            return
        try:
            self.file.write(noise_line(keys))
            self.file.flush()
        except (OSError, ValueError) as exc:
            if not self._failed:
                self._failed = True
                log.error("cannot write the key log %s: %s", self.path, exc)

    def close(self) -> None:
        try:
            self.file.close()
        except OSError as exc:
            log.error("cannot close the key log %s: %s", self.path, exc)


class _AliasingSecretsLog:
    """What aioquic writes its TLS secrets to on a dialing connection: each line as it comes,
    and again under the random of the connection's first ClientHello if that differs."""

    def __init__(self, target: TextIO, first_random: str) -> None:
        self.target = target
        self.first_random = first_random

    def write(self, line: str) -> int:
        parts = line.split(" ")
        written = self.target.write(line)
        if len(parts) == 3 and parts[1] != self.first_random:
            written += self.target.write(f"{parts[0]} {self.first_random} {parts[2]}")
        return written

    def flush(self) -> None:
        self.target.flush()


def track_first_random(quic: QuicConnection) -> None:
    """Call right after ``quic.connect()``: from then on the connection's TLS secrets are also
    logged under its first ClientHello random (which survives a Retry in Wireshark's view)."""
    target = quic.configuration.secrets_log_file
    tls = getattr(quic, "tls", None)
    random = getattr(tls, "client_random", None)
    if target is not None and isinstance(random, bytes) and random:
        aliasing = _AliasingSecretsLog(target, random.hex())
        quic.configuration.secrets_log_file = cast(TextIO, aliasing)
