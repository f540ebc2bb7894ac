"""p2pspec: collaborative speculative decoding over a peer-to-peer libp2p mesh."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
