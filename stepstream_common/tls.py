"""Serving TLS, and mTLS: the server credentials of --tls-cert, --tls-key and
--tls-client-ca, with the certificate re-read when its files change.

Rotation without a restart: the credentials are gRPC's dynamic SSL server
credentials, whose fetcher gRPC calls before every new TLS handshake. The
fetcher reads the files; if they changed, and the new certificate and key
make a pair (and the client CA parses), it hands gRPC the new configuration,
which that handshake and every later one use. Connections already open, and
the streams on them (event streams, watches), keep the session they
negotiated: nothing is dropped. Files caught half-replaced (a new certificate
beside the old key) or unreadable keep the current certificate in use, with a
warning, until they make a pair again; so any order of replacing them works,
and a rename over the old file (what secret managers and cert-manager do) as
well as a write in place. The client CA is re-read the same way, so the set
of accepted client certificates can change too.

Reading three small files per handshake costs far less than the handshake
itself, and unlike checking modification times it never misses a change.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from stepstream.channel import read_pem

from stepstream_common.config import ServiceConfig, SettingError

log = logging.getLogger(__name__)


class TLSConfigError(SettingError):
    """The TLS settings cannot be served: a file missing, unreadable or not PEM, a
    certificate without its key, a key that is not the certificate's. At start
    the service refuses to, as for any SettingError; at a rotation the current
    certificate stays in use."""


@dataclass(frozen=True)
class _Files:
    """What the files held when read: the certificate chain, its key, the client CA."""

    cert: bytes
    key: bytes
    client_ca: bytes | None


class ServerTLS:
    """A server's certificate files, checked when made (TLSConfigError), and the
    credentials that serve them: see the module docstring for rotation."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert = cert
        self.key = key
        self.client_ca = client_ca
        self._lock = threading.Lock()  # gRPC may call the fetcher from several threads at once
        self._last_warning = ""
        self._current = self._load()

    @classmethod
    def from_config(cls, config: ServiceConfig) -> ServerTLS | None:
        """The TLS `config` asks for, checked now; None for plaintext (no --tls-cert nor --tls-key)."""
        if config.tls_cert is None and config.tls_key is None:
            if config.tls_client_ca is not None:
                raise TLSConfigError("--tls-client-ca needs --tls-cert and --tls-key: client certificates "
                                     "are asked for over TLS")
            return None
        if config.tls_cert is None or config.tls_key is None:
            raise TLSConfigError("--tls-cert and --tls-key go together: give the certificate and its key")
        served = cls(config.tls_cert, config.tls_key, config.tls_client_ca)  # checks the files
        _warn_if_shared(config.tls_key)
        return served

    @property
    def mutual(self) -> bool:
        """Whether clients must show a certificate the client CA signed."""
        return self.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials that serve the files' current certificate on every new handshake."""
        return grpc.dynamic_ssl_server_credentials(
            # The stubs leave out that the fetcher may return None ("no change"), as gRPC documents it.
            self._configuration(self._current), self._fetch,  # type: ignore[arg-type]
            require_client_authentication=self.mutual,
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate fetcher: the new configuration if the files changed
        into a valid one, else None (keep the current)."""
        with self._lock:
            try:
                unchanged = self._read() == self._current
                files = self._current if unchanged else self._load()  # checked only when changed
            except TLSConfigError as error:
                # Once per distinct problem: this runs on every handshake.
                if str(error) != self._last_warning:
                    self._last_warning = str(error)
                    log.warning("keeping the TLS certificate in use: %s", error)
                return None
            except Exception:  # an exception must not reach gRPC's handshake thread
                log.exception("keeping the TLS certificate in use: reading %s failed", self.cert)
                return None
            self._last_warning = ""
            if files == self._current:
                return None
            self._current = files
            log.info("serving the TLS certificate now in %s to new connections", self.cert)
            return self._configuration(files)

    def _configuration(self, files: _Files) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(files.key, files.cert)], files.client_ca)

    def _load(self) -> _Files:
        """The files' contents, checked: PEM, the key the certificate's, the client CA
        parseable. Read before and after the check, which reads the files by
        name itself, so that what is returned is what was checked."""
        before = self._read()
        self._check(before)
        if self._read() != before:
            raise TLSConfigError(f"{self.cert}, {self.key} changed while being read")
        return before

    def _read(self) -> _Files:
        return _Files(
            _read(self.cert, "--tls-cert", "CERTIFICATE"),
            _read(self.key, "--tls-key", "PRIVATE KEY"),
            None if self.client_ca is None else _read(self.client_ca, "--tls-client-ca", "CERTIFICATE"),
        )

    def _check(self, files: _Files) -> None:
        if b"ENCRYPTED" in files.key:  # PKCS#8 "BEGIN ENCRYPTED PRIVATE KEY", or a PEM "Proc-Type: 4,ENCRYPTED"
            raise TLSConfigError(f"--tls-key {self.key} is encrypted: gRPC serves only an unencrypted key")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            # A password, even empty, so that OpenSSL never prompts for one: gRPC cannot use an encrypted key.
            context.load_cert_chain(self.cert, self.key, password=b"")
        except (OSError, ssl.SSLError) as error:
            raise TLSConfigError(f"--tls-cert {self.cert} and --tls-key {self.key} are not a certificate "
                                 f"and its key: {_reason(error)}") from error
        if files.client_ca is not None:
            try:
                context.load_verify_locations(cadata=files.client_ca.decode("ascii", errors="replace"))
            except (ValueError, ssl.SSLError) as error:
                raise TLSConfigError(f"--tls-client-ca {self.client_ca} holds no usable CA certificate: "
                                     f"{_reason(error)}") from error


def _warn_if_shared(key: Path) -> None:
    """A warning, not a refusal: Kubernetes mounts Secret files group-readable
    (fsGroup), where the group is the service's own."""
    with contextlib.suppress(OSError):
        mode = stat.S_IMODE(key.stat().st_mode)
        if mode & 0o077:
            log.warning("--tls-key %s can be read by others than its owner (mode %o): chmod 600 it", key, mode)


def _read(path: Path, flag: str, label: str) -> bytes:
    try:
        return read_pem(path, flag, label)
    except ValueError as error:
        raise TLSConfigError(str(error)) from error


def _reason(error: Exception) -> str:
    """An ssl error's words, without the `[SSL: X] ... (_ssl.c:123)` wrapping where there is one."""
    reason = getattr(error, "reason", None)
    return str(reason).replace("_", " ").lower() if reason else str(error)
