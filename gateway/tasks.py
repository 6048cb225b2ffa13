"""Giving up on tasks and threads at shutdown. A stop cancels what runs past its bound; plugin code may catch
that cancellation and go on (a retry loop around `except BaseException`, or one that catches CancelledError),
and awaiting it then would hold up the stop for ever. So a cancelled task is waited for a moment only, then left
running: it ends with the process. Blocking work (a file on a disk that stopped answering) runs on daemon
threads, which the process does not wait for at exit either."""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
from collections.abc import Callable, Collection
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

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


async def wait_unless_hurried(
    futures: Collection[asyncio.Future[Any]], timeout: float, hurried: asyncio.Event | None
) -> None:
    """Until every one of futures is done, for timeout seconds at most, or until `hurried` is set (a
    shutdown cut short by a second signal): then as if the time were up. What is waited for is left running."""
    if not futures:
        return
    if hurried is None or hurried.is_set():
        # Hurried already: no wait, but what was just started still gets its first step, as at a timeout.
        await asyncio.wait(futures, timeout=timeout if hurried is None else 0)
        return
    all_done = asyncio.ensure_future(asyncio.wait(futures))
    hurry = asyncio.ensure_future(hurried.wait())
    try:
        await asyncio.wait([all_done, hurry], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Cancelling a wait leaves what it waits for running.
        await cancel_and_wait([all_done, hurry])


def _retrieved(task: asyncio.Future[Any]) -> None:
    # Read, or asyncio logs "exception was never retrieved" for a task given up on.
    if not task.cancelled():
        task.exception()


class DaemonThread(Executor):
    """One thread that runs what it is given in turn, as ThreadPoolExecutor(1) does, but a daemon: a
    ThreadPoolExecutor's threads are joined when the interpreter exits, so one stuck on a disk that stopped
    answering (in a checkpoint's fsync, that of closing the last connection, or a read) would keep the
    process from ever exiting."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        self._shut = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        if self._shut:
            raise RuntimeError("cannot schedule new futures after shutdown")
        future: Future[T] = Future()
        self._calls.put((future, functools.partial(fn, *args, **kwargs)))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """The thread ends once it has run what it was given before."""
        self._shut = True
        self._calls.put(None)
        if wait:
            self._thread.join()

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            future, function = call
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function())
                except BaseException as exc:
                    future.set_exception(exc)
