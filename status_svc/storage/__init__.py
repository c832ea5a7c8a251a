"""Persistence of step_stats behind a small interface (SQLite by default)."""
