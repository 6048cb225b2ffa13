"""ConcurrencyLimit: an action's `concurrency`, which a reload resizes while deliveries hold it."""

from __future__ import annotations

import asyncio

import pytest

from gateway.limits import ConcurrencyLimit


async def hold(limit: ConcurrencyLimit, name: str, log: list[str], release: asyncio.Event) -> None:
    async with limit:
        log.append(name)
        await release.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_at_most_size_hold_it_and_waiters_go_in_the_order_they_came() -> None:
    async def scenario() -> list[list[str]]:
        limit, log, releases = ConcurrencyLimit(2), [], {n: asyncio.Event() for n in "abcd"}
        tasks = [asyncio.create_task(hold(limit, n, log, releases[n])) for n in "abcd"]
        await settle()
        seen = [list(log)]
        releases["b"].set()
        await settle()
        seen.append(list(log))
        for event in releases.values():
            event.set()
        await asyncio.gather(*tasks)
        seen.append([str(limit.held)])
        return seen

    assert asyncio.run(scenario()) == [["a", "b"], ["a", "b", "c"], ["0"]]


def test_resize_keeps_holders_and_lets_waiters_in_only_below_the_new_size() -> None:
    async def scenario() -> list[list[str]]:
        limit, log, releases = ConcurrencyLimit(2), [], {n: asyncio.Event() for n in "abcde"}
        tasks = [asyncio.create_task(hold(limit, n, log, releases[n])) for n in "abcde"]
        await settle()
        limit.resize(1)  # a and b hold on; c waits until only none is held
        releases["a"].set()
        await settle()
        seen = [list(log)]
        releases["b"].set()
        await settle()
        seen.append(list(log))
        limit.resize(3)  # c holds; d and e come in at once
        await settle()
        seen.append(list(log))
        for event in releases.values():
            event.set()
        await asyncio.gather(*tasks)
        return seen

    assert asyncio.run(scenario()) == [["a", "b"], ["a", "b", "c"], ["a", "b", "c", "d", "e"]]


@pytest.mark.parametrize("woken_first", [False, True])
def test_a_cancelled_waiter_leaves_no_slot_taken(woken_first: bool) -> None:
    async def scenario() -> tuple[list[str], int]:
        limit, log, releases = ConcurrencyLimit(1), [], {n: asyncio.Event() for n in "bc"}
        await limit.__aenter__()  # this task holds the one slot
        cancelled = asyncio.create_task(hold(limit, "b", log, releases["b"]))
        last = asyncio.create_task(hold(limit, "c", log, releases["c"]))
        await settle()
        if woken_first:
            await limit.__aexit__(None, None, None)  # b is handed the slot ...
            cancelled.cancel()  # ... and cancelled before it runs
        else:
            cancelled.cancel()
            await settle()
            await limit.__aexit__(None, None, None)
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await settle()
        releases["c"].set()
        await asyncio.wait_for(last, 2)  # c has the slot: nothing holds it for a cancelled b
        return log, limit.held

    assert asyncio.run(scenario()) == (["c"], 0)
