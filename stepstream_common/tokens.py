"""The tokens file: who may call the services, and in which role.

A token is `NAME.SECRET`: NAME says who is calling (it is what a job records
as submitted_by and cancelled_by, and what the logs name; it is not a secret),
SECRET proves it. The file keeps, per NAME, a role and a salted SHA-256 of
SECRET, never SECRET itself: whoever reads the file (a backup, a config
repository) learns who may call, not how to call as them.

Why a fast hash, not a slow one (scrypt, bcrypt): those protect secrets people
choose, which can be guessed; a SECRET here is 32 random bytes (or at least 32
characters chosen by whoever runs --secret-stdin), which no one can guess
from its hash, fast or slow. A slow hash would only hand every caller without
a token a way to make the service hash for it: a flood of wrong secrets for a
name kept its first real login waiting seconds. Checking a token costs
microseconds, so it needs no lock, no cache and no thread.

The file (--tokens-file, env STEPSTREAM_TOKENS_FILE): UTF-8 text, one token
per line, three fields separated by spaces; blank lines and lines starting
with `#` are ignored:

    # NAME    ROLE      HASH
    ci        operator  $sha256$<salt>$<hash>
    status    follower  $sha256$<salt>$<hash>

- NAME: 1 to 64 of A-Z a-z 0-9 _ -, each NAME once in the file.
- ROLE: one of ROLES (what each may call: stepstream_common.auth.RULES).
- HASH: `$sha256$SALT$DIGEST`, DIGEST = SHA-256(SALT + SECRET), the 16-byte
  salt and the 32-byte digest base64 without padding. Secrets are never
  compared as text: the hash of what a caller sends is compared with
  hmac.compare_digest.

Make an entry with `python -m stepstream_common.tokens hash --name ci --role
operator >> tokens` (after `umask 077`: the file must be private): it prints
the line for the file on stdout and the new token, once, on stderr (SECRET is
32 random bytes); with --secret-stdin it
hashes the SECRET read from stdin instead (at least 32 characters) and
prints no token.

A service refuses to start (one line, exit code 2) if the file is readable or
writable by group or others (it says who may do what: keep it 0600), is not
exactly in this format, or names an unknown role. SIGHUP makes it read the
file again: a good file replaces the tokens at
once, for the next call; a bad one is logged and the tokens in use are kept.

The same permission rule applies to a file holding a token in clear (a
status service's --orchestrator-token-file): read_token_file.
"""

from __future__ import annotations

import argparse
import base64
import enum
import hashlib
import hmac
import os
import re
import secrets
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from stepstream_common.config import SettingError


class Role(enum.StrEnum):
    """What a token may do; the methods each may call are stepstream_common.auth.RULES."""

    VIEWER = "viewer"  # read jobs (both services)
    OPERATOR = "operator"  # read, submit and cancel jobs
    FOLLOWER = "follower"  # read the orchestrator's event log: a status service
    ADMIN = "admin"  # everything


