"""The daemon's TLS: its certificate and key, and the CAs of client certificates (mutual TLS), reloaded on SIGHUP.

gRPC asks `_fetch` for the configuration at each new handshake; a reload
reads and checks the files once, and the next handshake takes what it
prepared. Connections already open keep the certificate they began with.
Files that cannot be used (missing, not PEM, a key that does not match its
certificate, an encrypted key) stop the daemon at start-up, and on a reload
leave the certificate served as it was.
"""

from __future__ import annotations

import logging
import ssl
import threading

import grpc

from .config import Config

log = logging.getLogger("drived")


class TLSFileError(Exception):
    """A certificate, key or CA file that cannot be used; the message names it and says why."""


def _refuse_encrypted(key: str) -> bytes:
    raise TLSFileError(f"the key {key} is encrypted: give drived an unencrypted key file (readable by it alone)")


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise TLSFileError(f"cannot read the {what} {path}: {err.strerror}") from None


class ServerTLS:
    """The certificate drived serves (`--tls-cert`, `--tls-key`) and, for mutual TLS, the CAs whose client
    certificates it accepts (`--tls-client-ca`); a message names each setting as the operator gave it."""

    def __init__(self, config: Config) -> None:
        self._cert, self._key, self._client_ca = config.tls_cert, config.tls_key, config.tls_client_ca
        self._named = config.named
        self._current = self._load()  # TLSFileError at start-up
        self._fresh: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()  # _fetch runs on gRPC's threads, reload on the event loop

    def _load(self) -> grpc.ServerCertificateConfiguration:
        """Reads and checks the files."""
        cert = _read(self._cert, f"certificate ({self._named('tls_cert')})")
        key = _read(self._key, f"key ({self._named('tls_key')})")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
                self._cert, self._key, password=lambda: _refuse_encrypted(self._key)
            )
        except ssl.SSLError as err:
            raise TLSFileError(
                f"{self._named('tls_cert')} {self._cert} and {self._named('tls_key')} {self._key} are not a PEM "
                f"certificate and its key ({err.reason or err})"
            ) from None
        client_ca = None
        if self._client_ca:
            client_ca = _read(self._client_ca, f"client CA ({self._named('tls_client_ca')})")
            try:
                # The bytes read above, not the file again: what is checked is what is served.
                pem = client_ca.decode("ascii", "ignore")
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem)
            except (ssl.SSLError, ValueError) as err:  # ValueError: an empty file
                reason = getattr(err, "reason", None) or err
                raise TLSFileError(
                    f"{self._named('tls_client_ca')} {self._client_ca} holds no PEM certificate ({reason})"
                ) from None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that serve the files' certificate, and take a reloaded one at the next handshake."""
        return grpc.dynamic_ssl_server_credentials(
            self._current, self._fetch, require_client_authentication=bool(self._client_ca)
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """What gRPC asks at each handshake: a new configuration after a reload, else None (no change)."""
        with self._lock:
            fresh, self._fresh = self._fresh, None
        return fresh

    def reload(self) -> None:
        """Reads the files again (SIGHUP); files that cannot be used leave the served certificate as it was."""
        try:
            fresh = self._load()
        except TLSFileError as err:
            log.warning("tls not reloaded", extra={"fields": {"reason": str(err)}})
            return
        with self._lock:
            self._fresh = fresh
        log.info("tls reloaded", extra={"fields": {"cert": self._cert, "client_ca": self._client_ca}})
