"""Peer processes: start `p2pspec peer`, wait for its ready line, stop it by PID.

Used by the testnet and the integration tests. Readiness is the peer's own ready line on
stdout (its dialable multiaddr), read under a deadline: never a sleep. Stopping sends
SIGTERM, waits, then SIGKILLs; it only ever signals the PIDs it started.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from p2pspec.core.errors import PeerStartError as PeerStartError
from p2pspec.tools.delayproxy import DelayProxy

DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/0"  # loopback, any free port


def peak_rss_mb(pid: int) -> float | None:
    """Process `pid`'s peak resident memory so far in MiB (VmHWM in Linux /proc; psutil
    has no peak), None when unknown."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


@dataclass
class PeerProcess:
    name: str
    role: str
    model: str
    process: trio.Process
    log_path: Path
    address: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def peer_id(self) -> str:
        return self.address.rsplit("/", 1)[-1]

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def peak_rss_mb(self) -> float | None:
        """The process's peak resident memory so far (Linux /proc), None when unknown."""
        return peak_rss_mb(self.pid)

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests of failure handling)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)

    async def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; returns the exit code."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(timeout_s):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.send_signal(signal.SIGKILL)
                await self.process.wait()
        return self.process.returncode


def peer_command(
    role: str,
    model: str,
    *,
    key_file: Path,
    bootstrap: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    listen: str = DEFAULT_LISTEN,
    program: Sequence[str] = (),
) -> list[str]:
    """The command line of a peer; `program` replaces `python -m p2pspec.peers.cli` (a test
    peer that wraps the CLI, say)."""
    cmd = list(program) or [sys.executable, "-m", "p2pspec.peers.cli"]
    cmd += ["peer", "--role", role, "--model", model]
    cmd += ["--key", str(key_file), "--listen", listen]
    for addr in bootstrap:
        cmd += ["--bootstrap", addr]
    return cmd + list(extra_args)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port of `host` that was free a moment ago. Racy: another process may take it
    before the peer binds it; the peer then cannot listen and fails cleanly
    (PeerStartError). A peer behind a proxy must bind a known port, so there is no
    race-free way."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Link:
    """An emulated link in front of a peer (per direction): one-way delay, jitter, and
    bandwidth (0: unlimited)."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_mbit: float = 0.0


async def start_peer_behind_proxy(
    name: str,
    role: str,
    model: str,
    *,
    proxies: trio.Nursery,
    link: Link,
    seed: int = 0,
    host: str = "127.0.0.1",
    port: int = 0,
    proxy_host: str = "127.0.0.1",
    extra_args: Sequence[str] = (),
    **kwargs: Any,
) -> tuple[PeerProcess, DelayProxy]:
    """Start a peer behind a DelayProxy (run in `proxies`) that emulates `link`: the peer
    listens on `host`:`port` (a free port when 0) and announces the proxy's address, so
    every dial to it crosses the link. Returns the peer and its proxy (to cut and heal)."""
    port = port or free_port(host)
    proxy = DelayProxy(
        host,
        port,
        delay_s=link.delay_ms / 1000.0,
        jitter_s=link.jitter_ms / 1000.0,
        rate_bps=link.rate_mbit * 1e6,
        seed=seed,
        listen_host=proxy_host,
    )
    proxy_port = await proxies.start(proxy.run)
    peer = await start_peer(
        name,
        role,
        model,
        listen=f"/ip4/{host}/tcp/{port}",
        extra_args=[*extra_args, "--announce", f"/ip4/{proxy_host}/tcp/{proxy_port}"],
        **kwargs,
    )
    return peer, proxy


async def _read_ready_line(process: trio.Process) -> str:
    assert process.stdout is not None
    buf = b""
    while b"\n" not in buf:
        chunk = await process.stdout.receive_some(4096)
        if not chunk:
            raise PeerStartError("the peer exited before printing its address")
        buf += chunk
    return buf.split(b"\n", 1)[0].decode().strip()


# Log events of a starting peer worth showing whoever waits for it (its slow first start).
PROGRESS_EVENTS = {
    "gguf_assembling": "assembling the model file from its packages",
    "model_loading": "loading the model",
    "cost_curve_measuring": "measuring its cost of verifying 1..16 tokens (first start only)",
    "cost_curve": "cost curve ready",
}
PROGRESS_POLL_S = 0.5  # how often a starting peer's log is read for progress (display only)


async def _relay_progress(name: str, log_path: Path, show: Callable[[str], None]) -> None:
    """Show the progress events a starting peer logs, until cancelled (at its ready line)."""
    offset = 0
    while True:
        await trio.sleep(PROGRESS_POLL_S)
        with open(log_path, "rb") as f:
            f.seek(offset)
            data = f.read()
        complete = data.rfind(b"\n") + 1
        offset += complete
        for line in data[:complete].splitlines():
            try:
                event = json.loads(line).get("event")
            except (ValueError, AttributeError):
                continue
            if event in PROGRESS_EVENTS:
                show(f"{name}: {PROGRESS_EVENTS[event]}")


async def _ready_line_showing(
    process: trio.Process, name: str, log_path: Path, progress: Callable[[str], None] | None
) -> str:
    """The ready line, with the peer's progress shown meanwhile."""
    line: str | None = None
    error: PeerStartError | None = None
    async with trio.open_nursery() as nursery:
        if progress is not None:
            nursery.start_soon(_relay_progress, name, log_path, progress)
        try:
            line = await _read_ready_line(process)
        except PeerStartError as e:  # carried out by hand: not wrapped in an ExceptionGroup
            error = e
        nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    assert line is not None
    return line


async def start_peer(
    name: str,
    role: str,
    model: str,
    *,
    workdir: Path,
    bootstrap: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    ready_timeout_s: float = 300.0,
    env: dict[str, str] | None = None,
    listen: str = DEFAULT_LISTEN,
    program: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
) -> PeerProcess:
    """Start one peer and return once it has printed its ready line (its announced
    address when `extra_args` has --announce, else `listen` with the bound port).
    `progress`, if given, is shown what the peer does meanwhile (PROGRESS_EVENTS)."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    cmd = peer_command(
        role,
        model,
        key_file=workdir / f"{name}.key",
        bootstrap=bootstrap,
        extra_args=extra_args,
        listen=listen,
        program=program,
    )
    with open(log_path, "wb") as log_file:
        process = await trio.lowlevel.open_process(
            cmd,
            stdout=subprocess.PIPE,
            stderr=log_file,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        )
    peer = PeerProcess(name=name, role=role, model=model, process=process, log_path=log_path)
    peer.extra["listen"] = listen  # what it was told to bind
    try:
        with trio.fail_after(ready_timeout_s):
            peer.address = await _ready_line_showing(process, name, log_path, progress)
    except (trio.TooSlowError, PeerStartError) as e:
        await peer.stop(timeout_s=2.0)
        reason = "no ready line in time" if isinstance(e, trio.TooSlowError) else str(e)
        raise PeerStartError(f"{name}: {reason}\n{peer.log_tail()}") from None
    if "/p2p/" not in peer.address:
        await peer.stop(timeout_s=2.0)
        raise PeerStartError(f"{name}: the ready line is not a multiaddr: {peer.address!r}")
    return peer


async def stop_all(peers: Sequence[PeerProcess]) -> None:
    """Stop every peer at once, even while the caller is being cancelled."""
    with trio.CancelScope(shield=True):
        async with trio.open_nursery() as nursery:
            for p in peers:
                nursery.start_soon(p.stop)
