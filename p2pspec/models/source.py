"""Parsing a MODEL string into where the model comes from, without loading anything.

Accepted forms, tried in this order:
1. an embedded model name (`EMBEDDED_MODELS`), e.g. "qwen2.5-coder-0.5b-instruct";
2. "tiny-random:<seed>[:key=value...]", an in-memory random model for tests;
3. a path to an existing ".gguf" file;
4. a path to an existing local directory in Hugging Face format (with config.json);
5. a Hugging Face hub id ("org/name"), resolved by transformers (hub or local HF cache).

`resolve` is pure: the CLI can reject a bad MODEL string before spending a minute loading.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from p2pspec.core.errors import UnknownModelError
from p2pspec.models.embedded import EMBEDDED_MODELS, EmbeddedModel

__all__ = [
    "EmbeddedSource",
    "GgufFileSource",
    "HubSource",
    "LocalDirSource",
    "ModelSource",
    "TinyRandomSource",
    "resolve",
]

TINY_PREFIX = "tiny-random:"
# "org/name" as the hub spells ids: letters, digits, '-', '_', '.'; no leading punctuation.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class EmbeddedSource:
    entry: EmbeddedModel

    @property
    def model_id(self) -> str:
        return self.entry.name


@dataclass(frozen=True)
class TinyRandomSource:
    """A tiny random Llama; see `p2pspec.models.tiny` for what each field changes."""

    seed: int  # seeds the weights; same seed => same model
    vocab: int = 256  # vocabulary and logits width, 1..256
    layers: int = 4  # decoder layers
    noise: float = 0.0  # sigma of Gaussian noise added to every weight of the seed's model
    eos: int | None = None  # end-of-sequence id, none by default

    @property
    def model_id(self) -> str:
        """Canonical spelling: options sorted by name, defaults left out."""
        opts = []
        if self.eos is not None:
            opts.append(f"eos={self.eos}")
        if self.layers != 4:
            opts.append(f"layers={self.layers}")
        if self.noise != 0.0:
            opts.append(f"noise={self.noise!r}")
        if self.vocab != 256:
            opts.append(f"vocab={self.vocab}")
        return ":".join([f"tiny-random:{self.seed}", *opts])


@dataclass(frozen=True)
class GgufFileSource:
    path: Path  # absolute path of the .gguf file

    @property
    def model_id(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class LocalDirSource:
    path: Path  # absolute path of a folder with config.json, weights and tokenizer

    @property
    def model_id(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class HubSource:
    repo_id: str  # "org/name"

    @property
    def model_id(self) -> str:
        return self.repo_id


ModelSource = EmbeddedSource | TinyRandomSource | GgufFileSource | LocalDirSource | HubSource


def _accepted_forms() -> str:
    names = ", ".join(sorted(EMBEDDED_MODELS))
    return (
        "accepted MODEL forms:\n"
        f"  - an embedded model: {names}\n"
        "  - tiny-random:<seed>[:noise=<sigma>][:vocab=<n<=256>][:layers=<n>][:eos=<id>]\n"
        "  - a path to a .gguf file\n"
        "  - a path to a local Hugging Face model directory\n"
        "  - a Hugging Face hub id such as Qwen/Qwen2.5-Coder-0.5B-Instruct"
    )


def _bad(spec: str, why: str) -> UnknownModelError:
    return UnknownModelError(f"unknown model {spec!r}: {why}\n{_accepted_forms()}")


def _parse_int(spec: str, key: str, text: str, lo: int, hi: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _bad(spec, f"{key} must be an integer, got {text!r}") from None
    if not lo <= value <= hi:
        raise _bad(spec, f"{key} must be in {lo}..{hi}, got {value}")
    return value


def _parse_tiny(spec: str) -> TinyRandomSource:
    seed_text, *options = spec[len(TINY_PREFIX) :].split(":")
    seed = _parse_int(spec, "seed", seed_text, 0, 2**63 - 1)
    values: dict[str, str] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in ("noise", "vocab", "layers", "eos"):
            raise _bad(spec, f"unknown tiny-random option {option!r}")
        if key in values:
            raise _bad(spec, f"option {key!r} given twice")
        values[key] = value
    vocab = _parse_int(spec, "vocab", values.get("vocab", "256"), 1, 256)
    layers = _parse_int(spec, "layers", values.get("layers", "4"), 1, 64)
    eos = _parse_int(spec, "eos", values["eos"], 0, vocab - 1) if "eos" in values else None
    noise_text = values.get("noise", "0")
    try:
        noise = float(noise_text)
    except ValueError:
        raise _bad(spec, f"noise must be a number, got {noise_text!r}") from None
    if not math.isfinite(noise) or noise < 0:
        raise _bad(spec, f"noise must be finite and >= 0, got {noise_text!r}")
    return TinyRandomSource(seed=seed, vocab=vocab, layers=layers, noise=noise, eos=eos)


def resolve(spec: str) -> ModelSource:
    """Parse a MODEL string; raise UnknownModelError listing the accepted forms if it fits none."""
    if spec in EMBEDDED_MODELS:
        return EmbeddedSource(EMBEDDED_MODELS[spec])
    if spec.startswith(TINY_PREFIX):
        return _parse_tiny(spec)
    if not spec.strip():
        raise _bad(spec, "empty")
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise _bad(spec, f"no such .gguf file: {path}")
        return GgufFileSource(path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise _bad(spec, f"{path} is a folder but not a Hugging Face model (no config.json)")
        return LocalDirSource(path.resolve())
    if _HUB_ID.match(spec):
        return HubSource(spec)
    raise _bad(spec, "not an embedded model, tiny-random model, file, directory or hub id")
