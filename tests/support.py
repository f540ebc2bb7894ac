"""Helpers shared by the integration tests (pytest puts this folder on sys.path)."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pspec.core.speculative import SamplingParams
from p2pspec.engines import Engine, load_engine
from p2pspec.peers.local import LocalEngine
from p2pspec.tools.launch import PeerProcess

ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def model(spec: str) -> Engine:
    """One shared engine per MODEL string, on one thread (tests share two cores)."""
    return fresh_model(spec)


def fresh_model(spec: str, **options: Any) -> Engine:
    """A newly loaded engine (not shared with other tests)."""
    return load_engine(spec, threads=1, progress=False, **options)


def local_tokens(
    verifier: str, drafter: str, prompt: str, max_new: int, params: SamplingParams, k: int = 4
) -> list[int]:
    """The in-process engine's output for a raw prompt: what the mesh must reproduce."""
    v = model(verifier)
    engine = LocalEngine(model(drafter), v, draft_tokens=k)
    return engine.generate(
        v.tokenizer.encode(prompt), max_new_tokens=max_new, params=params
    ).token_ids


def logged(peer: PeerProcess, event: str) -> list[dict[str, Any]]:
    """The JSON events named `event` in the peer's log (its other lines are skipped)."""
    out = []
    for line in peer.log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # py-libp2p's own warnings are plain text
        if isinstance(entry, dict) and entry.get("event") == event:
            out.append(entry)
    return out


async def run_testnet(
    topology: Path, *extra_args: str, returncodes: tuple[int, ...] = (0,)
) -> dict[str, Any]:
    """Run `testnet/testnet.py --topology TOPOLOGY --json --quiet [extra_args]` and return
    its JSON report, having checked its exit code and that every peer process is gone."""
    proc = await trio.run_process(
        [
            sys.executable,
            str(ROOT / "testnet" / "testnet.py"),
            "--topology",
            str(topology),
            "--json",
            "--quiet",
            *extra_args,
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode in returncodes, proc.stderr.decode()[-3000:]
    report: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    for p in report["peers"]:  # every peer process is gone, whatever happened
        with pytest.raises(ProcessLookupError):
            os.kill(p["pid"], 0)
    return report
