"""An action's `concurrency`: at most so many of its deliveries run at once, a config reload included."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from types import TracebackType


class ConcurrencyLimit:
    """asyncio.Semaphore, but with a size that can change while deliveries hold it.

    A reload builds the actions anew. Were each build to get a fresh semaphore, the deliveries started
    before the reload would count against the old one only, and up to twice the limit could run at once
    for as long as they last. The engine hands the still-configured action's limit on instead, resized to
    its new `concurrency` (see Engine.swap_actions); waiters are woken in the order they came."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.held = 0
        # The action's deliveries the engine has taken on and not finished: leased (by a claim, or at
        # ingest), waiting here or running. It takes on no more than `size` (room): one more would wait
        # here, holding one of the engine's slots that every other action's deliveries wait for.
        self.taken = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def room(self) -> int:
        return self.size - self.taken

    async def __aenter__(self) -> None:
        if self.held < self.size and not self._waiters:
            self.held += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # woken with a slot already counted as ours (_wake)
        except asyncio.CancelledError:
            if waiter.cancelled():
                with contextlib.suppress(ValueError):  # _wake may have dropped it already
                    self._waiters.remove(waiter)
            else:
                self._release()  # woken, then cancelled before it ran: the slot goes to the next one
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._release()

    def resize(self, size: int) -> None:
        """Deliveries holding a slot keep it; a larger size lets waiters in at once."""
        self.size = size
        self._wake()

    def _release(self) -> None:
        self.held -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.held < self.size:
            waiter = self._waiters.popleft()
            if not waiter.done():  # not cancelled meanwhile
                self.held += 1
                waiter.set_result(None)
