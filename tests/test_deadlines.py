"""The delivery engine's attempt timeouts: one timer for every running attempt (gateway.delivery.Deadlines)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.actions import Outcome, delivered
from gateway.config import DeliveryEngine
from gateway.delivery import LATENESS, Deadlines, Engine
from gateway.metrics import Metrics
from gateway.plugins import new_plugin_manager


def job(timeout: float) -> Any:
    """What Deadlines reads of a job: its timeout (and its names, to log one that does not stop)."""
    return SimpleNamespace(timeout=timeout)


def cancelled_by(loop: asyncio.AbstractEventLoop, when: float, tasks: list[asyncio.Task[Any]]) -> Any:
    """A future that says, at `when` on the loop's clock, whether each of `tasks` has been cancelled by then.
    Its timer runs after every timer due before it, however late a busy machine runs them all: the bound
    is checked on the loop's clock, not on the time the test took."""
    seen = loop.create_future()
    loop.call_at(when + 0.001, lambda: seen.set_result([task.cancelling() > 0 for task in tasks]))
    return seen


def test_an_attempt_past_its_deadline_is_cancelled_after_it_and_at_most_a_tenth_of_its_timeout_later() -> (
    None
):
    async def scenario() -> tuple[float, int, list[bool]]:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines()
        task = asyncio.create_task(asyncio.sleep(10))
        started = time.monotonic()
        deadlines.start(task, SlowAction(10), job(0.3))
        latest = cancelled_by(loop, loop.time() + 0.3 * (1 + LATENESS), [task])
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - started, deadlines.finish(task), await latest

    took, late, in_time = asyncio.run(scenario())
    assert late == 1
    assert took >= 0.3
    assert in_time == [True]


def test_attempts_that_finish_in_time_are_left_alone_and_the_others_are_cut_off() -> None:
    async def scenario() -> tuple[list[int], list[int], list[bool]]:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines()
        quick = [asyncio.create_task(asyncio.sleep(0.05)) for _ in range(20)]
        slow = [asyncio.create_task(asyncio.sleep(10)) for _ in range(20)]
        for task in quick + slow:
            deadlines.start(task, SlowAction(10), job(0.3))
        latest = cancelled_by(loop, loop.time() + 0.3 * (1 + LATENESS), slow)
        await asyncio.gather(*quick)
        quick_late = [deadlines.finish(task) for task in quick]
        await asyncio.gather(*slow, return_exceptions=True)
        slow_late = [task.cancelled() and deadlines.finish(task) for task in slow]
        return quick_late, slow_late, await latest

    quick_late, slow_late, in_time = asyncio.run(scenario())
    assert quick_late == [0] * 20
    assert slow_late == [1] * 20
    assert in_time == [True] * 20


class SlowAction:
    """Sleeps; when cancelled, lets it through (raise), ignores it (swallow) or makes it an error (convert)."""

    def __init__(self, seconds: float, on_cancel: str = "raise") -> None:
        self.seconds, self.on_cancel = seconds, on_cancel

    async def deliver(self, job: Any) -> Outcome:
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            if self.on_cancel == "convert":
                raise RuntimeError("interrupted") from None
            if self.on_cancel == "raise":
                raise
        return delivered(200)


def attempt(action: SlowAction, timeout: float, cancel_after: float | None = None) -> Any:
    """Runs Engine._attempt in a task of its own; cancels that task from outside after `cancel_after`."""

    async def scenario() -> Any:
        engine = Engine(None, {}, DeliveryEngine(), Metrics(), new_plugin_manager(load_entry_points=False))  # type: ignore[arg-type]
        job = SimpleNamespace(timeout=timeout, action="app", event=SimpleNamespace(summary=dict))
        task = asyncio.create_task(engine._attempt(action, job))  # type: ignore[arg-type]
        if cancel_after is not None:
            await asyncio.sleep(cancel_after)
            task.cancel()
        try:
            return await task, task.cancelling()
        except asyncio.CancelledError:
            return "cancelled", task.cancelling()

    return asyncio.run(scenario())


def test_an_attempt_that_runs_late_is_retried_as_a_timeout() -> None:
    outcome, cancelling = attempt(SlowAction(10), timeout=0.1)
    assert (outcome.kind, outcome.error, cancelling) == ("retry", "timeout after 0.1s", 0)


def test_a_cancellation_from_outside_is_not_taken_for_a_timeout() -> None:
    # The engine cancels running attempts at shutdown: that must reach the task, not become a retry.
    assert attempt(SlowAction(10), timeout=5, cancel_after=0.05)[0] == "cancelled"


def test_an_action_that_finishes_although_cancelled_late_keeps_its_outcome_and_the_task_is_not_left_cancelling() -> (
    None
):
    outcome, cancelling = attempt(SlowAction(0.5, on_cancel="swallow"), timeout=0.1)
    assert (outcome.kind, cancelling) == ("delivered", 0)


def test_an_action_that_turns_a_late_cancellation_into_an_error_is_retried_for_that_error() -> None:
    outcome, cancelling = attempt(SlowAction(0.5, on_cancel="convert"), timeout=0.1)
    assert (outcome.kind, outcome.error, cancelling) == ("retry", "RuntimeError: interrupted", 0)
