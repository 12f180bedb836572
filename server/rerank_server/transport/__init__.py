"""Shared-memory transport of batches between the front-end and its workers."""
