"""The click join's step chain (streams/join.py, ``StepChain``): its steps run in the order
they were submitted, off the submitter's path, and never across a rebalance or a failure."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import pytest

from streams.join import StepChain, durable


async def _turns(n: int = 20) -> None:
    """Let every ready task run ``n`` loop turns: an order, never a duration."""
    for _ in range(n):
        await asyncio.sleep(0)


def _step(log: list[str], name: str, gate: asyncio.Event) -> Any:
    async def run() -> list[Awaitable[Any]]:
        log.append(f"{name} starts")
        await gate.wait()  # a label ack that takes its time
        log.append(f"{name} writes")
        return []

    return run


def test_steps_run_in_submission_order_and_the_submitter_never_waits_for_them() -> None:
    async def main() -> list[str]:
        log: list[str] = []
        chain = StepChain(lambda: 1)
        first_ack, second_ack = asyncio.Event(), asyncio.Event()
        done = [durable(chain.submit(_step(log, "a", first_ack))),
                durable(chain.submit(_step(log, "b", second_ack)))]  # fmt: skip
        log.append("submitter goes on")
        second_ack.set()  # b's ack comes first; b still waits for a to write
        await _turns()
        log.append("a acked")
        first_ack.set()
        await asyncio.gather(*done)
        return log

    assert asyncio.run(main()) == [
        "submitter goes on", "a starts", "a acked", "a writes", "b starts", "b writes",
    ]  # fmt: skip


def test_a_step_submitted_before_a_rebalance_is_dropped_unrun() -> None:
    async def main() -> tuple[list[str], list[Awaitable[Any]]]:
        log: list[str] = []
        gen = [1]
        chain = StepChain(lambda: gen[0])
        gate = asyncio.Event()
        gate.set()
        task = chain.submit(_step(log, "old", gate))
        gen[0] = 2  # the consumer rebalanced before the step ran
        got = await task
        await durable(chain.submit(_step(log, "new", gate)))
        return log, got

    log, got = asyncio.run(main())
    assert got == []
    assert log == ["new starts", "new writes"]


def test_after_a_failed_step_every_later_one_fails_unrun() -> None:
    async def main() -> list[str]:
        log: list[str] = []
        chain = StepChain(lambda: 1)

        async def broken() -> list[Awaitable[Any]]:
            msg = "the broker refused the labels"
            raise OSError(msg)

        gate = asyncio.Event()
        gate.set()
        first = chain.submit(broken)
        later = chain.submit(_step(log, "later", gate))
        with pytest.raises(OSError, match="refused"):
            await durable(first)
        with pytest.raises(RuntimeError, match="earlier step of the click join failed"):
            await durable(later)
        return log

    assert asyncio.run(main()) == []


def test_drained_waits_for_every_step_submitted_so_far() -> None:
    async def main() -> list[str]:
        log: list[str] = []
        chain = StepChain(lambda: 1)
        await chain.drained()  # nothing submitted: returns at once
        gate = asyncio.Event()
        chain.submit(_step(log, "a", gate))
        chain.submit(_step(log, "b", gate))
        asyncio.get_running_loop().call_soon(gate.set)
        await chain.drained()
        log.append("drained")
        return log

    assert asyncio.run(main()) == ["a starts", "a writes", "b starts", "b writes", "drained"]
