"""The commands of `p2pspec` besides generate: peer, serve, status, models, bench and
verify-transcript, and the checks of the addresses they are given."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from p2pspec.core.errors import UserError, first_error


def models(args: argparse.Namespace) -> int:
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


def serve(args: argparse.Namespace) -> int:
    import signal

    import trio

    from p2pspec.net.addrs import host_and_port
    from p2pspec.runtime import gateway, logs
    from p2pspec.runtime.client import Client

    config = mesh_config(args)
    host_and_port("--listen", args.listen, "127.0.0.1:8000")
    logs.configure(level="info")

    async def run() -> None:
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
    except* UserError as group:  # --listen at an address it cannot listen on
        raise first_error(group) from None
    return 0


def status(args: argparse.Namespace) -> int:
    import trio

    from p2pspec.runtime import logs
    from p2pspec.runtime.client import Client, ClientError
    from p2pspec.runtime.status import mesh_status, table

    config = mesh_config(args)
    logs.configure(level="warning")

    async def run() -> list[Any]:
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


def bench(args: argparse.Namespace) -> int:
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


def raise_file_limit(wanted: int) -> None:
    """Let this process hold `wanted` files (its connections among them) where the hard
    limit allows: a soft limit of 1,024 would be spent before the inbound limits."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def check_addresses(flag: str, values: Sequence[str], check: Any, form: str) -> None:
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


def mesh_config(args: argparse.Namespace) -> Any:
    """The PeerConfig a mesh client of `generate`, `serve` or `status` runs with, once
    their shared flags (--bootstrap, --network-key) are checked."""
    from p2pspec.core.config import PeerConfig
    from p2pspec.net.addrs import check_peer_address

    check_addresses("--bootstrap", args.bootstrap, check_peer_address, PEER_ADDRESS)
    return PeerConfig(network_key_file=args.network_key)


def default_key_path(role: str) -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "p2pspec", f"{role}.key")


def peer(args: argparse.Namespace) -> int:
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

    check_addresses("--bootstrap", config.bootstrap, addrs.check_peer_address, PEER_ADDRESS)
    check_addresses("--listen", [config.listen], addrs.check_listen_address, LISTEN_ADDRESS)
    if config.announce is not None:
        dialable = "/ip4/<ip>/tcp/<port>, an address and port others can dial"
        check_addresses("--announce", [config.announce], addrs.check_announce_address, dialable)
    key_path = config.key_file or default_key_path(config.role)
    try:
        identity = Identity.load_or_create(key_path)
        key_lock = claim_key_file(key_path)  # held until this process ends
    except KeyFileError as e:
        raise UserError(str(e)) from None
    log = structlog.get_logger("p2pspec.peer")
    raise_file_limit(2 * config.max_inbound + 256)
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
    # Ctrl-C before the signal handler is installed: nothing was serving yet.
    with contextlib.suppress(KeyboardInterrupt):
        try:
            run = functools.partial(run_until_signalled, metrics_address=args.metrics)
            trio.run(run, peer, ready)
        except* UserError as group:  # --metrics at an address it cannot listen on
            raise first_error(group) from None
    key_lock.close()
    return 0


def verify_transcript(args: argparse.Namespace) -> int:
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
