"""Pieces both services share: state vocabulary, the replay-then-live feed, gRPC
server plumbing, rich errors and configuration helpers. No business rules live here."""
