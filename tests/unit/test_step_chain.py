"""The click join's step chain (streams/join.py, ``StepChain``, ``Unwritten``): steps are
computed in submission order while earlier ones wait for their acks, written in the same
order each after its own acks, off the submitter's path, never across a rebalance or a
failure; a later step reads what an earlier one has not written yet."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any

import pytest

from streams.join import Prepared, StepChain, Unwritten, durable


async def _turns(n: int = 20) -> None:
    """Let every ready task run ``n`` loop turns: an order, never a duration."""
    for _ in range(n):
        await asyncio.sleep(0)


def _acked() -> asyncio.Future[None]:
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done


def _step(log: list[str], name: str, ack: Awaitable[Any]) -> Any:
    """A step whose labels are acknowledged when ``ack`` completes."""

    async def compute() -> Prepared:
        log.append(f"{name} computes")

        async def commit() -> list[Awaitable[Any]]:
            log.append(f"{name} writes")
            return []

        return [ack], commit

    return compute


def test_steps_compute_while_earlier_acks_wait_and_write_in_order() -> None:
    async def main() -> list[str]:
        log: list[str] = []
        chain = StepChain(lambda: 1)
        first_ack, second_ack = asyncio.Event(), asyncio.Event()
        done = [durable(chain.submit(_step(log, "a", first_ack.wait()))),
                durable(chain.submit(_step(log, "b", second_ack.wait())))]  # fmt: skip
        log.append("submitter goes on")
        second_ack.set()  # b's ack comes first; b still waits for a to write
        await _turns()
        log.append("a acked")
        first_ack.set()
        await asyncio.gather(*done)
        return log

    assert asyncio.run(main()) == [
        "submitter goes on", "a computes", "b computes", "a acked", "a writes", "b writes",
    ]  # fmt: skip


def test_a_step_submitted_before_a_rebalance_is_dropped_unrun() -> None:
    async def main() -> tuple[list[str], list[Awaitable[Any]]]:
        log: list[str] = []
        gen = [1]
        chain = StepChain(lambda: gen[0])
        task = chain.submit(_step(log, "old", _acked()))
        gen[0] = 2  # the consumer rebalanced before the step ran
        got = await task
        await durable(chain.submit(_step(log, "new", _acked())))
        return log, got

    log, got = asyncio.run(main())
    assert got == []
    assert log == ["new computes", "new writes"]


def test_the_first_step_of_a_new_generation_computes_after_every_earlier_write() -> None:
    async def main() -> list[str]:
        log: list[str] = []
        gen = [1]
        chain = StepChain(lambda: gen[0])
        ack = asyncio.Event()
        old = chain.submit(_step(log, "old", ack.wait()))
        await _turns()  # old computed, waiting for its ack
        gen[0] = 2
        new = chain.submit(_step(log, "new", _acked()))
        await _turns()
        log.append("old acked")
        ack.set()
        await asyncio.gather(durable(old), durable(new))
        return log

    assert asyncio.run(main()) == [
        "old computes", "old acked", "old writes", "new computes", "new writes",
    ]  # fmt: skip


def test_after_a_failed_step_every_later_one_fails_unwritten() -> None:
    async def main() -> list[str]:
        log: list[str] = []
        chain = StepChain(lambda: 1)

        async def broken() -> Prepared:
            msg = "the broker refused the labels"
            raise OSError(msg)

        first = chain.submit(broken)
        later = chain.submit(_step(log, "later", _acked()))
        with pytest.raises(OSError, match="refused"):
            await durable(first)
        with pytest.raises(RuntimeError, match="earlier step of the click join failed"):
            await durable(later)
        return log

    assert asyncio.run(main()) == []


def test_a_failed_ack_writes_neither_its_step_nor_any_later_one() -> None:
    async def main() -> list[str]:
        log: list[str] = []
        chain = StepChain(lambda: 1)
        refused: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        first = chain.submit(_step(log, "a", refused))
        later = chain.submit(_step(log, "b", _acked()))
        refused.set_exception(OSError("the broker refused the labels"))
        with pytest.raises(OSError, match="refused"):
            await durable(first)
        with pytest.raises(RuntimeError, match="earlier step of the click join failed"):
            await durable(later)
        return log

    assert asyncio.run(main()) == ["a computes", "b computes"]


def test_drained_waits_for_every_step_submitted_so_far_to_write() -> None:
    async def main() -> list[str]:
        log: list[str] = []
        chain = StepChain(lambda: 1)
        await chain.drained()  # nothing submitted: returns at once
        gate = asyncio.Event()
        chain.submit(_step(log, "a", gate.wait()))
        chain.submit(_step(log, "b", gate.wait()))
        asyncio.get_running_loop().call_soon(gate.set)
        await chain.drained()
        log.append("drained")
        return log

    assert asyncio.run(main()) == ["a computes", "b computes", "a writes", "b writes", "drained"]


def test_unwritten_records_are_read_before_the_table_until_their_step_writes() -> None:
    table = {(0, b"k1"): b"old1", (0, b"k2"): b"old2"}

    def load(keys: Sequence[bytes], parts: Sequence[int]) -> list[bytes | None]:
        return [table.get((p, k)) for k, p in zip(keys, parts, strict=True)]

    async def main() -> None:
        unwritten = Unwritten()
        read = unwritten.over(load)
        await unwritten.empty()  # nothing given: returns at once
        first = unwritten.put(0, [(b"k1", b"new1"), (b"k2", None)])
        assert read([b"k1", b"k2", b"k1"], [0, 0, 1]) == [b"new1", None, None]
        second = unwritten.put(0, [(b"k1", b"newer1")])  # a later step changes k1 again
        table[(0, b"k1")] = b"new1"  # the first step writes
        table.pop((0, b"k2"))
        unwritten.written(0, [(b"k1", b"new1"), (b"k2", None)], first)
        assert read([b"k1", b"k2"], [0, 0]) == [b"newer1", None]  # the later value stays
        waiter = asyncio.ensure_future(unwritten.empty())
        await _turns()
        assert not waiter.done()
        table[(0, b"k1")] = b"newer1"
        unwritten.written(0, [(b"k1", b"newer1")], second)
        await _turns()
        assert waiter.done()
        assert len(unwritten) == 0
        assert read([b"k1"], [0]) == [b"newer1"]

    asyncio.run(main())
