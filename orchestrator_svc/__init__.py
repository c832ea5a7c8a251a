"""The orchestrator service: runs jobs and is the one place where status is decided.

Layers: domain/ (definitions, state machine, outcome rules; no I/O), workers/
(what a step runs), engine/ (drives jobs through the state machine), storage/
(the durable event log), api/ (gRPC adapter), app.py (wiring from config).
"""
