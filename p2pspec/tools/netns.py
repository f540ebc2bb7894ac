"""Network-namespace links (Linux, as root): packet loss and partitions for the testnet.

A TCP proxy (p2pspec/tools/delayproxy.py) sees a reliable byte stream, so it can delay, jitter
and throttle, but not lose a packet, and its cut resets connections at once. This mode
gives each peer a network namespace of its own, with a real address, so that the kernel's
TCP runs between peers and nftables rules inside a peer's namespace act on its packets
(wan-emulation.md measured both; the kernel has no netem, so delay still comes from a
proxy in front of the peer, in the host namespace):

* every namespace is joined to one bridge in the host namespace by a veth pair, on a /24
  this run picks; the host (the client, the proxies) and every peer reach every peer
  across the bridge, with no routing and no host-wide setting touched;
* loss ``p``: ``numgen random mod 10000 < p·10000 drop`` on input and output, on every
  interface but loopback, so all of the peer's traffic crosses a lossy link;
* a cut drops every packet (a real partition: no reset, TCP stalls and retries), and
  heal deletes the rule.

Names carry a random tag (the machine is shared), and `close` removes the namespaces,
the veth pairs and the bridge, even after an error.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass

from p2pspec.core.errors import NetnsError as NetnsError

PEER_PORT = 4001  # every peer listens on this port of its own (empty) namespace


def unavailable() -> str | None:
    """Why this machine cannot run the namespace mode, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"the {tool!r} command is missing (apt-get install iproute2 nftables)"
    return None


def _run(*cmd: str, stdin: str | None = None) -> None:
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: {done.stderr.strip() or done.returncode}")


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 that overlaps no address or route of the host."""
    done = subprocess.run(
        ["ip", "-j", "-4", "route", "show", "table", "all"],
        capture_output=True,
        text=True,
        check=False,
    )
    routes = json.loads(done.stdout or "[]")
    used = [
        ipaddress.ip_network(r["dst"], strict=False)
        for r in routes
        if r.get("dst", "default") != "default"
    ]
    for _ in range(100):
        net = ipaddress.ip_network(
            f"10.{secrets.randbelow(56) + 200}.{secrets.randbelow(256)}.0/24"
        )
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetnsError("no free 10.x.y.0/24 subnet for the namespaces")


@dataclass
class Space:
    """One peer's namespace: its name, address and current link faults."""

    name: str
    veth: str  # the host end, on the bridge
    address: str
    loss: float = 0.0
    cut: bool = False

    @property
    def exec_prefix(self) -> list[str]:
        """Prefix a command with this to run it inside the namespace."""
        return ["ip", "netns", "exec", self.name]


class Namespaces:
    """The namespaces of one run, on one bridge. Use as a context manager."""

    def __init__(self) -> None:
        reason = unavailable()
        if reason is not None:
            raise NetnsError(reason)
        self.tag = secrets.token_hex(3)
        self.subnet = _free_subnet()
        hosts = self.subnet.hosts()
        self.host_address = str(next(hosts))
        self._free = hosts
        self.bridge = f"p2b{self.tag}"
        self.spaces: dict[str, Space] = {}
        self._bridge_made = False

    def __enter__(self) -> Namespaces:
        try:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            self._bridge_made = True
            _run("ip", "addr", "add", f"{self.host_address}/24", "dev", self.bridge)
            _run("ip", "link", "set", self.bridge, "up")
        except NetnsError:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, peer: str) -> Space:
        """A namespace for `peer`, on the bridge, with its address and empty rules."""
        index = len(self.spaces)
        space = Space(
            name=f"p2n{self.tag}{index}",
            veth=f"p2v{self.tag}{index}",
            address=str(next(self._free)),
        )
        self.spaces[peer] = space
        inside = f"p2i{self.tag}{index}"
        ns = space.exec_prefix
        _run("ip", "netns", "add", space.name)
        _run("ip", "link", "add", space.veth, "type", "veth", "peer", "name", inside)
        _run("ip", "link", "set", inside, "netns", space.name)
        _run("ip", "link", "set", space.veth, "master", self.bridge)
        _run("ip", "link", "set", space.veth, "up")
        _run(*ns, "ip", "addr", "add", f"{space.address}/24", "dev", inside)
        _run(*ns, "ip", "link", "set", inside, "up")
        _run(*ns, "ip", "link", "set", "lo", "up")
        self._apply(space)
        return space

    def set_loss(self, peer: str, loss: float) -> None:
        """Drop each packet of `peer`, in and out, with probability `loss`."""
        if not 0.0 <= loss < 1.0:
            raise ValueError(f"loss must be in [0, 1), got {loss}")
        self.spaces[peer].loss = loss
        self._apply(self.spaces[peer])

    def cut(self, peer: str) -> None:
        """Partition `peer` from everyone: every packet in or out is dropped."""
        self.spaces[peer].cut = True
        self._apply(self.spaces[peer])

    def heal(self, peer: str) -> None:
        self.spaces[peer].cut = False
        self._apply(self.spaces[peer])

    def _apply(self, space: Space) -> None:
        """Replace the namespace's rules with ones for its current loss and cut."""
        if space.cut:
            rule = "drop"
        elif space.loss > 0:
            rule = f"numgen random mod 10000 < {round(space.loss * 10000)} drop"
        else:
            rule = ""
        chains = "\n".join(
            f" chain {hook} {{\n  type filter hook {hook} priority 0; policy accept;\n"
            + (f'  {way}name != "lo" {rule}\n' if rule else "")
            + " }"
            for hook, way in (("input", "iif"), ("output", "oif"))
        )
        script = (
            f"table inet p2pspec\ndelete table inet p2pspec\ntable inet p2pspec {{\n{chains}\n}}\n"
        )
        _run(*space.exec_prefix, "nft", "-f", "-", stdin=script)

    def close(self) -> None:
        """Remove every namespace, veth pair and the bridge (errors are collected, and
        raised once everything was tried)."""
        problems = []
        for space in self.spaces.values():
            for cmd in (("ip", "link", "del", space.veth), ("ip", "netns", "del", space.name)):
                try:
                    _run(*cmd)
                except NetnsError as e:
                    problems.append(str(e))
        self.spaces.clear()
        if self._bridge_made:
            try:
                _run("ip", "link", "del", self.bridge)
            except NetnsError as e:
                problems.append(str(e))
            self._bridge_made = False
        if problems:
            raise NetnsError("; ".join(problems))
