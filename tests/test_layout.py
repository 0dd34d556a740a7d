"""The floors of the code base (README, "Layout"): every import points down a floor or stays on its own.

0 `modeling_mopro` <- 1 `training/data` <- 2 the training core <- 3 `evaluation` <- 4 the entry script
`training/run_mopro.py`. Read from the source with `ast` (imports inside functions count too), so a lazy import
that goes up a floor fails here as well as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("modeling_mopro", "training", "evaluation")


def floor_of(module: str) -> int | None:
    if module.split(".")[0] not in PACKAGES:
        return None  # a library: torch, transformers, ...
    if module.startswith("modeling_mopro"):
        return 0
    if module == "training.data" or module.startswith("training.data."):
        return 1
    if module == "training.run_mopro":
        return 4
    return 2 if module.startswith("training") else 3


def project_imports(path: Path) -> list[str]:
    """The project modules `path` imports, relative imports resolved (`from .x import y` names `pkg.x.y` when that is
    a module of its own, else `pkg.x`)."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    package = parts if path.name == "__init__.py" else parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (package[: len(package) - node.level + 1] if node.level else []) + (
                node.module.split(".") if node.module else []
            )
            for alias in node.names:
                candidate = [*base, alias.name]
                is_module = (REPO.joinpath(*candidate).with_suffix(".py")).is_file()
                found.append(".".join(candidate if is_module else base))
    return [name for name in found if floor_of(name) is not None]


def source_modules() -> list[tuple[str, Path]]:
    out = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return out


@pytest.mark.parametrize("module,path", source_modules(), ids=lambda v: v if isinstance(v, str) else "")
def test_no_import_goes_up_a_floor(module, path):
    upward = [name for name in project_imports(path) if floor_of(name) > floor_of(module)]
    assert not upward, f"{module} (floor {floor_of(module)}) imports from a higher floor: {upward}"


def test_the_floor_rule_sees_a_violation(tmp_path):
    """The checker itself: an upward import written the ways the code base writes imports is found."""
    probe = REPO / "training" / "data" / "_layout_probe.py"
    probe.write_text("def f():\n    from ..trainer import MoProTrainer\n    import evaluation.knn\n")
    try:
        found = project_imports(probe)
    finally:
        probe.unlink()
    assert found == ["training.trainer", "evaluation.knn"]
    assert all(floor_of(name) > floor_of("training.data._layout_probe") for name in found)
