"""`python -m bench NAME [--quick] [--json FILE]`: run one benchmark and print its table.

NAME is one of: ingest, latency, fanout, watchers. --quick runs tiny sizes (for
the smoke tests); figures from a quick run mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
from pathlib import Path

BENCHMARKS = ("ingest", "latency", "fanout", "watchers")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=BENCHMARKS)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check that it runs")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    module = importlib.import_module(f"bench.{args.name}")
    report = asyncio.run(module.run(args.quick))
    report.print()
    if args.json:
        report.save(args.json)


if __name__ == "__main__":
    main()
