"""The testnet with delay proxies in front of far verifiers (configs/testnet-placement.toml)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parent.parent
ONE_WAY_MS = 40.0  # delay_ms of the far verifiers in the topology


def _port(addr: str) -> int:
    return int(addr.split("/tcp/")[1].split("/")[0])


async def test_far_verifiers_sit_behind_a_delay_proxy_and_the_run_completes() -> None:
    proc = await trio.run_process(
        [
            sys.executable,
            str(ROOT / "testnet" / "testnet.py"),
            "--topology",
            str(ROOT / "configs" / "testnet-placement.toml"),
            "--json",
            "--quiet",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    rep = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert rep["sessions"] == rep["completed"] == 12

    peers = {p["name"]: p for p in rep["peers"]}
    far = [peers["verifier-1-0"], peers["verifier-1-1"]]
    near = [peers["verifier-0-0"], peers["verifier-0-1"]]
    for p in far:
        assert p["delay_ms"] == ONE_WAY_MS
        # It announces the proxy's port, not the port it listens on.
        assert _port(p["address"]) != _port(p["listen"]) != 0
    for p in near:
        assert p["delay_ms"] == 0.0
        assert p["listen"].endswith("/tcp/0")
    # Every far sample crosses the proxy twice and is never released early, so its
    # minimum is at least the added 80 ms plus its own (positive) base; the near minimum
    # is that base alone. Minima are what CPU noise disturbs least.
    for f in far:
        for n in near:
            assert f["rtt_ms_min"] - n["rtt_ms_min"] >= 2 * ONE_WAY_MS, (f, n)
    for p in rep["peers"]:  # every peer process is gone
        with pytest.raises(ProcessLookupError):
            os.kill(p["pid"], 0)
