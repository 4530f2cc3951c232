"""PartitionLocks: a read-modify-write that awaits between partitions keeps its turn."""

from __future__ import annotations

import asyncio

from streams.runtime.tablewriter import PartitionLocks


def test_a_writer_in_the_middle_of_its_partitions_is_not_overtaken_on_a_later_one() -> None:
    """The forget race in miniature: the batch read user u (partition 2) before the forget,
    sends partition 0 first and waits; the forget must not reach partition 2 first."""
    log: dict[int, list[str]] = {0: [], 2: []}

    async def batch(locks: PartitionLocks, started: asyncio.Event) -> None:
        async with locks.hold([2, 0]):
            started.set()
            log[0].append("batch")
            await asyncio.sleep(0.01)  # the producer wait between partitions
            log[2].append("batch")

    async def forget(locks: PartitionLocks, started: asyncio.Event) -> None:
        await started.wait()
        async with locks.hold([2]):
            log[2].append("tombstone")

    async def main() -> None:
        locks, started = PartitionLocks(), asyncio.Event()
        await asyncio.gather(batch(locks, started), forget(locks, started))

    asyncio.run(main())
    assert log[2] == ["batch", "tombstone"]


def test_holders_of_overlapping_partitions_in_any_order_do_not_deadlock() -> None:
    async def holder(locks: PartitionLocks, parts: list[int], done: list[int]) -> None:
        for _ in range(50):
            async with locks.hold(parts):
                await asyncio.sleep(0)
        done.append(1)

    async def main() -> int:
        locks, done = PartitionLocks(), []
        await asyncio.wait_for(
            asyncio.gather(*(holder(locks, p, done) for p in ([0, 1], [1, 0], [1], [2, 1, 0]))),
            timeout=30,  # a bound on a deadlock, not a speed claim
        )
        return len(done)

    assert asyncio.run(main()) == 4
