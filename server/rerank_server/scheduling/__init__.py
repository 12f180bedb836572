"""Queueing and dynamic batching of (query, document) pairs across requests."""
