"""Drives jobs: the journal (durable, numbered events), the recorder (every
state change, checked), the runner (one job through its steps) and the engine
(submit, cancel, recovery)."""
