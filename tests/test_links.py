"""The testnet's emulated links, end to end: edge and cloud delays with jitter and a rate
limit and a cut that heals (portable proxies), and packet loss with a real partition
(network namespaces, Linux as root). Every answer must be the verifier's own."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import support

from p2pspec.engines.local import greedy_decode
from p2pspec.tools.netns import Namespaces, unavailable

ROOT = Path(__file__).resolve().parent.parent
VERIFIER = "tiny-random:11"


def _answers_are_the_verifiers_own(report: dict[str, Any]) -> None:
    verifier = support.model(VERIFIER)
    assert report["completed"] == report["sessions"]
    for r in report["results"]:
        want = greedy_decode(verifier, r["prompt_token_ids"], len(r["token_ids"]))
        assert r["token_ids"] == want
        assert len(r["token_ids"]) == 48 or r["finish_reason"] != "length"


async def test_edge_and_cloud_links_with_a_cut_and_heal(tmp_path: Path) -> None:
    report = await support.run_testnet(ROOT / "configs" / "testnet-wan.toml")
    _answers_are_the_verifiers_own(report)
    peers = {p["name"]: p for p in report["peers"]}
    for name in ("verifier-0-0", "verifier-0-1"):
        assert peers[name]["delay_ms"] == 20.0 and peers[name]["jitter_ms"] == 2.0
        # Two crossings of at least 18 ms each, whatever the jitter drew.
        assert peers[name]["rtt_ms_min"] >= 36.0
    # Pipelined: drafts were in flight side by side; the cut sent sessions elsewhere.
    assert max(r["stats"]["max_in_flight"] for r in report["results"]) >= 2
    assert sum(r["stats"]["verifier_failovers"] for r in report["results"]) >= 1


@pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))
async def test_five_percent_loss_and_a_partition_that_heals(tmp_path: Path) -> None:
    """configs/testnet-netns.toml: the only verifier loses 5 % of its packets both ways
    and is partitioned for 3 s mid-run; every session completes with the right answer,
    and every namespace, veth and bridge is gone afterwards."""
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    report = await support.run_testnet(ROOT / "configs" / "testnet-netns.toml")
    _answers_are_the_verifiers_own(report)
    peers = {p["name"]: p for p in report["peers"]}
    assert peers["verifier-0-0"]["loss"] == 0.05
    assert peers["verifier-0-0"]["address"].startswith("/ip4/10.")
    # The partition stalled the sessions streaming when it came for about its 3 s (it
    # drops packets: a TCP proxy's cut would reset at once). Measured at the client, as a
    # gap between two chunks, so a busy machine can only make it longer.
    assert max(r["max_gap_s"] for r in report["results"]) >= 1.5
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert after == before


def _echoes_answered(address: str, count: int) -> int:
    """UDP echoes sent to `address`:9999 that came back within 50 ms each."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.05)
        answered = 0
        for i in range(count):
            sock.sendto(b"%d" % i, (address, 9999))
            try:
                sock.recv(64)
            except TimeoutError:
                continue
            answered += 1
        return answered


@pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))
def test_namespaces_drop_the_configured_share_of_packets_and_clean_up() -> None:
    with Namespaces() as ns:
        a = ns.add("a")
        code = (
            "import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"s.bind(('{a.address}', 9999))\n"
            "while True:\n"
            "    data, sender = s.recvfrom(64)\n"
            "    try:\n"
            "        s.sendto(data, sender)\n"
            "    except PermissionError:\n"  # a dropped send fails at once: that is the loss
            "        continue\n"
        )
        echo = subprocess.Popen([*a.exec_prefix, sys.executable, "-c", code])
        try:
            deadline = time.monotonic() + 10.0
            while not _echoes_answered(a.address, 1):  # until the echo server is up
                assert time.monotonic() < deadline, "the echo server never answered"
            assert _echoes_answered(a.address, 200) == 200  # no loss configured yet
            ns.set_loss("a", 0.05)
            # Each echo crosses the lossy link twice: 1 - 0.95^2 = 9.75 % are lost.
            lost = 1 - _echoes_answered(a.address, 2000) / 2000
            assert 0.06 <= lost <= 0.14, lost
            ns.cut("a")
            assert _echoes_answered(a.address, 20) == 0
            ns.heal("a")
            ns.set_loss("a", 0.0)
            assert _echoes_answered(a.address, 50) == 50
        finally:
            echo.kill()
            echo.wait()
        bridge, name = ns.bridge, a.name
    assert bridge not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert name not in subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout
