"""DelayProxy on loopback: delay accuracy, integrity, cut and heal, clean cancellation."""

from __future__ import annotations

import functools
import hashlib
import os
import statistics
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from p2pspec.tools.delayproxy import DelayProxy

STEP_TIMEOUT_S = 10.0  # deadline of any single step of these tests


async def _echo(stream: trio.SocketStream) -> None:
    """Send back whatever arrives until the end of stream (or a reset)."""
    try:
        while chunk := await stream.receive_some(65536):
            await stream.send_all(chunk)
        await stream.send_eof()
    except trio.BrokenResourceError:
        return  # the proxy reset us (a cut): nothing more to echo


@asynccontextmanager
async def echo_server_and_proxy(delay_s: float, **kwargs: float) -> AsyncIterator[DelayProxy]:
    """An echo server on an ephemeral port with a DelayProxy in front of it."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, _echo, 0, host="127.0.0.1")
        )
        target_port = listeners[0].socket.getsockname()[1]
        proxy = DelayProxy("127.0.0.1", target_port, delay_s=delay_s, **kwargs)
        port = await nursery.start(proxy.run)
        assert port == proxy.port
        yield proxy
        nursery.cancel_scope.cancel()


async def _round_trip(stream: trio.SocketStream, payload: bytes) -> float:
    t0 = trio.current_time()
    await stream.send_all(payload)
    got = b""
    while len(got) < len(payload):
        chunk = await stream.receive_some(65536)
        assert chunk, "the echo ended early"
        got += chunk
    assert got == payload
    return trio.current_time() - t0


async def _connection_is_broken(stream: trio.SocketStream) -> bool:
    """True if the stream ends or is reset, within the step deadline."""
    with trio.fail_after(STEP_TIMEOUT_S):
        try:
            await stream.send_all(b"anyone there?")
            return await stream.receive_some(1024) == b""
        except trio.BrokenResourceError:
            return True


async def _is_refused(port: int) -> bool:
    """A new connection fails: at connect (the reset came before trio saw the connect
    complete) or at the first exchange."""
    with trio.fail_after(STEP_TIMEOUT_S):
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            return True
    async with stream:
        return await _connection_is_broken(stream)


async def test_a_round_trip_takes_twice_the_one_way_delay() -> None:
    async with echo_server_and_proxy(0.020) as proxy:
        with trio.fail_after(STEP_TIMEOUT_S):
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            async with stream:
                rtts = [await _round_trip(stream, b"ping %d" % i) for i in range(21)]
    median = statistics.median(rtts)
    assert 0.035 <= median <= 0.080, rtts
    assert min(rtts) >= 0.040  # a chunk is never released before its delay


async def test_jitter_spreads_round_trips_within_its_bounds_and_never_reorders() -> None:
    async with echo_server_and_proxy(0.020, jitter_s=0.010, seed=3) as proxy:
        with trio.fail_after(STEP_TIMEOUT_S * 3):
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            async with stream:
                rtts = [await _round_trip(stream, b"ping %d" % i) for i in range(40)]
    assert min(rtts) >= 0.020  # two crossings of at least 10 ms each
    assert statistics.median(rtts) <= 0.080, rtts
    assert statistics.pstdev(rtts) >= 0.003, rtts  # a fixed delay would spread < 1 ms


async def test_a_rate_limit_holds_throughput_to_the_configured_bandwidth() -> None:
    """1 MiB echoed through a 16 Mbit/s link (each way): about 0.52 s, never less."""
    rate = 16e6
    payload = os.urandom(1024 * 1024)
    async with echo_server_and_proxy(0.001, rate_bps=rate) as proxy:
        with trio.fail_after(STEP_TIMEOUT_S * 3):
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            t0 = trio.current_time()
            got = 0

            async def send() -> None:
                await stream.send_all(payload)
                await stream.send_eof()

            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(send)
                while chunk := await stream.receive_some(65536):
                    got += len(chunk)
            elapsed = trio.current_time() - t0
    assert got == len(payload)
    serialisation = 8 * len(payload) / rate  # 0.524 s; the two directions overlap
    assert serialisation <= elapsed <= 2.5 * serialisation, elapsed


@pytest.mark.parametrize(
    "link",
    [
        {"delay_s": 0.010, "max_buffer_bytes": 64 * 1024},
        {"delay_s": 0.005, "jitter_s": 0.005, "rate_bps": 400e6},
    ],
    ids=["bounded-buffer", "jitter-and-rate"],
)
async def test_a_2_mib_transfer_arrives_intact_and_in_order(link: dict[str, float]) -> None:
    payload = os.urandom(2 * 1024 * 1024)
    async with echo_server_and_proxy(**link) as proxy:
        with trio.fail_after(STEP_TIMEOUT_S * 3):
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            received = hashlib.sha256()
            count = 0

            async def send() -> None:
                for i in range(0, len(payload), 50_000):
                    await stream.send_all(payload[i : i + 50_000])
                await stream.send_eof()

            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(send)
                while chunk := await stream.receive_some(65536):
                    received.update(chunk)
                    count += len(chunk)
    assert count == len(payload)
    assert received.digest() == hashlib.sha256(payload).digest()
    assert proxy.bytes_forwarded == 2 * len(payload)


async def test_cut_breaks_connections_and_refuses_new_ones_until_healed() -> None:
    async with echo_server_and_proxy(0.005) as proxy:
        with trio.fail_after(STEP_TIMEOUT_S):
            before = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            await _round_trip(before, b"hello")
        assert proxy.active_connections == 1

        proxy.cut()
        assert proxy.is_cut
        async with before:
            assert await _connection_is_broken(before)
        assert await _is_refused(proxy.port)
        assert proxy.active_connections == 0

        proxy.heal()
        with trio.fail_after(STEP_TIMEOUT_S):
            after = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            async with after:
                assert await _round_trip(after, b"healed") >= 0.010


async def test_a_target_that_is_not_listening_resets_the_dialer() -> None:
    with trio.socket.socket() as sock:  # a port that nothing listens on
        await sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    async with trio.open_nursery() as nursery:
        proxy = DelayProxy("127.0.0.1", dead_port, delay_s=0.001)
        port = await nursery.start(proxy.run)
        assert await _is_refused(port)
        nursery.cancel_scope.cancel()


def _task_count() -> int:
    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(t) for n in task.child_nurseries for t in n.child_tasks)

    return count(trio.lowlevel.current_root_task())


async def test_cancellation_closes_every_connection_and_leaves_no_task() -> None:
    baseline = _task_count()
    with trio.fail_after(STEP_TIMEOUT_S):
        async with echo_server_and_proxy(0.050) as proxy:
            streams = [await trio.open_tcp_stream("127.0.0.1", proxy.port) for _ in range(3)]
            for stream in streams:
                await stream.send_all(b"in flight when the proxy stops")
            # Wait (no sleep) until the proxy holds all three connections.
            while proxy.active_connections < 3:
                await trio.testing.wait_all_tasks_blocked()
        assert _task_count() == baseline
        for stream in streams:
            async with stream:
                assert await _connection_is_broken(stream)
    with pytest.raises(RuntimeError):
        _ = proxy.port


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        DelayProxy("127.0.0.1", 1, delay_s=-1.0)
    with pytest.raises(ValueError):
        DelayProxy("127.0.0.1", 1, delay_s=0.0, max_buffer_bytes=0)
    with pytest.raises(ValueError):
        DelayProxy("127.0.0.1", 1, delay_s=0.0, jitter_s=-0.001)
    with pytest.raises(ValueError):
        DelayProxy("127.0.0.1", 1, delay_s=0.0, rate_bps=-1.0)
