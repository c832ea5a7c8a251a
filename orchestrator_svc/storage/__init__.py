"""The durable event log behind a small interface (SQLite by default)."""
