"""Pure rules of the status service."""
