"""Multiaddrs, peer ids and keys as the libp2p adapter (node.py) parses and converts
them: p2pspec's strings in, libp2p's types out, a clear InvalidMultiaddrError for
what cannot be used."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from libp2p.abc import INetConn
from libp2p.crypto.ed25519 import Ed25519PrivateKey as Libp2pEd25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.protocol_muxer.exceptions import MultiselectClientError
from multiaddr import Multiaddr
from multiaddr.exceptions import Error as MultiaddrError
from multiaddr.utils import get_network_addrs

from p2pspec.core.errors import InvalidMultiaddrError as InvalidMultiaddrError
from p2pspec.core.errors import ListenError as ListenError
from p2pspec.core.errors import PeerRefusedError as PeerRefusedError
from p2pspec.core.errors import PeerUnreachableError as PeerUnreachableError
from p2pspec.core.errors import ProtocolNotSupportedError as ProtocolNotSupportedError
from p2pspec.core.errors import StreamResetError as StreamResetError
from p2pspec.core.errors import UserError
from p2pspec.crypto import Identity, InvalidPeerIdError, public_key_from_peer_id

# -- addresses and ids --------------------------------------------------------------------


def parse_multiaddr(text: str) -> Multiaddr:
    try:
        return Multiaddr(text)
    except (MultiaddrError, ValueError, TypeError) as error:
        raise InvalidMultiaddrError(f"{text!r} is not a multiaddr: {error}") from error


def parse_peer_id(text: str) -> ID:
    try:
        public_key_from_peer_id(text)  # p2pspec peers have Ed25519 ids, nothing else
    except InvalidPeerIdError as error:
        raise InvalidMultiaddrError(f"{text!r} is not an Ed25519 peer id: {error}") from error
    return ID.from_base58(text)


def split_p2p(maddr: Multiaddr) -> tuple[Multiaddr, str | None]:
    """(transport part, peer id or None) of a multiaddr ending in /p2p/<id> or not."""
    protocols = [protocol.name for protocol in maddr.protocols()]
    if "p2p" not in protocols:
        return maddr, None
    if protocols.count("p2p") > 1 or protocols[-1] != "p2p":
        raise InvalidMultiaddrError(f"{maddr} has /p2p/ somewhere other than at its end")
    peer_id = maddr.get_peer_id()
    if peer_id is None:
        raise InvalidMultiaddrError(f"{maddr} has an empty /p2p/ component")
    return maddr.decapsulate_code(maddr.protocols()[-1].code), str(peer_id)


def peer_id_in(text: str) -> str:
    """The peer id that multiaddr `text` ends in ('' when it names none or is none)."""
    try:
        return split_p2p(parse_multiaddr(text))[1] or ""
    except InvalidMultiaddrError:
        return ""


def dialable_tcp_address(info: PeerInfo) -> str | None:
    """The first plain TCP address of a peer found by mDNS, with /p2p/<id>; or None."""
    for a in info.addrs:
        names = {p.name for p in a.protocols()}
        if "tcp" in names and "p2p" not in names:
            return f"{a}/p2p/{info.peer_id}"
    return None


def tcp_parts(maddr: Multiaddr) -> tuple[str, str, int]:
    """(ip4|ip6, ip, port) of an /ip4|ip6/<ip>/tcp/<port> multiaddr, else InvalidMultiaddrError."""
    protocols = [protocol.name for protocol in maddr.protocols()]
    if len(protocols) != 2 or protocols[0] not in ("ip4", "ip6") or protocols[1] != "tcp":
        raise InvalidMultiaddrError(
            f"{maddr} is not /ip4/<ip>/tcp/<port> or /ip6/<ip>/tcp/<port> (TCP is the only "
            "transport)"
        )
    ip = str(maddr.value_for_protocol(protocols[0]))
    return protocols[0], ip, int(maddr.value_for_protocol("tcp"))


def check_peer_address(text: str) -> str:
    """`text` if it is a dialable peer address, /ip4|ip6/<ip>/tcp/<port>/p2p/<peer id>;
    InvalidMultiaddrError saying what is wrong otherwise."""
    transport, peer_id = split_p2p(parse_multiaddr(text))
    if peer_id is None:
        raise InvalidMultiaddrError(f"{text} must end in /p2p/<peer id>")
    _, ip, port = tcp_parts(transport)
    if is_wildcard(ip) or port == 0:
        raise InvalidMultiaddrError(f"{text} is not dialable (a wildcard IP or port 0)")
    parse_peer_id(peer_id)
    return text


def check_listen_address(text: str) -> str:
    """`text` if a node can listen on it, /ip4|ip6/<ip>/tcp/<port> (port 0: any free one);
    InvalidMultiaddrError otherwise."""
    transport, peer_id = split_p2p(parse_multiaddr(text))
    if peer_id is not None:
        raise InvalidMultiaddrError(f"{text} must not name a peer id: it is where to listen")
    tcp_parts(transport)
    return text


def check_announce_address(text: str) -> str:
    """`text` if peers can dial it as this peer's own address: /ip4|ip6/<ip>/tcp/<port>,
    no wildcard IP, no port 0, no peer id; InvalidMultiaddrError otherwise."""
    transport, peer_id = split_p2p(parse_multiaddr(text))
    if peer_id is not None:
        raise InvalidMultiaddrError(f"announce address {text} must not name a peer id")
    _, ip, port = tcp_parts(transport)
    if is_wildcard(ip) or port == 0:
        raise InvalidMultiaddrError(f"announce address {text} is not dialable")
    return text


def host_and_port(flag: str, text: str, example: str) -> tuple[str, int]:
    """HOST:PORT (port 0: any free one) of an HTTP server's flag; UserError naming the flag
    otherwise."""
    try:
        parts = urlsplit(f"//{text}")
        host, port = parts.hostname, parts.port  # port: ValueError outside 0..65535
    except ValueError:
        host = port = None
    if not host or port is None or parts.netloc != text or "@" in text:
        raise UserError(
            f"{flag} {text!r}: expected HOST:PORT (an IPv6 host in brackets), e.g. {example}"
        )
    return host, port


def is_wildcard(ip: str) -> bool:
    return ip in ("0.0.0.0", "::")


def interface_ips(family: str) -> list[str]:
    """This machine's addresses of one family, real interfaces first, loopback last.

    For a node listening on 0.0.0.0 or ::, whose bound address no peer can dial.
    """
    version = 4 if family == "ip4" else 6
    loopback = "127.0.0.1" if version == 4 else "::1"
    ips = [ip for ip in get_network_addrs(version) if ip != loopback]
    return [*ips, loopback]


def expand_wildcards(bound: Sequence[Multiaddr]) -> list[Multiaddr]:
    """Bound TCP addresses, each wildcard IP replaced by this machine's IPs of its family."""
    addrs: list[Multiaddr] = []
    for each in bound:
        family, ip, port = tcp_parts(each)
        ips = interface_ips(family) if is_wildcard(ip) else [ip]
        addrs.extend(Multiaddr(f"/{family}/{one}/tcp/{port}") for one in ips)
    return addrs


def libp2p_key_pair(identity: Identity) -> KeyPair:
    private_key = Libp2pEd25519PrivateKey.from_bytes(identity.private_key_bytes())
    key_pair = KeyPair(private_key, private_key.get_public_key())
    # Both derivations must agree, or peers would see a different id than we print.
    if str(ID.from_pubkey(key_pair.public_key)) != identity.peer_id:
        raise RuntimeError("libp2p derived a different peer id from our identity key")
    return key_pair


def unsupported_protocol(error: BaseException) -> bool:
    """Whether a failed new_stream was the peer answering 'na' to our protocol id.

    py-libp2p folds ProtocolNotSupportedError into a MultiselectClientError message, so
    the message is all there is to go on (tests/test_node.py pins this behaviour).
    """
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, MultiselectClientError) and "not supported" in str(cause):
            return True
        cause = cause.__cause__
    return False


def usable(conn: INetConn) -> bool:
    """Whether a connection can still carry new streams (not closed, not shutting down)."""
    muxed = conn.muxed_conn
    shutting_down = getattr(muxed, "event_shutting_down", None)
    return not (
        conn.is_closed or muxed.is_closed or (shutting_down is not None and shutting_down.is_set())
    )
