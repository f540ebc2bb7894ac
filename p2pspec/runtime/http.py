"""HTTP in the caller's own trio run: an ASGI app (starlette) on hypercorn's trio worker.

The gateway (`p2pspec serve`) and a peer's metrics (`--metrics`) both serve this way, so
that their handlers read the mesh's state on the loop that owns it, with no thread.
"""

from __future__ import annotations

from typing import Any

import trio

from p2pspec.core.errors import UserError, first_error

__all__ = ["serve_asgi"]


async def serve_asgi(
    app: Any,
    address: str,
    *,
    flag: str,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,  # type: ignore[name-defined, unused-ignore]
) -> None:
    """Serve `app` at `address` (HOST:PORT; port 0: any free one) until cancelled;
    `task_status.started` gets the bound URLs. UserError naming `flag`, the option the
    address came from, where it cannot listen (taken, or not this machine's)."""
    # Imported here: a peer without --metrics never loads an HTTP server.
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    config = Config()
    config.bind = [address]
    config.accesslog = None
    config.loglevel = "WARNING"  # not hypercorn's "Running on" line: callers print the URL
    config.graceful_timeout = 1.0
    try:
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(hypercorn_serve, app, config)
            task_status.started(urls)
    except* OSError as group:  # from inside hypercorn's nursery and this one
        raise UserError(f"{flag} {address}: cannot listen there: {first_error(group)}") from None
