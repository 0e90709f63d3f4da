import asyncio

import pytest

from services.common.admission import Admission
from services.common.errors import OverloadedError


def test_slots_then_queue_then_refusal():
    async def scenario():
        admission = Admission(slots=1, queue=1)
        first, second = admission.reserve(), admission.reserve()
        with pytest.raises(OverloadedError, match="capacity"):
            admission.reserve()
        async with first:
            waiter = asyncio.create_task(second.__aenter__())
            await asyncio.sleep(0)
            assert not waiter.done() and admission.waiting == 1
        await waiter
        assert admission.running == 1
        await second.__aexit__(None, None, None)
        assert admission.reserved == 0 and admission.running == 0
    asyncio.run(scenario())


def test_a_cancelled_waiter_gives_its_place_back():
    async def scenario():
        admission = Admission(slots=1, queue=1)
        holder = admission.reserve()
        await holder.__aenter__()
        ticket = admission.reserve()

        async def wait():
            try:
                async with ticket:
                    pass
            finally:
                ticket.release()
        task = asyncio.create_task(wait())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert admission.reserved == 1
        holder.release()
        assert admission.reserved == 0
        admission.reserve().release()
    asyncio.run(scenario())
