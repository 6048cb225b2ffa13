"""Giving up on tasks at shutdown. A stop cancels what runs past its bound; plugin code may catch that
cancellation and go on (a retry loop around `except BaseException`, or one that catches CancelledError),
and awaiting it then would hold up the stop for ever. So a cancelled task is waited for a moment only, then left
running: it ends with the process."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

# How long a task that was cancelled is waited for before it is left running: ample for one that honours its
# cancellation, even with a connection or two to close in its `finally`.
CANCELLED_GRACE = 1.0  # seconds


async def cancel_and_wait(
    tasks: Collection[asyncio.Future[Any]], grace: float = CANCELLED_GRACE
) -> set[asyncio.Future[Any]]:
    """Cancel the tasks and wait for them `grace` seconds at most. Those still running then (they ignored
    their cancellation) are left to run, and returned; what any of them raises is not reported."""
    if not tasks:
        return set()
    for task in tasks:
        task.cancel()
    done, pending = await asyncio.wait(tasks, timeout=grace)
    for task in (*done, *pending):
        task.add_done_callback(_retrieved)
    return pending


def _retrieved(task: asyncio.Future[Any]) -> None:
    # Read, or asyncio logs "exception was never retrieved" for a task given up on.
    if not task.cancelled():
        task.exception()
