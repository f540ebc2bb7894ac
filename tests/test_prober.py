"""Prober and serve_probe between two in-process Nodes on loopback, direct and through
a DelayProxy; directory_round_trip against the directory protocol."""

from __future__ import annotations

import functools
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from p2pspec.core import wire
from p2pspec.core.config import PeerConfig
from p2pspec.core.directory import Directory
from p2pspec.crypto import Identity
from p2pspec.net.channel import Channel, RemoteError
from p2pspec.net.discovery import serve_exchange
from p2pspec.net.node import Node
from p2pspec.net.prober import (
    PROBE_PROTOCOL,
    ProbeError,
    Prober,
    directory_round_trip,
    serve_probe,
)
from p2pspec.tools.delayproxy import DelayProxy

STEP_TIMEOUT_S = 20.0  # deadline of any single step of these tests
ONE_WAY_S = 0.030


@asynccontextmanager
async def running_node(node: Node) -> AsyncIterator[Node]:
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        yield node
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def server_and_client() -> AsyncIterator[tuple[Node, Node]]:
    """A node serving the probe and directory protocols, and a bare client node."""
    server = Node(Identity.generate())
    server.set_handler(PROBE_PROTOCOL, serve_probe)
    directory = Directory(server.peer_id)
    server.set_handler(
        wire.DIRECTORY_PROTOCOL,
        functools.partial(serve_exchange, directory=directory, config=PeerConfig()),
    )
    async with running_node(server), running_node(Node(Identity.generate())) as client:
        yield server, client


def _port_of(addr: str) -> int:
    return int(addr.split("/tcp/")[1].split("/")[0])


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_rtt_on_loopback_is_measured_and_small() -> None:
    async with server_and_client() as (server, client):
        prober = Prober(client, timeout_s=STEP_TIMEOUT_S)
        addr = server.listen_addrs()[0]
        assert prober.rtt_s(server.peer_id) is None
        with trio.fail_after(STEP_TIMEOUT_S):
            rtts = [await prober.measure(server.peer_id, addr) for _ in range(5)]
        assert all(0.0 < rtt < 0.050 for rtt in rtts), rtts
        assert prober.samples(server.peer_id) == 5
        average = prober.rtt_s(server.peer_id)
        assert average is not None and min(rtts) <= average <= max(rtts)
        assert prober.rtts() == {server.peer_id: average}


async def test_rtt_through_a_delay_proxy_includes_both_directions() -> None:
    async with server_and_client() as (server, client), trio.open_nursery() as nursery:
        addr = server.listen_addrs()[0]
        proxy = DelayProxy("127.0.0.1", _port_of(addr), delay_s=ONE_WAY_S)
        port = await nursery.start(proxy.run)
        via_proxy = f"/ip4/127.0.0.1/tcp/{port}/p2p/{server.peer_id}"
        prober = Prober(client, timeout_s=STEP_TIMEOUT_S)
        with trio.fail_after(STEP_TIMEOUT_S):
            rtts = [await prober.measure(server.peer_id, via_proxy) for _ in range(3)]
            directory_rtt = await directory_round_trip(client, via_proxy, timeout_s=STEP_TIMEOUT_S)
        assert min(rtts) >= 2 * ONE_WAY_S, rtts
        assert directory_rtt >= 2 * ONE_WAY_S
        nursery.cancel_scope.cancel()


async def test_run_probes_every_target_and_survives_an_unreachable_one() -> None:
    dead = Identity.generate().peer_id
    dead_addr = f"/ip4/127.0.0.1/tcp/{_unused_port()}/p2p/{dead}"
    async with server_and_client() as (server, client):
        live_addr = server.listen_addrs()[0]
        prober = Prober(client, interval_s=0.1, timeout_s=2.0)
        with pytest.raises(ProbeError):
            await prober.measure(dead, dead_addr)
        assert prober.rtt_s(dead) is None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(prober.run, lambda: [(server.peer_id, live_addr), (dead, dead_addr)])
            with trio.fail_after(STEP_TIMEOUT_S):
                while prober.samples(server.peer_id) < 3:  # rounds run every 0.1 s
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert prober.rtt_s(dead) is None
        rtt = prober.rtt_s(server.peer_id)
        assert rtt is not None and rtt < 0.050


async def test_a_failed_probe_makes_the_rtt_unknown() -> None:
    async with server_and_client() as (server, client), trio.open_nursery() as nursery:
        addr = server.listen_addrs()[0]
        proxy = DelayProxy("127.0.0.1", _port_of(addr), delay_s=0.001)
        port = await nursery.start(proxy.run)
        via_proxy = f"/ip4/127.0.0.1/tcp/{port}/p2p/{server.peer_id}"
        prober = Prober(client, interval_s=0.1, timeout_s=2.0)
        with trio.fail_after(STEP_TIMEOUT_S):
            await prober.measure(server.peer_id, via_proxy)
            assert prober.rtt_s(server.peer_id) is not None
            proxy.cut()  # the connection breaks, and new dials are refused
            with pytest.raises(ProbeError):
                await prober.measure(server.peer_id, via_proxy)
            assert prober.rtt_s(server.peer_id) is None
            proxy.heal()
            # The next rounds reconnect. (The first may still fail: libp2p takes about
            # 150 ms to drop the broken connection, and the node does not dial while it
            # is listed.)
            nursery.start_soon(prober.run, lambda: [(server.peer_id, via_proxy)])
            while prober.samples(server.peer_id) < 1:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


async def test_serve_probe_refuses_anything_but_pings() -> None:
    async with server_and_client() as (server, client):
        with trio.fail_after(STEP_TIMEOUT_S):
            stream = await client.open_stream(
                server.listen_addrs()[0], PROBE_PROTOCOL, timeout_s=STEP_TIMEOUT_S
            )
            async with stream:
                channel = Channel(stream)
                await channel.send(wire.DirectorySync(records=[]))
                with pytest.raises(RemoteError, match="bad_request"):
                    await channel.receive(timeout_s=STEP_TIMEOUT_S)
