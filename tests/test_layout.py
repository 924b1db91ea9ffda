"""The structure the README promises: a Flower-free, Hydra-free core and short functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fedkws

SRC = Path(fedkws.__file__).parent
FORBIDDEN = ("flwr", "flwr_datasets", "hydra", "omegaconf", "ray")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_modules_import_neither_flower_nor_hydra():
    """Parsed imports of every core module, at any depth of the file (lazy imports included)."""
    for path in sorted((SRC / "core").glob("*.py")):
        bad = {n for n in _imports(path) if n.split(".")[0] in FORBIDDEN}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_importing_the_core_loads_neither_flower_nor_hydra():
    """Transitively too: what the core imports from fedkws.data must not pull them in."""
    modules = [f"fedkws.core.{p.stem}" for p in (SRC / "core").glob("*.py") if p.stem != "__init__"]
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_only_the_spec_reads_the_config():
    """Below the spec nothing reads a DictConfig: no omegaconf import outside the entry points."""
    allowed = {"spec.py", "train.py", "prepare.py", "report.py"}
    for path in sorted(SRC.rglob("*.py")):
        if path.name in allowed:
            continue
        assert "omegaconf" not in {n.split(".")[0] for n in _imports(path)}, path


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function without its docstring."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return 0 if not body else node.end_lineno - body[0].lineno + 1


def test_no_function_is_longer_than_about_sixty_lines():
    lengths = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lengths.append((_code_lines(node), f"{path.relative_to(SRC)}:{node.name}"))
    too_long = [(n, where) for n, where in lengths if n > 60]
    assert not too_long, sorted(too_long, reverse=True)
