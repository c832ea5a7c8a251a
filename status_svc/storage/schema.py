"""The status store's schema version, the same number for every backend.

Each store records the version of its schema in its `meta` table (key
`schema_version`) and, at open(), creates the schema or migrates an older one
up to SCHEMA_VERSION in the same transaction, then records it. A store whose
recorded version is newer than SCHEMA_VERSION was made by a newer release:
this one cannot know what its tables mean, so open() refuses before touching
anything (SchemaTooNewError, a SettingError: one line, exit code 2).

Versions: 0, no version recorded (an SQLite file from before versioning; its
missing columns are added); 1, the tables of storage/sql.py's columns.
"""

from __future__ import annotations

from stepstream_common.config import SettingError

SCHEMA_VERSION = 1
VERSION_KEY = "schema_version"


class SchemaTooNewError(SettingError):
    """The store's schema is newer than this release knows: run the release that made it (or a newer one)."""


def known_version(recorded: str | None, where: str) -> int:
    """The version a store records (0: none yet); SchemaTooNewError if newer than SCHEMA_VERSION."""
    found = int(recorded) if recorded is not None else 0
    if found > SCHEMA_VERSION:
        raise SchemaTooNewError(
            f"the status store {where} has schema version {found}, newer than the {SCHEMA_VERSION} this "
            "stepstream-status knows: run the release that wrote it, or a newer one"
        )
    return found
