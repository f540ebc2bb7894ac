"""Test-wide settings: offline, and one torch thread for the tiny models.

Tiny models are dominated by per-op overhead; with two intra-op threads on a two-core
machine shared with peer processes, they run about 4x slower. End-to-end tests on the
real models ask for both cores themselves (`all_cores` fixture).
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

torch.set_num_threads(1)


@pytest.fixture
def all_cores() -> Iterator[None]:
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(1)


# -- the suite by kind ----------------------------------------------------------------------
# Reported at the end of every run (issue 14 asks for the counts): end-to-end (marked e2e:
# real models), real-process (it started a process: peers, the CLI, a browser, real
# libp2p), in-memory (trio, with streams or peers in this process), pure (plain functions).
# "Started a process" is observed, not guessed: Python's audit events for subprocess,
# fork and spawn are counted while each test runs.
_SPAWNS = 0


def _count_spawns(event: str, _args: tuple[object, ...]) -> None:
    global _SPAWNS
    if event in ("subprocess.Popen", "os.fork", "os.posix_spawn", "os.forkpty"):
        _SPAWNS += 1


sys.addaudithook(_count_spawns)


def _uses_trio(item: pytest.Item) -> bool:
    """An async test, or one whose source or fixtures' source runs trio (a loop in a
    thread, say)."""
    function = getattr(item, "function", None)
    if inspect.iscoroutinefunction(function):
        return True
    functions = [function]
    info = getattr(item, "_fixtureinfo", None)
    for defs in info.name2fixturedefs.values() if info is not None else []:
        functions.extend(d.func for d in defs)
    for f in functions:
        try:
            if "trio" in inspect.getsource(f):  # type: ignore[arg-type]
                return True
        except (OSError, TypeError):
            continue
    return False


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    before = _SPAWNS
    try:
        return (yield)
    finally:
        if item.get_closest_marker("e2e"):
            kind = "end-to-end"
        elif before < _SPAWNS:
            kind = "real-process"
        elif _uses_trio(item):
            kind = "in-memory"
        else:
            kind = "pure"
        item.user_properties.append(("kind", kind))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    counts: dict[str, int] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) != "call":
                continue
            kind = dict(getattr(report, "user_properties", [])).get("kind")
            if kind is not None:
                counts[kind] = counts.get(kind, 0) + 1
    if counts:
        order = ("pure", "in-memory", "real-process", "end-to-end")
        line = ", ".join(f"{counts.get(k, 0)} {k}" for k in order)
        terminalreporter.write_line(f"tests run by kind: {line}")
