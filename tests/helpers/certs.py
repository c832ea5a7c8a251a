"""Certificates made at run time for the TLS tests: a CA, server and client
certificates it signs, and the bad ones a client or server must refuse (from an
unrelated CA, expired, for another host).

Only the standard library and `cryptography`, so the client-only tests
(tests/client) use it too. Keys are EC P-256: quick to make, and what gRPC's
TLS stacks all accept.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# What the test services listen on, so what a good server certificate names.
LOOPBACK_NAMES = ("localhost", "127.0.0.1")
# A host the services are not reached by: its certificate fails verification unless the client overrides the name.
OTHER_HOST = "stepstream.example"

_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, both PEM, written to `cert` and `key`."""

    cert: Path
    key: Path

    @property
    def serial(self) -> int:
        return x509.load_pem_x509_certificate(self.cert.read_bytes()).serial_number

    def encrypted_key(self, path: Path) -> Path:
        """The key, encrypted with a password, written to `path`: a key gRPC cannot serve."""
        key = serialization.load_pem_private_key(self.key.read_bytes(), password=None)
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.BestAvailableEncryption(b"a password")))
        return path

    def install(self, cert: Path, key: Path) -> None:
        """Replace the files a service reads (`cert`, `key`) with this pair, each by
        an atomic rename, as secret managers and cert-manager swap them in place."""
        for source, target in ((self.cert, cert), (self.key, key)):
            staged = target.with_name(f".{target.name}.new")
            staged.write_bytes(source.read_bytes())
            staged.replace(target)


class Authority:
    """A self-signed CA in `folder` (ca.pem); issue() signs leaf certificates with it."""

    def __init__(self, folder: Path, name: str = "stepstream test CA") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(self._name).issuer_name(self._name)
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY).not_valid_after(now + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False,
            ), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.cert = folder / "ca.pem"
        self.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))

    def issue(
        self, name: str, *, hosts: tuple[str, ...] = (), client: bool = False, expired: bool = False
    ) -> Issued:
        """A leaf certificate `name`.pem (key `name`.key): for a server answering
        as each of `hosts` (DNS names or IP addresses), or, with `client`, for a
        client. `expired`: its validity ended yesterday."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        start, end = (now - 30 * _DAY, now - _DAY) if expired else (now - _DAY, now + 30 * _DAY)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
        )
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]),
                                            critical=False)
        certificate = builder.sign(self._key, hashes.SHA256())
        issued = Issued(self.folder / f"{name}.pem", self.folder / f"{name}.key")
        issued.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ))
        issued.key.chmod(0o600)
        return issued


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


@dataclass(frozen=True)
class Certificates:
    """Everything the TLS tests use, made once per test in `folder`."""

    ca: Authority
    server: Issued           # 127.0.0.1 and localhost, signed by `ca`
    renewed_server: Issued   # the same names and CA, another serial: what a rotation swaps in
    client: Issued           # a client certificate signed by `ca`
    foreign_ca: Authority    # an unrelated CA
    foreign_client: Issued   # a client certificate signed by `foreign_ca`
    expired_server: Issued   # 127.0.0.1 and localhost, signed by `ca`, expired
    other_host_server: Issued  # signed by `ca`, valid only for OTHER_HOST

    @classmethod
    def make(cls, folder: Path) -> Certificates:
        ca = Authority(folder / "ca")
        foreign = Authority(folder / "foreign-ca", "unrelated test CA")
        return cls(
            ca=ca,
            server=ca.issue("server", hosts=LOOPBACK_NAMES),
            renewed_server=ca.issue("renewed-server", hosts=LOOPBACK_NAMES),
            client=ca.issue("client", client=True),
            foreign_ca=foreign,
            foreign_client=foreign.issue("foreign-client", client=True),
            expired_server=ca.issue("expired-server", hosts=LOOPBACK_NAMES, expired=True),
            other_host_server=ca.issue("other-host-server", hosts=(OTHER_HOST,)),
        )


def peer_serial(address: str, ca: Path, server_name: str | None = None) -> int:
    """The serial number of the certificate a new TLS connection to `address` is
    shown, verified against `ca` (a plain TLS handshake offering HTTP/2, as gRPC
    clients do)."""
    import socket
    import ssl

    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname=server_name or host) as wrapped:
        der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number
