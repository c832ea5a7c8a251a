#!/usr/bin/env bash
# Sets up .venv with everything the checks need, then runs lint, type checks and
# the whole test suite (slow soak tests included). This is the README's test
# command and what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/python -m pytest -m "slow or not slow" "$@"
