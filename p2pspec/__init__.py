"""p2pspec: collaborative speculative decoding over a peer-to-peer libp2p mesh.

`from p2pspec import Client` gives the mesh client; it is imported lazily so that the
pure core (`p2pspec.core.speculative`, `p2pspec.core.wire`, ...) loads without libp2p or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Client", "__version__", "generate_blocking"]

if TYPE_CHECKING:
    from p2pspec.runtime.client import Client, generate_blocking


def __getattr__(name: str) -> Any:
    if name in ("Client", "generate_blocking"):
        from p2pspec.runtime import client

        return getattr(client, name)
    raise AttributeError(f"module 'p2pspec' has no attribute {name!r}")
