"""Server plumbing both services share: the replay-then-live feed and the one
streaming loop over it, pre-encoded wire envelopes, SQLite units that survive
cancellation, gRPC servers with one error boundary, configuration from the
services' dataclasses, and (local/) the launcher behind `stepstream up`/`demo`.
No business rules live here, and no client imports it: what clients and
services both need is in the contract package (protos/stepstream)."""
