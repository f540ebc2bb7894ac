"""A p2pspec Node in its own process, for tests/test_node.py.

    python tests/helpers/node_peer.py --key FILE [--listen MULTIADDR] [--max-frame-bytes N]

Serves two test protocols: ECHO sends every frame back until the client closes, RAISE
reads one frame and then raises (to show a failing handler cannot take the host down).
When listening it prints its first full multiaddr, alone, on stdout; logs are JSON lines
on stderr. It exits when its stdin closes, so it cannot outlive the test that started it.
"""

from __future__ import annotations

import argparse
import os
import sys

import structlog
import trio

from p2pspec.core.framing import EndOfStreamError
from p2pspec.crypto import Identity
from p2pspec.net.node import DEFAULT_LISTEN_ADDR, Node, NodeStream

ECHO = "/p2pspec-test/echo/1.0.0"
RAISE = "/p2pspec-test/raise/1.0.0"
IDLE_TIMEOUT_S = 30.0  # seconds a handler waits for the client's next frame


async def echo(stream: NodeStream) -> None:
    while True:
        try:
            with trio.fail_after(IDLE_TIMEOUT_S):
                frame = await stream.read_frame()
        except EndOfStreamError:
            return
        with trio.fail_after(IDLE_TIMEOUT_S):
            await stream.write_frame(frame)


async def raise_after_one_frame(stream: NodeStream) -> None:
    with trio.fail_after(IDLE_TIMEOUT_S):
        await stream.read_frame()
    raise RuntimeError("handler failed on purpose")


async def wait_for_stdin_to_close() -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stdin:
        while await stdin.receive_some(1024):
            pass


async def main(args: argparse.Namespace) -> None:
    node = Node(
        Identity.load_or_create(args.key),
        listen=args.listen,
        max_frame_bytes=args.max_frame_bytes,
    )
    node.set_handler(ECHO, echo)
    node.set_handler(RAISE, raise_after_one_frame)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        print(node.listen_addrs()[0], flush=True)
        await wait_for_stdin_to_close()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key", required=True)
    parser.add_argument("--listen", default=DEFAULT_LISTEN_ADDR)
    parser.add_argument("--max-frame-bytes", type=int, default=1024 * 1024)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    trio.run(main, parser.parse_args())
