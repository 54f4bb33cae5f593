"""The reconciler's work queue: coalescing, priorities, one worker per key, delayed adds and
backoff.  Time is the event loop's virtual clock (tests.unit.looptime): nothing waits for real."""

from __future__ import annotations

import asyncio

import pytest

from finetune_operator.workqueue import WorkQueue
from tests.unit.looptime import run


def no_jitter() -> float:
    return 1.0


async def drain(queue: WorkQueue[str]) -> list[str]:
    """The keys waiting now, in the order workers get them (each marked done at once)."""
    taken = []
    while len(queue):
        key = await queue.get()
        queue.done(key)
        taken.append(key)
    return taken


async def next_key(queue: WorkQueue[str], *, within: float) -> tuple[str, float]:
    """The next key a worker gets, and when (on the loop's clock); fails after ``within`` s."""
    loop = asyncio.get_running_loop()
    key = await asyncio.wait_for(queue.get(), timeout=within)
    return key, loop.time()


def test_adding_a_waiting_key_again_coalesces() -> None:
    async def main() -> list[str]:
        queue: WorkQueue[str] = WorkQueue()
        for key in ["a", "b", "a", "a", "c", "b"]:
            queue.add(key)
        assert len(queue) == 3
        return await drain(queue)

    assert run(main()) == ["a", "b", "c"]


def test_urgent_keys_go_first_and_each_priority_in_order_of_adding() -> None:
    urgent = {"new-1", "new-2"}

    async def main() -> list[str]:
        queue: WorkQueue[str] = WorkQueue(priority=lambda key: 0 if key in urgent else 1)
        for key in ["old-1", "new-1", "old-2", "new-2", "old-3"]:
            queue.add(key)
        assert queue.waiting(priority=0) == 2
        assert queue.waiting(priority=1) == 5
        return await drain(queue)

    assert run(main()) == ["new-1", "new-2", "old-1", "old-2", "old-3"]


def test_a_waiting_key_that_becomes_urgent_moves_up_once() -> None:
    urgent: set[str] = set()

    async def main() -> list[str]:
        queue: WorkQueue[str] = WorkQueue(priority=lambda key: 0 if key in urgent else 1)
        for key in ["a", "b", "c"]:
            queue.add(key)
        urgent.add("c")
        queue.add("c")
        assert len(queue) == 3
        assert queue.waiting(priority=0) == 1
        return await drain(queue)

    assert run(main()) == ["c", "a", "b"]


def test_a_key_added_while_a_worker_holds_it_comes_back_after_done_never_to_a_second_worker() -> None:
    async def main() -> None:
        queue: WorkQueue[str] = WorkQueue()
        queue.add("a")
        first = await queue.get()
        assert first == "a" and queue.is_processing("a")
        queue.add("a")
        queue.add("a")
        queue.add("b")
        # Another worker gets the other key, not the one being processed.
        assert await queue.get() == "b"
        queue.done("b")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(queue.get(), timeout=10)
        queue.done("a")
        # Added (three times) while held: processed once more, after.
        assert await drain(queue) == ["a"]
        assert not queue.is_processing("a")

    run(main())


def test_a_key_not_added_while_held_does_not_come_back() -> None:
    async def main() -> None:
        queue: WorkQueue[str] = WorkQueue()
        queue.add("a")
        key = await queue.get()
        queue.done(key)
        assert len(queue) == 0
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(queue.get(), timeout=3600)

    run(main())


def test_workers_each_get_one_key_and_two_never_hold_the_same_one() -> None:
    async def main() -> list[str]:
        queue: WorkQueue[str] = WorkQueue()
        held: set[str] = set()
        done: list[str] = []

        async def worker() -> None:
            while True:
                key = await queue.get()
                assert key not in held
                held.add(key)
                await asyncio.sleep(1)
                held.discard(key)
                done.append(key)
                queue.done(key)

        workers = [asyncio.create_task(worker()) for _ in range(4)]
        for key in ["a", "b", "a", "c"]:
            queue.add(key)
            await asyncio.sleep(0)
        await asyncio.sleep(0.5)
        queue.add("a")  # while a worker holds it
        await asyncio.sleep(10)
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        return done

    done = run(main())
    assert sorted(done) == ["a", "a", "b", "c"]


