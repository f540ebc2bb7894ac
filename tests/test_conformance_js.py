"""Conformance: another libp2p implementation (js-libp2p, from npm) talks to a p2pspec peer.

A p2pspec peer (tests/helpers/conformance_peer.py: a real `Node` serving the real p2pspec
protocol ids) runs in its own process; tests/conformance/dial.mjs, a js-libp2p 2.10
dialer, connects to it over TCP with Noise and yamux, waits for identify, pings it, and
prints what it saw as one JSON line. The pinned js-libp2p packages (and why they are
pinned: Node.js 20) are in tests/conformance/package.json; `npm ci` installs them the
first time. No sleeps: the peer is read for its ready line, and every wait has a deadline.

By hand:
    cd tests/conformance && npm ci && node dial.mjs /ip4/127.0.0.1/tcp/PORT/p2p/PEER_ID
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from p2pspec.core.wire import DIRECTORY_PROTOCOL, SESSION_PROTOCOL, VERIFY_PROTOCOL
from p2pspec.net.node import AGENT_VERSION

pytestmark = pytest.mark.conformance

TESTS = Path(__file__).resolve().parent
HELPER = TESTS / "helpers" / "conformance_peer.py"
CONFORMANCE_DIR = TESTS / "conformance"
P2PSPEC_PROTOCOLS = {DIRECTORY_PROTOCOL, SESSION_PROTOCOL, VERIFY_PROTOCOL}  # the helper's
NPM_CI_TIMEOUT_S = 300.0  # installing the pinned packages from a cold npm cache
READY_TIMEOUT_S = 20.0  # a fresh interpreter importing libp2p, then listening
DIAL_TIMEOUT_S = 45.0  # node start-up and dial.mjs, which gives up by itself after 30 s
STOP_TIMEOUT_S = 5.0  # the peer's exit after SIGTERM


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"`{name}` is not on PATH: the js-libp2p conformance check needs Node.js")
    return path


async def _install_js_packages(npm: str) -> None:
    """`npm ci` unless node_modules was installed from the current package-lock.json."""
    lock = CONFORMANCE_DIR / "package-lock.json"
    installed = CONFORMANCE_DIR / "node_modules" / ".package-lock.json"  # npm writes it last
    if installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime:
        return
    with trio.fail_after(NPM_CI_TIMEOUT_S):
        result = await trio.run_process(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=CONFORMANCE_DIR,
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 0, (
        f"npm ci failed ({result.returncode}):\n{result.stdout.decode()}\n{result.stderr.decode()}"
    )


async def _read_line(stream: trio.abc.ReceiveStream) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise AssertionError(f"peer exited before printing its address; got {data!r}")
        data += chunk
    lines = data.decode().splitlines()
    assert len(lines) == 1, f"stdout must carry the address alone, got {lines!r}"
    return lines[0]


async def test_js_libp2p_dials_identifies_and_pings_a_p2pspec_peer(tmp_path: Path) -> None:
    node_exe = _tool("node")
    await _install_js_packages(_tool("npm"))

    log_path = tmp_path / "conformance_peer.log"
    with log_path.open("wb") as log:
        peer = await trio.lowlevel.open_process(
            [sys.executable, str(HELPER)],
            stdin=subprocess.PIPE,  # the helper also exits when this closes
            stdout=subprocess.PIPE,
            stderr=log,
        )
    try:
        assert peer.stdout is not None
        with trio.fail_after(READY_TIMEOUT_S):
            addr = await _read_line(peer.stdout)
        peer_id = addr.rsplit("/p2p/", 1)[1]

        with trio.fail_after(DIAL_TIMEOUT_S):
            dial = await trio.run_process(
                [node_exe, "dial.mjs", addr],
                cwd=CONFORMANCE_DIR,
                stdin=subprocess.DEVNULL,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        stdout, stderr = dial.stdout.decode(), dial.stderr.decode()
        assert dial.returncode == 0, (
            f"dial.mjs failed ({dial.returncode}):\n{stderr}\npeer log:\n{log_path.read_text()}"
        )
        lines = stdout.splitlines()
        assert len(lines) == 1, f"dial.mjs must print one JSON line, got {lines!r}"
        seen = json.loads(lines[0])

        assert seen["remotePeer"] == peer_id  # the peer id Noise authenticated
        assert seen["encryption"] == "/noise"
        assert seen["multiplexer"] == "/yamux/1.0.0"
        assert seen["agentVersion"].startswith("p2pspec/")
        assert seen["agentVersion"] == AGENT_VERSION
        assert set(seen["protocols"]) >= P2PSPEC_PROTOCOLS, seen["protocols"]
        assert isinstance(seen["pingMs"], int | float)
        assert seen["pingMs"] >= 0
    finally:
        with trio.CancelScope(shield=True):
            if peer.returncode is None:
                peer.send_signal(signal.SIGTERM)  # our own child, by its PID
            with trio.move_on_after(STOP_TIMEOUT_S):
                await peer.wait()
            if peer.returncode is None:
                peer.kill()
                await peer.wait()
            assert peer.stdin is not None
            await peer.stdin.aclose()
