"""The status store a configuration names (--store): SQLite by default, or PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from status_svc.config import SQLITE_SCHEME, StatusConfig
from status_svc.storage.base import StatusStore
from status_svc.storage.postgres import PostgresStatusStore
from status_svc.storage.sqlite import SqliteStatusStore
from stepstream_common.config import SettingError
from stepstream_common.tokens import read_private_file

DATABASE_FILE = "status.sqlite3"  # the SQLite file in --data-dir when --store is unset


def store_from_config(config: StatusConfig) -> StatusStore:
    """The (unopened) store of config.store; the password file, if any, is read now (SettingError if unusable)."""
    url = config.store
    if url is None:
        return SqliteStatusStore(config.data_dir / DATABASE_FILE)
    if url.startswith(SQLITE_SCHEME):
        return SqliteStatusStore(Path(url[len(SQLITE_SCHEME):]))
    password = None
    if config.store_password_file is not None:
        password = read_private_file(config.store_password_file, "store password file").rstrip("\r\n")
        if not password:
            raise SettingError(f"store password file {config.store_password_file}: empty")
    return PostgresStatusStore(url, password=password, pool_size=config.store_pool_size,
                               timeout=config.store_timeout)