def test_a_delayed_add_arrives_when_due_not_before() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue: WorkQueue[str] = WorkQueue()
        start = loop.time()
        queue.add("a", delay=5)
        assert len(queue) == 0 and queue.due("a") == start + 5
        key, when = await next_key(queue, within=60)
        assert key == "a" and when == pytest.approx(start + 5)
        assert queue.due("a") is None

    run(main())


def test_of_several_delayed_adds_of_a_key_the_earliest_wins_and_it_comes_once() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue: WorkQueue[str] = WorkQueue()
        start = loop.time()
        queue.add("a", delay=30)
        queue.add("a", delay=2)
        queue.add("a", delay=10)
        key, when = await next_key(queue, within=60)
        assert key == "a" and when == pytest.approx(start + 2)
        queue.done(key)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(queue.get(), timeout=3600)

    run(main())


def test_a_delayed_add_due_while_the_key_is_held_comes_after_done() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue: WorkQueue[str] = WorkQueue()
        queue.add("a")
        key = await queue.get()
        queue.add(key, delay=1)
        await asyncio.sleep(5)
        assert len(queue) == 0
        queue.done(key)
        assert (await next_key(queue, within=0.001))[0] == "a"
        assert loop.time() == pytest.approx(5)

    run(main())


def test_a_delayed_add_of_a_key_that_already_waits_coalesces() -> None:
    async def main() -> list[str]:
        queue: WorkQueue[str] = WorkQueue()
        queue.add("a")
        queue.add("a", delay=1)
        await asyncio.sleep(2)
        return await drain(queue)

    assert run(main()) == ["a"]


def test_backoff_doubles_with_each_failure_up_to_the_limit_and_forget_starts_it_again() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue: WorkQueue[str] = WorkQueue(base_delay=0.5, max_delay=60, jitter=no_jitter)
        pauses = []
        queue.add("a")
        for _ in range(9):
            key = await queue.get()
            failed_at = loop.time()
            pauses.append(queue.retry(key))
            queue.done(key)
            _, when = await next_key(queue, within=120)
            assert when - failed_at == pytest.approx(pauses[-1])
            queue.done("a")
            queue.add("a")
        assert pauses == [1, 2, 4, 8, 16, 32, 60, 60, 60]
        assert queue.failures("a") == 9
        queue.forget("a")
        assert queue.failures("a") == 0
        assert queue.retry("a") == 1

    run(main())


def test_backoff_is_per_key() -> None:
    async def main() -> None:
        queue: WorkQueue[str] = WorkQueue(base_delay=0.5, jitter=no_jitter)
        for _ in range(3):
            queue.retry("flaky")
        assert queue.retry("flaky") == 8
        assert queue.retry("other") == 1
        queue.close()

    run(main())


def test_jitter_spreads_the_pause() -> None:
    async def main() -> tuple[float, float]:
        low: WorkQueue[str] = WorkQueue(base_delay=0.5, jitter=lambda: 0.8)
        high: WorkQueue[str] = WorkQueue(base_delay=0.5, jitter=lambda: 1.2)
        pauses = low.retry("a"), high.retry("a")
        low.close()
        high.close()
        return pauses

    assert run(main()) == pytest.approx((0.8, 1.2))


def test_close_cancels_the_delayed_adds() -> None:
    async def main() -> None:
        queue: WorkQueue[str] = WorkQueue()
        queue.add("a", delay=1)
        queue.close()
        assert queue.due("a") is None
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(queue.get(), timeout=60)

    run(main())
