"""The actor runtime: bounded mailboxes, replies, and supervision with restarts."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from p2pspec.net.actors import Mailbox, Reply, supervise


async def test_a_full_mailbox_turns_offers_away_and_counts_them() -> None:
    box: Mailbox[int] = Mailbox(2)
    assert box.offer(1) and box.offer(2)
    assert not box.offer(3)
    assert (box.queued, box.refused) == (2, 1)
    assert [await box.receive(), await box.receive()] == [1, 2]
    assert box.offer(4)


async def test_send_waits_for_room_instead_of_growing_the_queue() -> None:
    box: Mailbox[int] = Mailbox(1)
    await box.send(1)
    with trio.move_on_after(0.05) as waited:
        await box.send(2)
    assert waited.cancelled_caught and box.queued == 1


def test_a_mailbox_holds_at_least_one_message() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Mailbox(0)


async def test_a_reply_carries_a_value_or_raises_the_actors_error() -> None:
    ok: Reply[int] = Reply()
    ok.answer(7)
    ok.answer(8)  # a second answer is dropped, not an error
    assert await ok.wait() == 7
    failed: Reply[int] = Reply()
    failed.answer(LookupError("no such peer"))
    with pytest.raises(LookupError, match="no such peer"):
        await failed.wait()


async def test_a_crashing_actor_is_restarted_with_its_mailbox_and_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    box: Mailbox[str] = Mailbox(4)
    handled: list[str] = []
    starts: list[float] = []

    async def actor() -> None:
        starts.append(trio.current_time())
        while True:
            message = await box.receive()
            if message == "crash":
                raise RuntimeError("a bug in the actor")
            handled.append(message)

    async with trio.open_nursery() as nursery:
        await nursery.start(supervise, "test", actor)
        for message in ["a", "crash", "b", "crash", "c"]:
            await box.send(message)
        while handled != ["a", "b", "c"]:
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    # Restarted twice, the second time after twice the delay: queued messages survived.
    assert len(starts) == 3
    first, second = starts[1] - starts[0], starts[2] - starts[1]
    assert first == pytest.approx(0.2, abs=0.02) and second == pytest.approx(0.4, abs=0.02)


async def test_cancelling_the_nursery_ends_a_supervised_actor_without_a_restart() -> None:
    starts = 0

    async def actor() -> None:
        nonlocal starts
        starts += 1
        await trio.sleep_forever()

    with trio.move_on_after(0.1):
        async with trio.open_nursery() as nursery:
            await nursery.start(supervise, "test", actor)
    assert starts == 1
