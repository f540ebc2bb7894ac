"""Test-wide settings: offline, and one torch thread for the tiny models.

Tiny models are dominated by per-op overhead; with two intra-op threads on a two-core
machine shared with peer processes, they run about 4x slower. End-to-end tests on the
real models ask for both cores themselves (`all_cores` fixture).
"""

from __future__ import annotations

import os
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
# real models), real-process (peers, the CLI or a browser in processes of their own, real
# libp2p), in-memory (trio, with streams or peers in this process), pure (plain functions).
# A test's kind is read from its own source and its fixtures': a heuristic, stated as one.
_PROCESS_WORDS = (
    "start_peer", "run_process", "subprocess", "Popen", "start_testnet", "Mesh(",
    "webdriver", "PeerProcess",
)  # fmt: skip


def _sources(item: pytest.Item) -> list[str]:
    import inspect

    functions = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    for defs in info.name2fixturedefs.values() if info is not None else []:
        functions.extend(d.func for d in defs)
    texts = []
    for function in functions:
        try:
            texts.append(inspect.getsource(function))  # type: ignore[arg-type]
        except (OSError, TypeError):
            continue
    return texts


def _kind(item: pytest.Item) -> str:
    import inspect

    if item.get_closest_marker("e2e"):
        return "end-to-end"
    texts = _sources(item)
    if any(word in text for text in texts for word in _PROCESS_WORDS):
        return "real-process"
    function = getattr(item, "function", None)
    if inspect.iscoroutinefunction(function) or any("trio" in text for text in texts):
        return "in-memory"
    return "pure"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.user_properties.append(("kind", _kind(item)))


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
