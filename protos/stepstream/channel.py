"""How every party dials a stepstream service: the default addresses, the
channel options (keepalive, message size) servers and clients agree on, and
TLS: one way to open a channel that verifies the server (and, for mTLS, shows
a client certificate), used by the SDK, the CLI, the status service's link to
the orchestrator and the health probe alike."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from stepstream.flags import env_option

ORCHESTRATOR_PORT = 50051
STATUS_PORT = 50052
DEFAULT_ORCHESTRATOR = f"127.0.0.1:{ORCHESTRATOR_PORT}"
DEFAULT_STATUS = f"127.0.0.1:{STATUS_PORT}"

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def channel_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


AUTHORIZATION = "authorization"


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that presents `token` to a service (`authorization: Bearer
    TOKEN`, see the services' --tokens-file); none for no token. Sent as metadata
    on each call rather than as call credentials: gRPC sends those only over TLS,
    and a token must work on a plaintext loopback channel too."""
    return ((AUTHORIZATION, f"Bearer {token}"),) if token else ()


@dataclass(frozen=True)
class ClientTLS:
    """How a client checks the server it dials, and proves who it is where the server asks (mTLS).

    `root_certificates`: the CA certificate(s), PEM, the server's certificate must
    chain to; None trusts the system's roots (gRPC's bundle, or the file
    $GRPC_DEFAULT_SSL_ROOTS_FILE_PATH names), as for a service with a public certificate.
    `certificate_chain` and `private_key`: the client's certificate and key, PEM,
    for a server that requires one; both or neither.
    `server_name`: the name the server's certificate must carry instead of the
    dialed host (sent as the call's authority too), for a server reached by an
    address its certificate does not name: an IP address, a tunnel, a test.

    The PEM is held, not the file names: a client reads its files once, when it
    is made (from_files), so a missing file is an error then, not at the first call.
    """

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate needs its private key, and a key its certificate")

    @classmethod
    def from_files(
        cls, ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None,
        server_name: str | None = None,
    ) -> ClientTLS:
        """Read the PEM files (ValueError naming the file if one cannot be read or holds no PEM)."""
        return cls(
            root_certificates=None if ca is None else read_pem(ca, "the CA certificate", "CERTIFICATE"),
            certificate_chain=None if cert is None else read_pem(cert, "the client certificate", "CERTIFICATE"),
            private_key=None if key is None else read_pem(key, "the client key", "PRIVATE KEY"),
            server_name=server_name,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def options(self) -> list[tuple[str, Any]]:
        """The channel options TLS adds: the server-name override, if any."""
        return [] if self.server_name is None else [("grpc.ssl_target_name_override", self.server_name)]


def read_pem(path: str | Path, what: str, label: str) -> bytes:
    """The file's bytes if it holds a PEM block of `label` (CERTIFICATE, PRIVATE
    KEY: an "EC PRIVATE KEY" is one too); else ValueError("cannot read `what` PATH: why")."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {what} {path}: {error.strerror or error}") from error
    if not re.search(rb"-----BEGIN [A-Z ]*" + label.encode() + rb"-----", data):
        raise ValueError(f"cannot read {what} {path}: it holds no PEM {label.lower()}")
    return data


def client_tls(
    tls: bool | ClientTLS | None = None, *, ca: str | Path | None = None, cert: str | Path | None = None,
    key: str | Path | None = None, server_name: str | None = None,
) -> ClientTLS | None:
    """The TLS a client asked for, or None for plaintext: TLS is on when `tls` is
    True or a ClientTLS (None and False leave it to the others), or when any of
    the files or the server name is given (a CA, a client certificate or a name
    to verify only mean something over TLS). Files are read now (ValueError, see ClientTLS.from_files); a
    ClientTLS together with any of the others is a ValueError too."""
    if isinstance(tls, ClientTLS):
        if (ca, cert, key, server_name) != (None, None, None, None):
            raise ValueError("give either a ClientTLS or the TLS files and server name, not both")
        return tls
    if not tls and (ca, cert, key, server_name) == (None, None, None, None):
        return None
    return ClientTLS.from_files(ca, cert, key, server_name)


def open_channel(
    address: str,
    *,
    tls: ClientTLS | None,
    options: Sequence[tuple[str, Any]] | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A grpc.aio channel to `address`: plaintext when `tls` is None, else TLS
    that verifies the server as `tls` says; `tls` has no default, so that every
    caller decides. `options` default to channel_options(). A token travels as
    call metadata (bearer_metadata, e.g. from one of `interceptors`), not as
    gRPC call credentials, which gRPC refuses to send over plaintext."""
    chosen = channel_options() if options is None else list(options)
    if tls is None:
        return grpc.aio.insecure_channel(address, options=chosen, interceptors=interceptors)
    return grpc.aio.secure_channel(
        address, tls.credentials(), options=[*chosen, *tls.options()], interceptors=interceptors
    )


def server_name(text: str) -> str | None:
    """A host name as a certificate names it (no port, no spaces); the empty string
    is None, the setting left unset."""
    name = text.strip()
    if not name:
        return None
    if (name.count(":") == 1 and name.rpartition(":")[2].isdigit()) or any(c.isspace() or c == "/" for c in name):
        raise argparse.ArgumentTypeError(f"expected a host name as the server's certificate names it, got {text!r}")
    return name


# The flags (and their environment twins) with which a command is told how to dial with TLS.
_TLS_FLAGS = (
    ("--tls-ca", "STEPSTREAM_TLS_CA", Path,
     "CA certificate (PEM) that verifies the services' certificates; implies --tls"),
    ("--tls-server-name", "STEPSTREAM_TLS_SERVER_NAME", server_name,
     "the name the services' certificates must carry, instead of the host dialed; implies --tls"),
    ("--tls-cert", "STEPSTREAM_CLIENT_TLS_CERT", Path,
     "client certificate (PEM) for services that require one (mTLS), with --tls-key; implies --tls"),
    ("--tls-key", "STEPSTREAM_CLIENT_TLS_KEY", Path, "private key (PEM) of --tls-cert"),
)


def add_tls_arguments(parser: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """--tls, --tls-ca, --tls-server-name, --tls-cert and --tls-key (see
    tls_from_arguments). `defaults=False` adds them hidden and without defaults,
    for a subcommand: accepted after the command name without overwriting a
    value given before it."""
    if not defaults:
        parser.add_argument("--tls", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        for flag, _, kind, _ in _TLS_FLAGS:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return
    parser.add_argument("--tls", action="store_true",
                        help="dial the services with TLS, verified against the system's trusted CAs "
                             "unless --tls-ca names one")
    for flag, env, kind, help in _TLS_FLAGS:
        env_option(parser, flag, env, default=None, type=kind, help=help,
                   metavar="NAME" if kind is server_name else "FILE")


def tls_from_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ClientTLS | None:
    """The ClientTLS the flags of add_tls_arguments ask for (None: plaintext). A
    file that cannot be read, or a certificate without its key, is a usage
    error: parser.error, exit code 2."""
    try:
        return client_tls(args.tls, ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key,
                          server_name=args.tls_server_name)
    except ValueError as error:
        parser.error(str(error))
