"""When to try a failed delivery again."""

from __future__ import annotations

import random

from gateway.config import RetryPolicy


def next_delay(policy: RetryPolicy, attempt: int, retry_after: float | None = None) -> float | None:
    """Seconds until the attempt after `attempt` (1-based), or None when the schedule is used up.

    Jitter spreads retries of many deliveries that failed together (an outage) so that they do not all hit
    the recovering receiver in the same instant. A receiver's Retry-After is honoured when it asks for longer,
    up to `retry_after_limit(policy)`: a pending delivery cannot be replayed, so one parked for years by a
    wrong header could only wait.
    """
    if attempt > len(policy.schedule):
        return None
    delay = policy.schedule[attempt - 1]
    if policy.jitter:
        delay *= 1 + random.uniform(-policy.jitter, policy.jitter)
    if retry_after is not None:
        delay = max(delay, min(retry_after, retry_after_limit(policy)))
    return delay


# The longest a receiver's Retry-After may hold a delivery back, unless the schedule itself waits longer.
RETRY_AFTER_LIMIT = 3600.0


def retry_after_limit(policy: RetryPolicy) -> float:
    return max(RETRY_AFTER_LIMIT, *policy.schedule)
