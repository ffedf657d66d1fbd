"""The import rules of docs/architecture.md: each layer imports only the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "sparseml"


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(folder: str) -> list[Path]:
    return sorted((SRC / folder).rglob("*.py")) if folder else sorted(SRC.rglob("*.py"))


def test_the_package_never_imports_timm_or_the_scripts() -> None:
    bad = {
        str(p.relative_to(SRC)): n
        for p in modules("")
        for n in imports(p)
        if n.split(".")[0] in ("timm", "utils", "research")
    }
    assert not bad


def test_kernels_import_only_torch_and_kernels() -> None:
    allowed = ("sparseml.kernels", "sparseml.errors")
    bad = {
        str(p.relative_to(SRC)): n
        for p in modules("kernels")
        for n in imports(p)
        if n.startswith("sparseml") and not n.startswith(allowed)
    }
    assert not bad


def test_curvature_imports_no_pruner_or_lifecycle() -> None:
    bad = {
        str(p.relative_to(SRC)): n
        for p in modules("curvature")
        for n in imports(p)
        if n.startswith(("sparseml.pruning", "sparseml.modifiers", "sparseml.manager"))
    }
    assert not bad


def test_the_manager_and_lifecycle_import_no_pruning_module() -> None:
    files = [SRC / "manager.py", *modules("modifiers")]
    bad = {
        str(p.relative_to(SRC)): n
        for p in files
        for n in imports(p)
        if n.startswith("sparseml.pruning")
    }
    assert not bad


def test_no_pruner_has_more_than_three_project_classes_above_it() -> None:
    from sparseml.pruning import PruningModifier
    from sparseml.registry import modifier_classes

    for name, cls in modifier_classes().items():
        if issubclass(cls, PruningModifier) and cls.__module__.startswith("sparseml."):
            above = [c for c in cls.__mro__[1:] if c.__module__.startswith("sparseml.")]
            assert len(above) <= 4, (name, [c.__name__ for c in above])
            assert [c.__name__ for c in above] == ["PruningModifier", "Modifier", "FieldModel"]


def test_no_method_overrides_validate() -> None:
    """Fields and their checks are declared (FIELDS, CHECKS), not re-validated in overrides."""
    for path in modules("pruning/methods"):
        tree = ast.parse(path.read_text())
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            defined = {f.name for f in cls.body if isinstance(f, ast.FunctionDef)}
            assert "validate" not in defined, f"{path.name}: {cls.name} overrides validate"


def test_every_method_class_is_at_most_150_lines() -> None:
    for path in modules("pruning/methods"):
        for cls in (n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)):
            assert cls.end_lineno - cls.lineno + 1 <= 150, f"{path.name}: {cls.name}"
