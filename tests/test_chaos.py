"""A brief chaos soak (testnet/chaos.py, real peer processes, tiny models): peers killed,
restarted, paused and cut off while sessions run; nothing is lost or corrupted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent


async def test_a_brief_chaos_soak_loses_and_corrupts_nothing(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    soak = ["--minutes", "0.75", "--sessions", "6", "--every", "2.5", "--seed", "3"]
    proc = await trio.run_process(
        [sys.executable, str(ROOT / "testnet" / "chaos.py"), *soak, "--out", str(out)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=ROOT,
    )
    assert out.exists(), proc.stderr.decode()[-3000:]
    rep = json.loads(out.read_text())
    assert rep["corrupted"] == 0, rep
    assert rep["crashes"] == [], rep
    assert rep["unexplained"] == 0, rep
    assert rep["completed"] >= 10, rep  # sessions went on through the chaos
    assert rep["identical"] == rep["completed"]
    assert rep["actions"].get("kill", 0) >= 1, rep  # the chaos did happen
    assert sum(p["restarts"] for p in rep["peers"].values()) >= 1, rep
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
