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
