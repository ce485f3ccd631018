"""TLS for the gRPC listener, with certificate files re-read when they change (no restart).

For deployments outside the mesh; in the mesh the sidecar provides mTLS and the listener stays
plaintext. gRPC asks :meth:`RotatingCertificates.fetch` on every new handshake; it returns a new
configuration only when a file's modification time or size changed, so rotation by cert-manager
or a mounted Secret takes effect on the next connection.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc

log = logging.getLogger(__name__)


class RotatingCertificates:
    def __init__(self, cert: str, key: str, client_ca: str = "") -> None:
        self.paths = tuple(p for p in (cert, key, client_ca) if p)
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._stamp = self._current_stamp()
        self.initial = self._configuration()

    def _current_stamp(self) -> tuple[tuple[int, int], ...]:
        stamps = []
        for path in self.paths:
            st = os.stat(path)
            stamps.append((st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        """Read the files; raises OSError/ValueError with the file named when one is unusable."""
        chain = Path(self.cert).read_bytes()
        key = Path(self.key).read_bytes()
        if b"-----BEGIN" not in chain or b"-----BEGIN" not in key:
            raise ValueError(f"{self.cert} / {self.key}: not PEM certificate and key files")
        root = Path(self.client_ca).read_bytes() if self.client_ca else None
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=root)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC per handshake: a new configuration, or None to keep the current one."""
        try:
            stamp = self._current_stamp()
            if stamp == self._stamp:
                return None
            configuration = self._configuration()
        except (OSError, ValueError) as exc:
            log.error("TLS files unreadable, keeping the current certificate: %s", exc)
            return None
        self._stamp = stamp
        log.info("TLS certificate files changed; new handshakes use the new certificate")
        return configuration

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial, self.fetch, require_client_authentication=bool(self.client_ca)
        )
