"""A p2pspec-like peer in its own process, for tests/test_conformance_js.py.

    python tests/helpers/conformance_peer.py [--listen MULTIADDR]

A `Node` with a fresh identity that serves the real p2pspec protocol ids (directory,
session, verify) with a trivial handler that closes the stream: enough for another
libp2p implementation to see them in identify. When listening it prints its first full
multiaddr, alone, on stdout; logs are JSON lines on stderr. It serves until SIGTERM or
SIGINT, or until its stdin closes, so it cannot outlive the test that started it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Awaitable, Callable

import structlog
import trio

from p2pspec.core.wire import DIRECTORY_PROTOCOL, SESSION_PROTOCOL, VERIFY_PROTOCOL
from p2pspec.crypto import Identity
from p2pspec.net.node import DEFAULT_LISTEN_ADDR, Node, NodeStream

PROTOCOLS = (DIRECTORY_PROTOCOL, SESSION_PROTOCOL, VERIFY_PROTOCOL)


async def close_at_once(stream: NodeStream) -> None:
    """Serves nothing: Node closes the stream when a handler returns."""


async def wait_for_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            return


async def wait_for_stdin_to_close() -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stdin:
        while await stdin.receive_some(1024):
            pass


async def main(args: argparse.Namespace) -> None:
    node = Node(Identity.generate(), listen=args.listen)
    for protocol_id in PROTOCOLS:
        node.set_handler(protocol_id, close_at_once)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        print(node.listen_addrs()[0], flush=True)

        async def stop_after(waiter: Callable[[], Awaitable[None]]) -> None:
            await waiter()
            nursery.cancel_scope.cancel()

        nursery.start_soon(stop_after, wait_for_signal)
        nursery.start_soon(stop_after, wait_for_stdin_to_close)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default=DEFAULT_LISTEN_ADDR)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    trio.run(main, parser.parse_args())
