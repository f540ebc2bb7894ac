"""structlog set-up: events with snake_case names and fields, always on stderr.

A console renderer on a terminal, JSON lines otherwise (testnet logs, CI). Token ids
and text never go into log fields unless the peer runs with `log_tokens` (debug).
"""

from __future__ import annotations

import logging
import sys

import structlog


class _CurrentStderr:
    """Whatever sys.stderr is when a line is written (not when logging was configured):
    a replaced stderr (a test's capture, a redirect) gets the lines from then on, and a
    closed one is never written to."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(*, level: str = "info", json: bool | None = None) -> None:
    as_json = (not sys.stderr.isatty()) if json is None else json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    # libp2p logs through the standard library; keep its chatter off unless asked.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
