"""The status service: persists step_stats from the orchestrator's event stream
and serves snapshots and watches, joined by one revision.

Layers: domain/ (the fold that decides what an event changes, the projector
that gives changes their revisions; no I/O), ingest/ (following orchestrators,
the single writer), storage/ (the StatusStore interface, in domain objects,
and its SQLite backend),
api/ (gRPC adapter), app.py (wiring from config).
"""
