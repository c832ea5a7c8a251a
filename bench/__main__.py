"""`python -m bench NAME [--quick] [--json FILE]`: run one benchmark and print its table.

NAME is one of: ingest, latency, fanout, watchers, logs, web, pg_ingest, failover,
replica_watchers (the last three need PostgreSQL: STEPSTREAM_TEST_POSTGRES).
--quick runs tiny sizes (for the smoke tests); figures from a quick run mean
nothing. `fanout --children 100000 [--fanouts 3]` is the large fan-out run
(memory and loop stalls).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
from pathlib import Path

from stepstream.flags import positive_int

BENCHMARKS = ("ingest", "latency", "fanout", "watchers", "logs", "web", "pg_ingest", "failover",
              "replica_watchers")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=BENCHMARKS)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check that it runs")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--children", type=positive_int, help="fanout only: children per fan-out step (default 10000)")
    parser.add_argument("--fanouts", type=positive_int, default=1,
                        help="fanout only: that many fan-out steps side by side in the one job (default 1)")
    parser.add_argument("--telemetry", action="store_true",
                        help="ingest and latency only: also with metrics on, tracing on, and --baseline-ref's code "
                             "(bench/telemetry.py)")
    parser.add_argument("--baseline-ref", default="main", help="with --telemetry: the commit to compare with")
    args = parser.parse_args()
    sized = args.children is not None or args.fanouts != 1
    if sized and args.name != "fanout":
        parser.error("--children and --fanouts apply to the fanout benchmark only")
    if args.telemetry and args.name not in ("ingest", "latency"):
        parser.error("--telemetry applies to the ingest and latency benchmarks only")
    module = importlib.import_module(f"bench.{args.name}")
    if sized:
        run = module.run(args.quick, args.children, args.fanouts)
    elif args.telemetry:
        run = module.run(args.quick, telemetry=True, baseline_ref=args.baseline_ref)
    else:
        run = module.run(args.quick)
    report = asyncio.run(run)
    report.print()
    if args.json:
        report.save(args.json)


if __name__ == "__main__":
    main()
