"""Who can reach a service and who can read what it keeps.

The network. Anyone who can connect to the orchestrator can run commands as
its user, and anyone who can connect to the status service can read every
job's status. So a service serves only loopback unless it has both TLS
(--tls-cert) and tokens (--tokens-file): asked to listen on an address other
machines may reach (a wildcard such as 0.0.0.0 or ::, a LAN address, a
hostname other than localhost) without both, it refuses to start, unless
--insecure says that is meant (a private network, a proxy that
authenticates), and then it logs a WARNING at every start so the choice
stays visible. A hostname is judged by its name, not resolved: what it
resolves to can change after the check.

The files. The data directory is created 0700 and every file in it 0600 (the
SQLite files, see stepstream_common.sqlite; the process registry, see
orchestrator_svc.workers.processes). A data directory that already exists
with a looser mode is left as it is and warned about: it is the operator's
choice and may be shared (a mount point, a home directory, /tmp), so changing
its mode could break something else, or not be allowed at all (a volume owned
by root). The files in it are 0600 whatever the directory's mode.
"""

from __future__ import annotations

import ipaddress
import logging
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

log = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost"})


class Protection(NamedTuple):
    """TLS or tokens, as the refusal and the warning name it."""

    how: str  # how to turn it on
    without: str  # what serving without it is
    risk: str  # what that means


TLS = Protection("TLS (--tls-cert and --tls-key, env STEPSTREAM_TLS_CERT and STEPSTREAM_TLS_KEY)", "in plaintext",
                 "calls cross the network readable and alterable")
TOKENS = Protection("tokens (--tokens-file, env STEPSTREAM_TOKENS_FILE)", "unauthenticated",
                    "whoever can connect may call every method")
INSECURE = "--insecure (env STEPSTREAM_INSECURE=1)"


def is_loopback(listen: str) -> bool:
    """Whether the HOST of `listen` (HOST:PORT, an IPv6 host optionally in
    brackets) reaches this machine only: a loopback IP (127.0.0.0/8, ::1) or
    the name localhost. An empty host is gRPC's every interface."""
    host = listen.rpartition(":")[0].strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower().rstrip(".") in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to anything


@dataclass(frozen=True)
class Exposure:
    """What serving an address as configured means: `refusal` says why the
    service must not start (and how to configure it), `warning` what it must
    log at every start; both empty when the address is safe as configured."""

    refusal: str = ""
    warning: str = ""


def assess_exposure(
    listen: str, *, tls_enabled: bool, auth_enabled: bool, insecure: bool, tls: Protection = TLS,
    tokens: Protection = TOKENS, insecure_flag: str = INSECURE,
) -> Exposure:
    """Whether a service may serve `listen` with TLS and tokens as configured
    (see the module docstring): loopback always; any other address with both,
    or, lacking either, only when `insecure`, with a warning. `tls`, `tokens` and
    `insecure_flag` name the settings in the refusal (the web gateway's differ)."""
    missing = [protection for protection, enabled in ((tokens, auth_enabled), (tls, tls_enabled)) if not enabled]
    if not missing or is_loopback(listen):
        return Exposure()
    how = " and ".join(protection.how for protection in missing)
    serving = f"{listen} {' and '.join(protection.without for protection in missing)}"
    if not insecure:
        return Exposure(refusal=(
            f"refusing to serve {serving}: other machines may reach that address. Configure {how}, "
            f"or listen on a loopback address (127.0.0.1, ::1, localhost), or pass {insecure_flag} to serve it so "
            "anyway"
        ))
    return Exposure(warning=(
        f"serving {serving} (--insecure), on an address other machines may reach: "
        f"{'; '.join(protection.risk for protection in missing)}. Configure {how}"
    ))


class Exposed(Protocol):
    """The settings that decide a service's exposure (every ServiceConfig has them)."""

    @property
    def listen(self) -> str: ...

    @property
    def insecure(self) -> bool: ...

    @property
    def tls_cert(self) -> Path | None: ...

    @property
    def tokens_file(self) -> Path | None: ...


def exposure_of(config: Exposed) -> Exposure:
    """assess_exposure for a service's settings: TLS is on with --tls-cert (a
    certificate without its key is refused later, by stepstream_common.tls),
    tokens with --tokens-file."""
    return assess_exposure(config.listen, tls_enabled=config.tls_cert is not None,
                           auth_enabled=config.tokens_file is not None, insecure=config.insecure)


def private_dir(path: Path) -> None:
    """Create the data directory `path` 0700 (its parents as umask allows); if
    it exists with group or other access, warn and leave it (see the module
    docstring)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning(
            "data directory %s has mode %04o: other users may list, and with write access replace, its files "
            "(which are 0600); make it private with `chmod 700 %s`", path, mode, path,
        )
