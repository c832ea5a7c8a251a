"""Every benchmark runs (`python -m bench NAME --quick --json FILE`) and writes its figures.

Only that it runs and what it reports are checked: never a speed (figures from
--quick runs mean nothing, and speed is never asserted by a test).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

LATENCY_SCENARIOS = ("idle_1_watcher", "idle_100_watchers", "load_1_watcher", "load_100_watchers")

EXPECTED: dict[str, list[str]] = {
    "ingest": ["events_per_second", "baseline_grpc_events_per_second"],
    "latency": [
        *(f"{scenario}_{figure}" for scenario in LATENCY_SCENARIOS for figure in (
            "p50_ms", "p95_ms", "p99_ms", "max_ms", "samples", "missed", "transitions_per_second",
            "baseline_unary_p50_ms", "baseline_unary_p99_ms", "bare_watch_p50_ms", "bare_watch_p99_ms",
            "orchestrator_stream_p50_ms", "orchestrator_stream_p99_ms",
        )),
        "achieved_transitions_per_second", "baseline_unary_p50_ms", "baseline_unary_p99_ms",
        "baseline_unary_load_p50_ms", "baseline_unary_load_p99_ms",
    ],
    "fanout": [
        "children", "concurrency", "seconds", "children_per_second", "orchestrator_seconds",
        "orchestrator_peak_rss_mb", "status_peak_rss_mb", "getjob_median_ms", "getjob_p99_ms",
        "baseline_children_per_second", "baseline_unary_median_ms", "baseline_unary_p99_ms",
    ],
    "watchers": [
        "events", "events_per_second_0_watchers", "events_per_second_100_split", "events_per_second_1000_split",
        "events_per_second_1000_one_job", "ratio_1000_split", "ratio_1000_one_job",
        "lag_revisions_1000_split", "catchup_seconds_1000_split", "incomplete_watchers_1000_split",
        "slowest_watcher_lag_revisions", "slowest_watcher_lag_seconds", "slowest_watcher_catchup_seconds",
    ],
    "logs": [
        "lines", "bytes", "lines_per_second_captured", "capture_seconds", "baseline_seconds_without_capture",
        "bytes_per_second_served", "baseline_bare_bytes_per_second", "latency_with_output_p50_ms",
        "latency_with_output_p99_ms", "latency_without_output_p50_ms", "latency_without_output_p99_ms",
        "orchestrator_peak_rss_mb_with_output", "status_peak_rss_mb_with_output",
        "orchestrator_peak_rss_mb_without_output", "status_peak_rss_mb_without_output",
    ],
    "web": [
        "dom_p50_ms", "dom_p99_ms", "dom_samples", "dom_missed", "sdk_p50_ms", "sdk_p99_ms", "sdk_samples",
        "sdk_missed", "transitions_per_second",
        *(f"clients_{n}_{figure}" for n in (10, 50) for figure in (
            "connected", "events_per_second", "gateway_cpu_us_per_event", "gateway_cpu_percent",
            "gateway_rss_kb_per_client", "status_cpu_us_per_revision",
        )),
    ],
    "pg_ingest": [
        "events", "events_per_second", "baseline_copy_rows_per_second", "baseline_upsert_rows_per_second",
        "sqlite_events_per_second",
    ],
    "failover": [
        "runs", "children", "failover_median_seconds", "failover_max_seconds", "failover_min_seconds",
        "fresh_start_seconds", "lease_ttl_seconds", "lease_poll_seconds", "events_per_second",
    ],
    "replica_watchers": [
        "events", "events_per_second_1000_on_second", "lag_revisions_1000_on_second",
        "catchup_seconds_1000_on_second", "incomplete_watchers_1000_on_second",
    ],
}
# A browser and up to 50 page streams: run with the slow tests.
SLOW = {"web"}
# These make a database of their own on the tests' PostgreSQL server: without one they are
# skipped (failed, in CI) as the PostgreSQL tests are.
NEEDS_POSTGRES = {"pg_ingest", "failover", "replica_watchers"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW else [])
                                  for name in EXPECTED])
def test_benchmark_runs_and_reports_its_figures(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if name in NEEDS_POSTGRES:
        request.getfixturevalue("postgres")  # only for its skip-or-fail when no server is reachable
    output = tmp_path / f"{name}.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", name, "--quick", "--json", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=170,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"== {name} ==" in result.stdout
    figures = json.loads(output.read_text())
    assert figures["benchmark"] == name
    assert {"cpus", "cpu", "python"} <= set(figures["machine"])
    missing = [key for key in EXPECTED[name] if key not in figures]
    assert not missing, f"{name} JSON lacks {missing}"
    not_numbers = [key for key in EXPECTED[name] if not isinstance(figures[key], int | float)]
    assert not not_numbers, f"{name} JSON has non-numeric {not_numbers}"


def test_the_ingest_benchmark_compares_telemetry_variants(tmp_path: Path) -> None:
    """--telemetry runs off, metrics, tracing and another commit's code (here HEAD's), and
    metrics and tracing were really on: scrapes answered, spans reached the sink."""
    output = tmp_path / "ingest.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "ingest", "--quick", "--telemetry", "--baseline-ref", "HEAD",
         "--json", str(output)], cwd=REPO, capture_output=True, text=True, timeout=170,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    figures = json.loads(output.read_text())
    for variant in ("off", "metrics", "tracing", "main"):
        for figure in ("events_per_second", "cpu_us_per_event"):
            assert isinstance(figures[f"telemetry_{variant}_{figure}"], int | float), (variant, figure)
    assert figures["metrics_scrapes"] >= 2 and figures["spans_exported"] > 0
