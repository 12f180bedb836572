"""Retrying calls that failed for a passing reason: the server was busy or briefly unreachable."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

from rerank_client.errors import from_rpc_error

#: Only these codes are retried: they mean "not now", and a rerank is safe to repeat.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for UNAVAILABLE and RESOURCE_EXHAUSTED.

    `max_attempts` counts the first try. Each pause is `initial_backoff * multiplier ** n`, capped
    at `max_backoff`, then shortened by a random fraction up to `jitter` so that many clients
    rejected together do not come back together. Against several replicas, each attempt goes to
    the next one that is SERVING (gRPC's round_robin), so a retry usually lands on another one.
    """

    max_attempts: int = 3
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoffs must not be negative")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be at least 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be within [0, 1], got {self.jitter}")

    def backoff(self, retry: int) -> float:
        """The pause before retry number `retry` (1 for the first retry), in seconds."""
        try:
            delay = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        except OverflowError:
            delay = self.max_backoff
        return delay * (1 - self.jitter * random.random())


#: What clients use unless told otherwise; a module constant because a frozen policy is shareable.
DEFAULT_RETRY = RetryPolicy()


class Attempts:
    """The retry budget of one call: attempts made so far and the deadline they all share."""

    def __init__(self, policy: RetryPolicy | None, timeout: float | None) -> None:
        self._policy = policy
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._made = 0

    def timeout(self) -> float | None:
        """The timeout of the next attempt: whatever is left of the call's own."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def pause_after(self, rpc_error: grpc.RpcError, *, retryable: bool = True) -> float:
        """The pause before the next attempt after `rpc_error`; raises its typed error when it must surface.

        `retryable=False` is for calls that can no longer be repeated safely (a stream under way).
        No retry is made when its pause would end past the deadline: it could only time out.
        """
        self._made += 1
        error = from_rpc_error(rpc_error)
        policy = self._policy
        if (
            policy is None
            or not retryable
            or error.code not in RETRYABLE_CODES
            or self._made >= policy.max_attempts
        ):
            raise error from rpc_error
        delay = policy.backoff(self._made)
        if self._deadline is not None and time.monotonic() + delay >= self._deadline:
            raise error from rpc_error
        return delay