ROLES = tuple(role.value for role in Role)
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# What a secret may hold: it travels in a gRPC metadata value (printable ASCII), and is cut from the token at '.'.
SECRET = re.compile(r"[!-~]+")
MIN_SECRET_CHARS = 32
SALT_BYTES, HASH_BYTES = 16, 32
_FORMAT = re.compile(r"\$sha256\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class SecretHash:
    """A salted SHA-256 of a secret, as the file writes it (see the module docstring)."""

    salt: bytes
    digest: bytes

    @classmethod
    def of(cls, secret: str) -> SecretHash:
        """A new hash of `secret`, with a random salt."""
        salt = secrets.token_bytes(SALT_BYTES)
        return cls(salt, _sha256(salt, secret))

    @classmethod
    def parse(cls, text: str) -> SecretHash:
        """ValueError unless `text` is a hash in the file's format."""
        found = _FORMAT.fullmatch(text)
        if found is None:
            raise ValueError("the hash is not in the format $sha256$SALT$DIGEST")
        salt, digest = _unb64(found[1]), _unb64(found[2])
        if len(salt) < SALT_BYTES or len(digest) != HASH_BYTES:
            raise ValueError(f"the hash needs a salt of at least {SALT_BYTES} bytes and a {HASH_BYTES}-byte digest")
        return cls(salt, digest)

    def __str__(self) -> str:
        return f"$sha256${_b64(self.salt)}${_b64(self.digest)}"

    def matches(self, secret: str) -> bool:
        """Whether `secret` hashes to this, compared in constant time."""
        return hmac.compare_digest(_sha256(self.salt, secret), self.digest)


def _sha256(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


@dataclass(frozen=True)
class Entry:
    """One line of the file."""

    name: str
    role: Role
    hash: SecretHash

    def line(self) -> str:
        return f"{self.name} {self.role} {self.hash}"


class TokenTable:
    """The tokens of one reading of the file; verify() says whose a presented token is."""

    def __init__(self, entries: Mapping[str, Entry]) -> None:
        self.entries = dict(entries)

    def verify(self, token: str) -> Entry | None:
        """The entry `token` (NAME.SECRET) proves, or None."""
        name, dot, secret = token.partition(".")
        entry = self.entries.get(name)
        if entry is None or not dot:
            return None
        return entry if entry.hash.matches(secret) else None


def load_tokens(path: Path) -> TokenTable:
    """The tokens file at `path`; SettingError saying what is wrong and where (see the module docstring)."""
    text = read_private_file(path, "tokens file")
    entries: dict[str, Entry] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entry = _entry(line)
        except ValueError as error:
            raise SettingError(f"tokens file {path}: line {number}: {error}") from None
        if entry.name in entries:
            raise SettingError(f"tokens file {path}: line {number}: the name {entry.name!r} is already used")
        entries[entry.name] = entry
    if not entries:
        raise SettingError(f"tokens file {path}: holds no token, so no call would be allowed")
    return TokenTable(entries)


def _entry(line: str) -> Entry:
    fields = line.split()
    if len(fields) != 3:
        raise ValueError(f"expected NAME ROLE HASH, found {len(fields)} field(s)")
    name, role, hashed = fields
    if NAME.fullmatch(name) is None:
        raise ValueError("a name is 1 to 64 of A-Z a-z 0-9 _ -")
    if role not in ROLES:
        raise ValueError(f"unknown role {role[:32]!r} (expected one of {', '.join(ROLES)})")
    return Entry(name, Role(role), SecretHash.parse(hashed))


def read_token_file(path: Path) -> str:
    """The token held in clear in the file at `path` (its only content, surrounding whitespace aside);
    SettingError if it is readable by others or holds no token."""
    token = read_private_file(path, "token file").strip()
    if SECRET.fullmatch(token) is None:
        raise SettingError(f"token file {path}: expected one token (printable ASCII, no spaces)")
    return token


def read_private_file(path: Path, what: str) -> str:
    """The text of the regular file `path`, read only if neither group nor others have access to it."""
    try:
        with path.open("rb") as file:
            status = os.fstat(file.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise SettingError(f"{what} {path}: not a regular file")
            mode = stat.S_IMODE(status.st_mode)
            if mode & 0o077:
                raise SettingError(f"{what} {path}: group or others have access to it (mode {mode:04o}); "
                                   f"it must be private: chmod 600 {path}")
            return file.read().decode()
    except OSError as error:
        raise SettingError(f"{what} {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise SettingError(f"{what} {path}: not UTF-8 text") from None


def new_entry(name: str, role: str, secret: str | None = None) -> tuple[Entry, str]:
    """An entry for `name` and `role` and the token that proves it: of `secret`, else of a new random one.
    ValueError for a bad name, role or secret."""
    if NAME.fullmatch(name) is None:
        raise ValueError(f"bad name {name!r}: a name is 1 to 64 of A-Z a-z 0-9 _ -")
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if secret is None:
        secret = secrets.token_urlsafe(32)
    elif len(secret) < MIN_SECRET_CHARS or SECRET.fullmatch(secret) is None:
        raise ValueError(f"a secret is at least {MIN_SECRET_CHARS} printable ASCII characters, without spaces")
    return Entry(name, Role(role), SecretHash.of(secret)), f"{name}.{secret}"


def main(argv: list[str] | None = None) -> int:
    """`python -m stepstream_common.tokens hash ...`: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m stepstream_common.tokens",
        description="Make a line of a tokens file (see --tokens-file): append its output to the file.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    make = commands.add_parser("hash", help="print a tokens-file line for a new token (the token itself once, "
                                            "on stderr)")
    make.add_argument("--name", required=True, help="who the token is for (1-64 of A-Z a-z 0-9 _ -)")
    make.add_argument("--role", required=True, choices=ROLES)
    make.add_argument("--secret-stdin", action="store_true",
                      help=f"hash the secret read from stdin (one line, at least {MIN_SECRET_CHARS} characters) "
                           "instead of making one; the token is then NAME.SECRET")
    args = parser.parse_args(argv)
    secret = sys.stdin.readline().strip() if args.secret_stdin else None
    try:
        entry, token = new_entry(args.name, args.role, secret)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(entry.line(), flush=True)
    if secret is None:
        print(f"token for {entry.name} ({entry.role}), shown only now: {token}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
