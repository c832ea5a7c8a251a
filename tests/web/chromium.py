"""Debian's chromium as the browser tests and `python -m bench web` launch it (never a download)."""

from __future__ import annotations

import os

CHROMIUM = os.environ.get("STEPSTREAM_CHROMIUM", "/usr/bin/chromium")
INSTALL = "apt-get install -y chromium chromium-driver"
# The flags Debian's chromium needs to stay off the network (notes/facts-2026-12.md); as root, --no-sandbox.
CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", *(["--no-sandbox"] if os.geteuid() == 0 else [])]
