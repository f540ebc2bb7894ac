"""The `p2pspec peer` process: ready line, identity key, announce, config, clean shutdown."""

from __future__ import annotations

import os
import signal
import stat
import sys
from pathlib import Path

import pytest
import trio

from p2pspec.core.config import ConfigError, PeerConfig, load_toml, merge
from p2pspec.crypto.identity import Identity
from p2pspec.tools.launch import start_peer, stop_all

MODEL = "tiny-random:11"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_peer_shuts_down_cleanly_and_promptly_on_a_signal(
    tmp_path: Path, signum: signal.Signals
) -> None:
    peer = await start_peer("v", "verifier", MODEL, workdir=tmp_path, extra_args=["--threads", "1"])
    try:
        peer.process.send_signal(signum)
        with trio.fail_after(5):
            code = await peer.process.wait()
        assert code == 0
        assert "peer_stopping" in peer.log_path.read_text()
    finally:
        await stop_all([peer])


async def test_the_ready_line_is_a_dialable_address_and_the_key_is_kept(tmp_path: Path) -> None:
    first = await start_peer(
        "v", "verifier", MODEL, workdir=tmp_path, extra_args=["--threads", "1"]
    )
    await stop_all([first])
    key = tmp_path / "v.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    identity = Identity.load_or_create(key)
    parts = first.address.split("/")
    assert parts[1] == "ip4" and parts[2] == "127.0.0.1"
    assert parts[3] == "tcp" and int(parts[4]) > 0
    assert parts[5] == "p2p" and parts[6] == identity.peer_id
    # Second run: the same key file, the same peer id; --announce sets the advertised address.
    second = await start_peer(
        "v",
        "verifier",
        MODEL,
        workdir=tmp_path,
        extra_args=["--threads", "1", "--announce", "/ip4/192.0.2.10/tcp/4001"],
    )
    try:
        assert second.address == f"/ip4/192.0.2.10/tcp/4001/p2p/{identity.peer_id}"
    finally:
        await stop_all([second])


async def test_a_config_with_an_unknown_key_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "peer.toml"
    cfg.write_text('role = "verifier"\nmodel = "tiny-random:1"\ncapacity = 3\n')
    proc = await trio.run_process(
        [sys.executable, "-m", "p2pspec.peers.cli", "peer", "--config", str(cfg)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert "unknown field `capacity`" in err and "Traceback" not in err
    assert proc.stdout == b""


def test_flags_override_config_values_and_units_are_in_the_names(tmp_path: Path) -> None:
    cfg = tmp_path / "peer.toml"
    cfg.write_text('role = "drafter"\ncapacity_sessions = 3\nrecord_ttl_s = 4.0\n')
    config = load_toml(cfg, PeerConfig)
    assert config.capacity_sessions == 3 and config.record_ttl_s == 4.0
    merged = merge(config, {"capacity_sessions": 9, "role": None})
    assert merged.capacity_sessions == 9 and merged.role == "drafter"
    with pytest.raises(ConfigError, match="capacity_sessions"):
        merge(config, {"capacity_sessions": 0})
    timeouts = [f for f in PeerConfig.__struct_fields__ if "timeout" in f or "interval" in f]
    assert timeouts and all(f.endswith("_s") for f in timeouts)
