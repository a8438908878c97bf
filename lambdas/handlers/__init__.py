"""Thin Lambda handlers: event -> typed model -> one domain call -> typed result."""
