"""Length-prefixed frames over a byte stream: the unit every p2pspec message travels in.

A frame is an unsigned varint (multiformats unsigned-varint: LEB128, minimal, at most 9
bytes) holding the payload length, then the payload. libp2p streams are byte streams
whose `read(n)` returns whatever has arrived (a short read), so message boundaries are
ours to keep: `read_frame` reads until the frame is complete, and refuses a declared
length above `max_size` before reading a byte of the payload, so a peer cannot make us
buffer more than we allow.

Every failure raises its own FrameError subclass, so a handler can reset the stream on
any of them and log which one happened.

No deadlines here (this module is pure: no trio, no libp2p). `read_frame` waits as long
as the stream does, and a peer dripping one byte a second could hold it for days:
callers put every call under their own deadline, e.g.
`with trio.fail_after(verify_timeout_s): frame = await read_frame(stream)`.
"""

from __future__ import annotations

from typing import Protocol

from p2pspec.core.errors import EndOfStreamError as EndOfStreamError
from p2pspec.core.errors import FrameError as FrameError
from p2pspec.core.errors import FrameTooLargeError as FrameTooLargeError
from p2pspec.core.errors import MalformedFrameError as MalformedFrameError
from p2pspec.core.errors import TruncatedFrameError as TruncatedFrameError

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "MAX_VARINT_BYTES",
    "ByteStream",
    "EndOfStreamError",
    "FrameError",
    "FrameTooLargeError",
    "MalformedFrameError",
    "TruncatedFrameError",
    "encode_frame",
    "read_frame",
    "write_frame",
]

DEFAULT_MAX_FRAME_SIZE = 1024 * 1024  # bytes of payload (1 MiB), length prefix excluded
MAX_VARINT_BYTES = 9  # multiformats unsigned-varint caps lengths at 63 bits, 9 bytes


class ByteStream(Protocol):
    """What framing needs of a stream: a libp2p stream adapter, or an in-memory fake."""

    async def read(self, n: int) -> bytes:
        """Between 1 and `n` bytes as soon as any have arrived; b"" at end of stream."""
        ...

    async def write(self, data: bytes) -> None:
        """Write all of `data`."""
        ...


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _check_max_size(max_size: int) -> None:
    if max_size < 0 or max_size >= 1 << (7 * MAX_VARINT_BYTES):
        raise ValueError(f"max_size must be in [0, 2**63), not {max_size}")


def encode_frame(payload: bytes, *, max_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """The bytes of one frame (prefix + payload); FrameTooLargeError above `max_size`."""
    _check_max_size(max_size)
    if len(payload) > max_size:
        raise FrameTooLargeError(
            f"frame of {len(payload)} bytes is above the maximum of {max_size} bytes"
        )
    return _encode_varint(len(payload)) + payload


async def write_frame(
    stream: ByteStream, payload: bytes, *, max_size: int = DEFAULT_MAX_FRAME_SIZE
) -> None:
    """Write one frame in a single `write` (so concurrent writers cannot interleave parts
    of it, given a stream whose writes are atomic). Refuses, before writing anything, a
    payload the peer would refuse: FrameTooLargeError above `max_size`."""
    await stream.write(encode_frame(payload, max_size=max_size))


async def _read_length(stream: ByteStream, max_size: int) -> int:
    """Read the varint prefix one byte at a time, so no payload byte is consumed."""
    length = 0
    for index in range(MAX_VARINT_BYTES):
        chunk = await stream.read(1)
        if not chunk:
            if index == 0:
                raise EndOfStreamError("stream ended between frames")
            raise TruncatedFrameError(f"stream ended inside a length prefix, after {index} bytes")
        byte = chunk[0]
        length |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            if byte == 0 and index > 0:
                raise MalformedFrameError("length prefix is not minimally encoded")
            break
        # Later bytes only add to the length: refuse as soon as it is already too big.
        if length > max_size:
            raise FrameTooLargeError(
                f"declared frame length of at least {length} bytes is above the maximum "
                f"of {max_size} bytes"
            )
    else:
        raise MalformedFrameError(f"length prefix is longer than {MAX_VARINT_BYTES} bytes")
    if length > max_size:
        raise FrameTooLargeError(
            f"declared frame length of {length} bytes is above the maximum of {max_size} bytes"
        )
    return length


async def read_frame(stream: ByteStream, *, max_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Read one whole frame and return its payload.

    Raises EndOfStreamError (clean end between frames), TruncatedFrameError,
    FrameTooLargeError (checked before the payload is read) or MalformedFrameError.
    Waits without limit: put it under a deadline (see the module docstring).
    """
    _check_max_size(max_size)
    length = await _read_length(stream, max_size)
    parts: list[bytes] = []
    remaining = length
    while remaining:
        chunk = await stream.read(remaining)
        if not chunk:
            raise TruncatedFrameError(
                f"stream ended {remaining} bytes short of a {length}-byte frame"
            )
        if len(chunk) > remaining:
            # A bug in the stream adapter, not a peer's fault: it broke the read(n) contract.
            raise RuntimeError(f"stream returned {len(chunk)} bytes when asked for {remaining}")
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)
