"""One errors module: every exception class and every user-visible error code live in
p2pspec/core/errors.py, and docs/errors.md is its table."""

from __future__ import annotations

import ast
from pathlib import Path

from p2pspec.core import errors

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for folder in ("p2pspec", "peers") for p in (ROOT / folder).rglob("*.py"))
# Calls whose first argument, or `code=`, is an error code.
CODE_CALLS = {"refuse", "Refuse", "ClientError", "RemoteError", "ErrorMessage", "_BadRequest"}


def _name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _strings(node: ast.expr | None) -> list[str]:
    """The string constants an expression can evaluate to (through `a if c else b`)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _strings(node.body) + _strings(node.orelse)
    return []


def _codes_used(path: Path) -> set[str]:
    """Codes this module refuses or fails with: the arguments of CODE_CALLS, `code =`
    assignments, and the (code, message) pairs that the peers' checks return."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and _name(node.func) in CODE_CALLS:
            found.update(_strings(node.args[0]) if node.args else [])
            found.update(s for kw in node.keywords if kw.arg == "code" for s in _strings(kw.value))
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id in ("code", "REFUSAL_CODE") for t in node.targets
        ):
            found.update(_strings(node.value))
        elif (
            path.parent.name == "peers"
            and isinstance(node, ast.Return)
            and isinstance(node.value, ast.Tuple)
            and len(node.value.elts) == 2
        ):
            found.update(_strings(node.value.elts[0]))
    return found


def test_every_code_the_sources_use_is_listed_with_its_meaning_and_no_other() -> None:
    used = {code: path for path in SOURCES for code in _codes_used(path)}
    # The stream quota's refusals (p2pspec/core/admission.py), written by node.py.
    used |= dict.fromkeys(("too_many_streams", "rate_limited"), ROOT / "p2pspec" / "admission.py")
    assert {"no_drafter", "verifier_failed", "private_mesh", "unknown_session"} <= set(used)
    missing = {c: str(p.relative_to(ROOT)) for c, p in used.items() if c not in errors.CODES}
    assert not missing, f"codes used but not in p2pspec.core.errors.CODES: {missing}"
    assert not set(errors.CODES) - set(used), "codes listed that nothing uses"
    assert all(meaning.endswith(".") for meaning in errors.CODES.values())


def test_docs_errors_md_is_the_rendered_table() -> None:
    assert (ROOT / "docs" / "errors.md").read_text() == errors.codes_markdown()


def test_exception_classes_are_declared_in_the_errors_module_only() -> None:
    """Private helpers of one module (a leading underscore) may stay there; crypto/
    imports nothing of the project and keeps its own."""
    elsewhere = []
    for path in SOURCES:
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ClassDef)
                and not node.name.startswith("_")
                and any(_name(b).endswith(("Error", "Exception")) for b in node.bases)
            ):
                elsewhere.append(f"{path.relative_to(ROOT)}: {node.name}")
    assert not elsewhere, elsewhere


def test_first_error_is_what_trios_nested_exception_groups_wrap() -> None:
    cause = OSError(98, "Address already in use")
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [cause, ValueError()])])
    assert errors.first_error(nested) is cause
    assert errors.first_error(cause) is cause
