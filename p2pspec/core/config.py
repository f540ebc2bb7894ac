"""Typed configuration: TOML files decoded into Structs; unknown keys are refused.

Every field has a unit in its name where it has one, and a one-line comment. CLI flags
override file values (`merge`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from p2pspec.core.errors import ConfigError as ConfigError

Seconds = Annotated[float, Meta(gt=0.0, le=86_400.0)]
Count = Annotated[int, Meta(ge=1, le=100_000)]
T = TypeVar("T")


class PeerConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    role: Literal["drafter", "verifier"] | None = None  # what this peer serves
    model: str | None = None  # a MODEL string (see the README)
    # The runtime: llama.cpp for GGUF models (the embedded ones, .gguf files) when it is
    # installed, transformers for the rest ("auto"); or either, by name.
    engine: Literal["auto", "llama.cpp", "transformers"] = "auto"
    # transformers' compute dtype; None: float32 on the CPU, bfloat16 on CUDA.
    dtype: Literal["float32", "bfloat16"] | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where the model runs
    threads: Annotated[int, Meta(ge=0, le=256)] = 0  # compute threads; 0 = this process's cores
    # llama.cpp: tokens of KV cache per session (reserved up front, one slot a session).
    context_tokens: Annotated[int, Meta(ge=64, le=1 << 20)] = 4096
    # llama.cpp kernels: "lossless" (batch-invariant, verifying equals plain decoding),
    # "batched" (batch-invariant too; long and batched passes cost about one, a lone token
    # several) or "fastest" (llama.cpp's defaults; may flip near-ties, docs/benchmarks.md).
    llama_settings: Literal["lossless", "batched", "fastest"] = "lossless"
    listen: str = "/ip4/127.0.0.1/tcp/0"  # multiaddr to listen on (tcp/0: any free port)
    announce: str | None = None  # multiaddr others should dial instead of the bound one
    bootstrap: list[str] = []  # multiaddrs (with /p2p/<id>) of peers to join through
    mdns: bool = False  # find and announce peers on the local network by multicast DNS
    key_file: str | None = None  # Ed25519 identity; created 0600 on first run
    capacity_sessions: Count = 8  # sessions served at once; more are refused
    advert_interval_s: Seconds = 2.0  # how often the peer re-signs and spreads its record
    record_ttl_s: Seconds = 6.0  # a record not refreshed within this is dropped everywhere
    dial_timeout_s: Seconds = 5.0  # deadline of one dial (libp2p's own can hang ~120 s)
    request_timeout_s: Seconds = 10.0  # deadline of a directory exchange or session open
    verify_timeout_s: Seconds = 120.0  # deadline of one verify round trip (CPU verifiers)
    idle_timeout_s: Seconds = 300.0  # a session silent this long is freed
    liveness_interval_s: Seconds = 1.0  # ping a peer this often while waiting on it
    liveness_timeout_s: Seconds = 5.0  # a peer silent this long (no pong) is taken for dead
    max_failovers: Annotated[int, Meta(ge=0, le=16)] = 3  # peers a session may move away from
    # When every compatible verifier has failed, a session waits this long for one to
    # come back (a cut link that heals) before it is refused.
    reconnect_window_s: Seconds = 30.0
    probe_interval_s: Seconds = 2.0  # how often a drafter measures its RTT to each verifier
    batch_max_sessions: Annotated[int, Meta(ge=1, le=64)] = 8  # verify requests per batch
    batch_max_wait_s: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.004  # wait for a batch to fill
    max_frame_bytes: Annotated[int, Meta(ge=4096, le=64 << 20)] = 1 << 20  # frame size limit
    draft_tokens: Annotated[int, Meta(ge=0, le=16)] = 4  # default draft length k
    log_tokens: bool = False  # debug only: allow token ids and text in logs
    # Seal token payloads end to end (client <-> drafter <-> verifier) on top of libp2p's
    # per-hop Noise; a peer with it on refuses sessions that are not encrypted.
    e2e_encryption: bool = True
    # A private mesh: the file with the mesh's shared secret (16+ random bytes); peers
    # without it are refused at connection time (membership.py).
    network_key_file: str | None = None
    # Audits (drafters, greedy sessions): this fraction of rounds is re-verified by a
    # second verifier with the same weights and dtype; a disagreement is evidence only
    # where the auditor's logits separate the two tokens by more than audit_margin.
    audit_fraction: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    audit_margin: Annotated[float, Meta(ge=0.0, le=1e6)] = 1.0
    # Sampled sessions: the auditor's verdict counts as evidence only when no draw that
    # decided it was closer than this to flipping (speculative.rejection_margin).
    audit_sampling_margin: Annotated[float, Meta(ge=0.0, le=1.0)] = 1e-4
    torch_threads: Annotated[int, Meta(ge=0, le=256)] = 0  # the former name of `threads`
    # Inbound connections (admission.py): a handshake's deadline, and how many may be
    # handshaking or open at once, in all and from one source address or /24 (/64).
    handshake_timeout_s: Seconds = 5.0
    max_handshakes: Count = 64
    max_handshakes_per_ip: Count = 8
    max_inbound: Count = 512
    max_inbound_per_ip: Count = 64
    max_inbound_per_subnet: Count = 128
    # Streams of one authenticated peer: open at once (at least capacity_sessions + 8),
    # and new ones a second per protocol (sustained, and in a burst); more are refused
    # with too_many_streams / rate_limited.
    max_streams_per_peer: Count = 64
    streams_per_s: Annotated[float, Meta(gt=0.0, le=1e6)] = 200.0
    stream_burst: Count = 400


class TestnetPeers(Struct, forbid_unknown_fields=True, kw_only=True):
    model: str  # MODEL string of these peers
    count: Count = 1  # how many processes
    capacity_sessions: Count = 8  # sessions each serves at once
    threads: Annotated[int, Meta(ge=0, le=256)] = 1  # compute threads per process (0 = all)
    engine: Literal["auto", "llama.cpp", "transformers"] = "auto"  # these peers' runtime
    # The link in front of each of these peers (a DelayProxy each, per direction): one-way
    # delay and jitter in ms, bandwidth in Mbit/s (0: unlimited).
    delay_ms: Annotated[float, Meta(ge=0.0, le=10_000.0)] = 0.0
    jitter_ms: Annotated[float, Meta(ge=0.0, le=10_000.0)] = 0.0
    rate_mbit: Annotated[float, Meta(ge=0.0, le=100_000.0)] = 0.0
    # Packet loss on each of these peers' links, both ways (links = "netns" only).
    loss: Annotated[float, Meta(ge=0.0, lt=1.0)] = 0.0

    @property
    def link_emulated(self) -> bool:
        return self.delay_ms > 0 or self.jitter_ms > 0 or self.rate_mbit > 0


class Workload(Struct, forbid_unknown_fields=True, kw_only=True):
    prompts: Annotated[list[str], Meta(min_length=1)]  # cycled through, one per session
    sessions: Count = 4  # sessions in all
    concurrency: Count = 2  # sessions in flight at once
    max_new_tokens: Count = 32
    temperature: Annotated[float, Meta(ge=0.0)] = 0.0
    seed: int = 0
    raw: bool = False  # skip the chat template
    # k per round, or "auto": the drafter adapts it (and may let the verifier decode alone).
    draft_tokens: Annotated[int, Meta(ge=0, le=16)] | Literal["auto"] = 4
    wait_s: Annotated[float, Meta(ge=0.0)] = 0.0  # how long a session waits for capacity
    kill_peer: str = ""  # chaos: the name of a peer to SIGKILL mid-run (e.g. "verifier-0-1")
    kill_after_tokens: Annotated[int, Meta(ge=0)] = 0  # ... once this many tokens streamed
    # Links: cut this peer off (e.g. "verifier-0-0") once `cut_after_tokens` tokens have
    # streamed, and heal it `heal_after_s` later.
    cut_peer: str = ""
    cut_after_tokens: Annotated[int, Meta(ge=0)] = 0
    heal_after_s: Annotated[float, Meta(ge=0.0)] = 2.0
    pipelined: bool = True  # keep drafting while verdicts travel (Client.stream)


class Topology(Struct, forbid_unknown_fields=True, kw_only=True):
    verifiers: Annotated[list[TestnetPeers], Meta(min_length=1)]
    drafters: Annotated[list[TestnetPeers], Meta(min_length=1)]
    workload: Workload
    dtype: Literal["float32", "bfloat16"] | None = None  # transformers only (None: float32)
    ready_timeout_s: Seconds = 600.0  # deadline for every peer to print its ready line
    peer: PeerConfig = msgspec.field(default_factory=PeerConfig)  # settings for every peer
    # "proxy": links emulated by a DelayProxy in front of each peer (portable, no root).
    # "netns": each peer in a network namespace of its own too (Linux, root), for loss and
    # partitions that drop packets (p2pspec/tools/netns.py).
    links: Literal["proxy", "netns"] = "proxy"
    # Pin each peer process to one core of its own, in turn (with one torch thread):
    # drafter and verifier then compute side by side, as on separate machines.
    pin_cores: bool = False

    def __post_init__(self) -> None:
        if self.links != "netns" and any(p.loss for p in [*self.verifiers, *self.drafters]):
            raise ValueError('packet loss needs links = "netns": a TCP proxy cannot lose packets')


def load_toml(path: str | Path, kind: type[T]) -> T:
    """Decode a TOML file into `kind`, turning every failure into a ConfigError."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror}") from None
    try:
        return msgspec.toml.decode(data, type=kind)
    except msgspec.ValidationError as e:
        raise ConfigError(f"invalid config {p}: {e}") from None
    except msgspec.DecodeError as e:
        raise ConfigError(f"config {p} is not valid TOML: {e}") from None


def merge(config: PeerConfig, overrides: dict[str, Any]) -> PeerConfig:
    """CLI flags over file values: every override that is not None replaces the field."""
    fields = {k: v for k, v in overrides.items() if v is not None}
    try:
        return msgspec.convert({**msgspec.to_builtins(config), **fields}, PeerConfig)
    except msgspec.ValidationError as e:
        raise ConfigError(f"invalid option: {e}") from None
