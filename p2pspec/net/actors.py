"""Actors: trio tasks that own their state and take work from a bounded mailbox.

design.md's runtime is a handful of actors (Directory, Prober, Scheduler, Session,
VerifierWorker, DraftWorker). Each is a task in its peer's nursery with:

- a `Mailbox`: a bounded memory channel with one receiver, the actor. Senders either
  wait for room (`send`, backpressure) or are turned away at once (`offer`, for work that
  a later message repeats, such as a directory merge); nothing grows without bound;
- `supervise`: an actor that raises is logged with its traceback and restarted after a
  backoff (doubling up to `max_backoff_s`, reset after it has run `healthy_after_s`), so a
  bug in one actor degrades the peer instead of killing it. Its mailbox, and what is
  queued in it, outlive the restart. Cancellation is never caught: when the nursery ends,
  the actor ends with it and leaves no task behind.

Model work (a forward pass) blocks: actors run it through `offload`, in a worker thread,
so the peer keeps serving its streams meanwhile. Tests that run peers on trio's MockClock
set `INLINE_COMPUTE` so it runs inline: a thread's work looks idle to an autojumping
clock, which would fire every deadline while a tiny model computes.

Request/reply is a message carrying a one-slot reply channel (`Reply`); the actor answers
every request it takes, an error included, so a caller never waits on a crashed actor
beyond its own deadline.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Generic, TypeVar

import structlog
import trio

__all__ = ["INLINE_COMPUTE", "Mailbox", "Reply", "offload", "supervise"]

log = structlog.get_logger("p2pspec.net.actors")

T = TypeVar("T")
R = TypeVar("R")

INLINE_COMPUTE: ContextVar[bool] = ContextVar("p2pspec_inline_compute", default=False)
"""True: `offload` runs its function on the trio thread (fake-clock tests only)."""


async def offload(fn: Callable[..., R], *args: object) -> R:
    """`fn(*args)` in a worker thread (inline where INLINE_COMPUTE is set). As with
    `trio.to_thread.run_sync`, a cancelled caller still waits for the thread to finish."""
    if INLINE_COMPUTE.get():
        await trio.lowlevel.checkpoint()
        return fn(*args)
    return await trio.to_thread.run_sync(fn, *args)


class Mailbox(Generic[T]):
    """A bounded queue of messages for one actor."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a mailbox holds at least one message")
        self.size = size
        self._in, self._out = trio.open_memory_channel[T](size)
        self.refused = 0  # messages `offer` turned away because the mailbox was full

    async def send(self, message: T) -> None:
        """Queue `message`, waiting while the mailbox is full."""
        await self._in.send(message)

    def offer(self, message: T) -> bool:
        """Queue `message` if there is room; False (and counted) if the mailbox is full."""
        try:
            self._in.send_nowait(message)
        except trio.WouldBlock:
            self.refused += 1
            return False
        return True

    async def receive(self) -> T:
        """The next message (the owner's side)."""
        return await self._out.receive()

    def receive_nowait(self) -> T:
        """The next message if one is queued, else trio.WouldBlock."""
        return self._out.receive_nowait()

    @property
    def queued(self) -> int:
        return self._out.statistics().current_buffer_used


class Reply(Generic[R]):
    """The answer slot of one request: the actor `answer`s (a value or an exception), the
    caller `wait`s for it. Answering a caller that has given up is harmless."""

    def __init__(self) -> None:
        self._in, self._out = trio.open_memory_channel[R | BaseException](1)

    def answer(self, value: R | BaseException) -> None:
        try:
            self._in.send_nowait(value)
        except (trio.WouldBlock, trio.BrokenResourceError):
            log.debug("reply_dropped")  # answered twice, or the caller left

    async def wait(self) -> R:
        value = await self._out.receive()
        if isinstance(value, BaseException):
            raise value
        return value


async def supervise(
    name: str,
    actor: Callable[[], Awaitable[None]],
    *,
    backoff_s: float = 0.2,
    max_backoff_s: float = 10.0,
    healthy_after_s: float = 30.0,
    # trio-stubs (installed by libp2p via trio-typing) predate trio.TaskStatus.
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,  # type: ignore[name-defined, unused-ignore]
) -> None:
    """Run `actor()` until cancelled, restarting it whenever it raises or returns.

    Started at once (`nursery.start(supervise, ...)` returns immediately). Restarts are
    logged as `actor_restarting` with the error and the delay before the next start.
    """
    task_status.started()
    delay = backoff_s
    while True:
        began = trio.current_time()
        try:
            await actor()
            error: str = "returned"
        except Exception as e:  # supervision: log it with its traceback, then restart
            log.exception("actor_failed", actor=name)
            error = repr(e)
        if trio.current_time() - began >= healthy_after_s:
            delay = backoff_s  # it ran well for a while: this is a new failure, not a loop
        log.warning("actor_restarting", actor=name, error=error, after_s=round(delay, 3))
        await trio.sleep(delay)
        delay = min(delay * 2, max_backoff_s)
