"""The orchestrator service: runs jobs and is the one place where status is decided.

Layers: domain/ (definitions, state machine, every outcome rule; no I/O), workers/
(what a step runs; its __init__ is the plugin API), engine/ (drives jobs by asking
domain/ and recording its answers), storage/
(the durable event log), api/ (gRPC adapter), app.py (wiring from config).
"""
