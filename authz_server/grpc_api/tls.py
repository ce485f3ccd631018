"""TLS for the gRPC listener, with certificate files re-read when they change (no restart).

For deployments outside the mesh; in the mesh the sidecar provides mTLS and the listener stays
plaintext. grpcio asks :meth:`RotatingCertificates.fetch` on every new handshake; the fast
serving layer calls :meth:`RotatingCertificates.refresh` every few seconds. Either way files are
re-read only when a modification time or size changed, so rotation by cert-manager or a mounted
Secret takes effect on the next connection.
"""

from __future__ import annotations

import logging
import os
import ssl
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

    def ssl_context(self) -> ssl.SSLContext:
        """A server context for the fast serving layer (HTTP/2 via ALPN); see :meth:`refresh`."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["h2"])
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.client_ca)
        return context

    def refresh(self, context: ssl.SSLContext) -> None:
        """Load rotated files into ``context`` (new handshakes use them); keep the old on error."""
        try:
            stamp = self._current_stamp()
            if stamp == self._stamp:
                return
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca:
                context.load_verify_locations(self.client_ca)
        except (OSError, ssl.SSLError) as exc:
            log.error("TLS files unusable, keeping the current certificate: %s", exc)
            return
        self._stamp = stamp
        log.info("TLS certificate files changed; new handshakes use the new certificate")

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial, self.fetch, require_client_authentication=bool(self.client_ca)
        )
