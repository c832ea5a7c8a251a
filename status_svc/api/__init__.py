"""The gRPC adapter of the status service. No rules here."""
