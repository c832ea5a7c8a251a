"""The gRPC adapter: requests in, engine calls, responses out. No rules here."""
