"""Length-prefixed frames: round trips, short reads, and one error type per failure."""

from __future__ import annotations

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from p2pspec.core.framing import (
    DEFAULT_MAX_FRAME_SIZE,
    EndOfStreamError,
    FrameError,
    FrameTooLargeError,
    MalformedFrameError,
    TruncatedFrameError,
    encode_frame,
    read_frame,
    write_frame,
)


class FakeStream:
    """An in-memory ByteStream that returns at most `chunk` bytes per read (a short read)."""

    def __init__(self, data: bytes = b"", *, chunk: int | None = None) -> None:
        self.incoming = bytearray(data)
        self.chunk = chunk
        self.consumed = 0
        self.written = bytearray()

    async def read(self, n: int) -> bytes:
        await trio.lowlevel.checkpoint()
        take = min(n, len(self.incoming), self.chunk or n)
        data = bytes(self.incoming[:take])
        del self.incoming[:take]
        self.consumed += take
        return data

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.written += data


# Vectors from the multiformats unsigned-varint spec.
@pytest.mark.parametrize(
    ("length", "prefix"),
    [
        (0, "00"),
        (1, "01"),
        (127, "7f"),
        (128, "8001"),
        (255, "ff01"),
        (300, "ac02"),
        (16384, "808001"),
    ],
)
def test_length_prefix_is_the_multiformats_unsigned_varint(length: int, prefix: str) -> None:
    assert encode_frame(bytes(length)) == bytes.fromhex(prefix) + bytes(length)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16384, 100_000, DEFAULT_MAX_FRAME_SIZE])
async def test_round_trip(size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    stream = FakeStream()
    await write_frame(stream, payload)
    reader = FakeStream(bytes(stream.written), chunk=4096)
    assert await read_frame(reader) == payload
    with pytest.raises(EndOfStreamError):
        await read_frame(reader)


async def test_short_reads_of_one_byte_at_a_time_still_give_whole_frames() -> None:
    payloads = [b"", b"a", bytes(range(200)), b"x" * 5000]
    wire = b"".join(encode_frame(p) for p in payloads)
    stream = FakeStream(wire, chunk=1)
    assert [await read_frame(stream) for _ in payloads] == payloads
    assert stream.consumed == len(wire)


async def test_read_does_not_consume_past_its_frame() -> None:
    stream = FakeStream(encode_frame(b"first") + b"\xff\xff")
    assert await read_frame(stream) == b"first"
    assert bytes(stream.incoming) == b"\xff\xff"


async def test_oversize_frame_is_refused_before_its_payload_is_read() -> None:
    wire = encode_frame(b"z" * 1000)
    stream = FakeStream(wire)
    with pytest.raises(FrameTooLargeError):
        await read_frame(stream, max_size=999)
    assert stream.consumed == 2  # the prefix only


async def test_a_huge_declared_length_is_refused_from_the_prefix_alone() -> None:
    # About 2**63 declared: refused as soon as the prefix read so far passes max_size
    # (3 bytes already say >= 2**21 - 1), without waiting for the rest of the prefix.
    stream = FakeStream(bytes.fromhex("ffffffffffffffff7f"))
    with pytest.raises(FrameTooLargeError):
        await read_frame(stream)
    assert stream.consumed == 3


async def test_frame_of_exactly_max_size_is_accepted() -> None:
    stream = FakeStream(encode_frame(b"q" * 64, max_size=64))
    assert await read_frame(stream, max_size=64) == b"q" * 64


async def test_write_refuses_an_oversize_payload_and_writes_nothing() -> None:
    stream = FakeStream()
    with pytest.raises(FrameTooLargeError):
        await write_frame(stream, b"z" * 65, max_size=64)
    assert stream.written == b""


@pytest.mark.parametrize(
    "wire",
    [
        b"\x05abc",  # payload cut short
        b"\x80",  # prefix cut short
        b"\xac",  # prefix cut short
    ],
)
async def test_truncated_frame(wire: bytes) -> None:
    with pytest.raises(TruncatedFrameError):
        await read_frame(FakeStream(wire, chunk=1))


async def test_clean_end_between_frames_is_its_own_error() -> None:
    with pytest.raises(EndOfStreamError):
        await read_frame(FakeStream(b""))


async def test_varint_longer_than_nine_bytes_is_malformed() -> None:
    with pytest.raises(MalformedFrameError):
        await read_frame(FakeStream(b"\x80" * 9 + b"\x00"), max_size=2**62)


async def test_non_minimal_varint_is_malformed() -> None:
    with pytest.raises(MalformedFrameError):
        await read_frame(FakeStream(b"\x81\x00" + b"x"))


def test_max_size_must_be_sane() -> None:
    with pytest.raises(ValueError):
        encode_frame(b"", max_size=-1)


async def test_callers_put_a_deadline_on_a_peer_that_never_sends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class SilentStream(FakeStream):
        async def read(self, n: int) -> bytes:
            await trio.sleep_forever()
            raise AssertionError("unreachable")

    with pytest.raises(trio.TooSlowError):
        with trio.fail_after(5):
            await read_frame(SilentStream())
    assert trio.current_time() == pytest.approx(5)


@given(
    payloads=st.lists(st.binary(max_size=300), max_size=8),
    chunk=st.integers(min_value=1, max_value=64),
)
async def test_any_sequence_of_frames_round_trips_under_any_short_reads(
    payloads: list[bytes], chunk: int
) -> None:
    writer = FakeStream()
    for payload in payloads:
        await write_frame(writer, payload)
    reader = FakeStream(bytes(writer.written), chunk=chunk)
    assert [await read_frame(reader) for _ in payloads] == payloads
    with pytest.raises(EndOfStreamError):
        await read_frame(reader)


@given(
    data=st.binary(max_size=200),
    chunk=st.integers(min_value=1, max_value=16),
    max_size=st.integers(min_value=0, max_value=100),
)
async def test_arbitrary_bytes_only_ever_raise_framing_errors(
    data: bytes, chunk: int, max_size: int
) -> None:
    stream = FakeStream(data, chunk=chunk)
    frames = []
    with pytest.raises(FrameError):
        while True:
            frames.append(await read_frame(stream, max_size=max_size))
    assert all(len(frame) <= max_size for frame in frames)
    assert stream.consumed <= len(data)
