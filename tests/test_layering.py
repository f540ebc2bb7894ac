"""The import layering of design.md, enforced by parsing every module's imports."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Modules of the pure core: no trio, no libp2p, no torch; they import the standard
# library, msgspec, numpy, crypto/ and one another only.
PURE_CORE = {
    "speculative",
    "errors",
    "wire",
    "framing",
    "config",
    "directory",
    "policy",
    "admission",
    "drafttree",
    "verdicts",
    "transcript",
    "membership",
}
PURE_THIRD_PARTY = {"msgspec", "numpy"}


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Fully qualified names this module imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(ROOT).with_suffix("")
    top = {"peers": "p2pspec.peers", "crypto": "p2pspec.crypto"}.get(rel.parts[0], rel.parts[0])
    package = [top, *rel.parts[1:-1]]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _offenders(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in paths:
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


def test_crypto_imports_nothing_of_the_project() -> None:
    bad = _offenders(_modules("crypto"), ("p2pspec", "peers", "testnet"))
    assert [b for b in bad if " imports p2pspec.crypto" not in b] == []


def test_core_never_imports_peers_or_testnet() -> None:
    assert _offenders(_modules("p2pspec"), ("p2pspec.peers", "peers", "testnet")) == []


def _pure_core() -> list[Path]:
    core = [p for p in _modules("p2pspec") if p.stem in PURE_CORE and p.parent.name == "p2pspec"]
    assert {p.stem for p in core} == PURE_CORE, "a pure core module was not found"
    return core


def test_pure_core_has_no_trio_libp2p_or_torch() -> None:
    assert _offenders(_pure_core(), ("trio", "libp2p", "torch", "transformers")) == []


def test_pure_core_imports_only_the_standard_library_and_itself() -> None:
    allowed = {f"p2pspec.{m}" for m in PURE_CORE} | {"p2pspec", "p2pspec.crypto"}
    bad = []
    for path in _pure_core():
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "p2pspec":
                module = ".".join(name.split(".")[:2])
                ok = module in allowed
            else:
                ok = top in sys.stdlib_module_names or top in PURE_THIRD_PARTY
            if not ok:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert bad == []


# The one libp2p adapter: the node, and the inbound side of its TCP transport (limits).
LIBP2P_ADAPTER = ("p2pspec/node.py", "p2pspec/inbound.py")


def test_only_the_libp2p_adapter_imports_libp2p() -> None:
    everything = _modules("p2pspec") + _modules("peers") + _modules("crypto")
    bad = [b for b in _offenders(everything, ("libp2p",)) if not b.startswith(LIBP2P_ADAPTER)]
    assert bad == []


def test_drafter_and_verifier_roles_never_import_each_other() -> None:
    drafter = [p for p in _modules("peers") if p.stem == "drafter"]
    verifier = [p for p in _modules("peers") if p.stem == "verifier"]
    assert _offenders(drafter, ("p2pspec.peers.verifier",)) == []
    assert _offenders(verifier, ("p2pspec.peers.drafter",)) == []


def test_nothing_imports_testnet() -> None:
    everything = _modules("p2pspec") + _modules("peers") + _modules("crypto") + _modules("tests")
    assert _offenders(everything, ("testnet",)) == []


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The parser resolves relative imports, so `from ..peers import x` is caught too."""
    fake = ROOT / "p2pspec" / "_layering_probe.py"
    fake.write_text("from .peers import drafter\nimport torch\n")
    try:
        names = _imports(fake)
    finally:
        fake.unlink()
    assert "p2pspec.peers.drafter" in names
    assert "torch" in names
