"""The import layering of design.md, enforced by parsing every module's imports."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The pure core is p2pspec/core/: no trio, no libp2p, no torch; it imports the standard
# library, msgspec, numpy, crypto/ and itself only.
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


def test_the_library_never_imports_peers_or_testnet() -> None:
    """The peers' roles sit on the library; only the tooling above both (benchmarks of
    the roles, as docs/architecture.md's top layer) may import them."""
    library = [p for p in _modules("p2pspec") if "tools" not in p.relative_to(ROOT).parts]
    assert _offenders(library, ("p2pspec.peers", "peers", "testnet")) == []
    assert _offenders(_modules("p2pspec/tools"), ("testnet",)) == []


def _pure_core() -> list[Path]:
    core = [p for p in _modules("p2pspec/core") if p.stem != "__init__"]
    assert len(core) >= 12, "the pure core's modules were not found"
    return core


def test_pure_core_has_no_trio_libp2p_or_torch() -> None:
    assert _offenders(_pure_core(), ("trio", "libp2p", "torch", "transformers")) == []


def test_pure_core_imports_only_the_standard_library_and_itself() -> None:
    bad = []
    for path in _pure_core():
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "p2pspec":
                ok = name == "p2pspec" or name.startswith(("p2pspec.core", "p2pspec.crypto"))
            else:
                ok = top in sys.stdlib_module_names or top in PURE_THIRD_PARTY
            if not ok:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert bad == []


# The one libp2p adapter: the node, its streams and addresses, the private mesh's exchange,
# and the inbound side of its TCP transport (limits); and its in-memory stand-in for tests
# (memory.py), which raises libp2p's stream errors where a libp2p stream would.
LIBP2P_ADAPTER = tuple(
    f"p2pspec/net/{m}.py"
    for m in ("node", "dial", "streams", "addrs", "inbound", "members", "memory")
)


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


# -- the layers of docs/architecture.md ---------------------------------------------------


def _layer_table() -> list[tuple[str, list[str]]]:
    """(layer, modules) rows of docs/architecture.md's table in order: a layer may import
    from itself and the layers before it."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("<!-- layers:begin -->")[1].split("<!-- layers:end -->")[0]
    rows = []
    for line in table.strip().splitlines()[2:]:
        layer, _what, modules = (cell.strip() for cell in line.strip("|").split("|"))
        rows.append((layer, [m.strip("` ") for m in modules.split(",")]))
    return rows


def _module_name(path: Path) -> str:
    """The dotted name the project imports `path` by (peers/ is p2pspec.peers)."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("peers", "crypto"):
        parts = ["p2pspec", *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_module_is_in_exactly_one_layer_of_the_architecture_doc() -> None:
    listed = [m for _, modules in _layer_table() for m in modules]
    assert len(listed) == len(set(listed)), "a module is listed twice"
    files = _modules("p2pspec") + _modules("peers") + _modules("crypto")
    actual = {str(p.relative_to(ROOT).with_suffix("")) for p in files}
    assert set(listed) == actual, (set(listed) - actual, actual - set(listed))
    core = {m for layer, mods in _layer_table() if layer == "core" for m in mods}
    assert core == {str(p.relative_to(ROOT).with_suffix("")) for p in _modules("p2pspec/core")}


def test_imports_go_one_way_down_the_layers() -> None:
    rank: dict[str, int] = {}
    for i, (_layer, modules) in enumerate(_layer_table()):
        for m in modules:
            rank[_module_name(ROOT / f"{m}.py")] = i
    bad = []
    for path in _modules("p2pspec") + _modules("peers") + _modules("crypto"):
        here = _module_name(path)
        for name in _imports(path):
            # The longest listed module the imported name starts with (a module, or a
            # name inside one); the bare package only for its own names (__version__).
            target = max(
                (m for m in rank if name == m or name.startswith(m + ".")), key=len, default=None
            )
            if target is not None and target != "p2pspec" and rank[target] > rank[here]:
                bad.append(f"{here} ({_layer_table()[rank[here]][0]}) imports {target}")
    assert bad == []


def test_the_token_path_of_the_architecture_doc_names_modules_that_exist() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    diagram = text.split("## A token's path")[1].split("```")[1]
    paths = re.findall(r"[\w/]+\.py", diagram)
    assert len(paths) >= 15
    missing = [
        p
        for p in paths
        if not (ROOT / (p if p.startswith(("peers/", "crypto/")) else f"p2pspec/{p}")).is_file()
    ]
    assert missing == []
