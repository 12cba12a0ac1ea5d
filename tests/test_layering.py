"""The package's import direction, as a test: each floor imports only the floors below it.

    errors, atomic < ops < models < convert, interop < loading < data, train, eval < config
    < recipes, experiments < cli < __main__

A module may import its own subpackage and any lower floor, never a floor at or above its own (so `train`
cannot import the recipe schema in `config`, and `data`, `train`, `eval` stay independent of each other).
Nothing but the CLI imports `recipes`; no module takes another module's private `_name`. Imports inside
functions count as much as those at the top. The root `arwkv/__init__.py` is the public facade: it reaches the
top floor lazily, by name, and is exempt; from it, a module may take only `__version__`.
"""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "arwkv"

FLOORS: dict[str, int] = {
    "errors": 0,
    "atomic": 0,
    "ops": 1,
    "models": 2,
    "convert": 3,
    "interop": 3,
    "loading": 4,
    "data": 5,
    "train": 5,
    "eval": 5,
    "config": 6,
    "recipes": 7,
    "experiments": 7,
    "cli": 8,
    "__main__": 9,
}
EXEMPT = {"arwkv"}  # the lazy public facade in arwkv/__init__.py
FROM_THE_FACADE = {"__version__"}
ONLY_CLI_IMPORTS = {"recipes": {"cli", "__main__"}, "experiments": set()}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name, e.g. arwkv.train.loop
    imported: str
    line: int
    names: tuple[str, ...] = ()  # for `from X import a, b`

    def where(self) -> str:
        return f"{self.importer}:{self.line} imports {self.imported}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(root: Path) -> list[Import]:
    """Every `import arwkv.x`, `from arwkv.x import y`, relative import and `import_module("arwkv.x")`."""
    found: list[Import] = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            names: tuple[str, ...] = ()
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    targets = [".".join(base + ([node.module] if node.module else []))]
                else:
                    targets = [node.module or ""]
                names = tuple(alias.name for alias in node.names)
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                targets = [node.args[0].value]
            found += [Import(name, t, node.lineno, names) for t in targets if t.split(".")[0] == root.name]
    return found


def floor(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def violations(root: Path) -> list[str]:
    """One line per import that goes sideways or up, into recipes from outside the CLI, or takes another
    module's private (`_name`) helper."""
    bad = []
    for imp in package_imports(root):
        if imp.importer in EXEMPT:
            continue
        if imp.imported == root.name:
            if not imp.names or set(imp.names) - FROM_THE_FACADE:
                bad.append(f"{imp.where()}: take only {sorted(FROM_THE_FACADE)} from the facade")
            continue
        private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
        if private and imp.imported != imp.importer:
            bad.append(f"{imp.where()}: takes private {private}; make it public where it is defined")
        src, dst = floor(imp.importer), floor(imp.imported)
        if src == dst:
            continue
        if src not in FLOORS or dst not in FLOORS:
            unknown = src if src not in FLOORS else dst
            bad.append(f"{imp.where()}: {unknown!r} has no floor in tests/test_layering.py")
        elif dst in ONLY_CLI_IMPORTS and src not in ONLY_CLI_IMPORTS[dst]:
            bad.append(f"{imp.where()}: only the CLI imports arwkv.{dst}")
        elif FLOORS[dst] >= FLOORS[src]:
            bad.append(f"{imp.where()}: floor {src} ({FLOORS[src]}) may not import {dst} ({FLOORS[dst]})")
    return bad


def test_every_subpackage_has_a_floor() -> None:
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert subpackages | modules == set(FLOORS)


def test_the_package_imports_only_downwards() -> None:
    assert package_imports(PACKAGE), "the scan found no imports at all: it is broken"
    assert violations(PACKAGE) == []


def test_train_reads_no_recipe_schema() -> None:
    imports = package_imports(PACKAGE)
    assert not [i for i in imports if floor(i.importer) == "train" and floor(i.imported) == "config"]


def _new_violations(tmp_path: Path, module: str, line: str) -> list[str]:
    """The violations a copy of the package has once `line` is appended to `module`, beyond main's own."""
    root = tmp_path / "arwkv"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__", "*.yaml", "*.json", "*.md"))
    target = root / module
    target.write_text(target.read_text() + "\n" + line + "\n")
    return sorted(set(violations(root)) - set(violations(PACKAGE)))


def test_a_wrong_import_is_caught(tmp_path: Path) -> None:
    """The checker is not vacuous: one upward import inside a function, added to ops, is reported by name."""
    wrong = "def _oops():\n    from arwkv.train.loop import train"
    (found,) = _new_violations(tmp_path, "ops/checks.py", wrong)
    assert "arwkv.ops.checks" in found and "arwkv.train.loop" in found and "floor ops (1)" in found


def test_relative_and_sideways_imports_are_caught(tmp_path: Path) -> None:
    (found,) = _new_violations(tmp_path, "data/chat.py", "from ..eval import stats")
    assert "arwkv.data.chat" in found and "arwkv.eval" in found


def test_only_the_cli_imports_recipes(tmp_path: Path) -> None:
    (found,) = _new_violations(tmp_path, "config.py", "import arwkv.recipes.convert")
    assert "only the CLI imports arwkv.recipes" in found


def test_the_facade_gives_only_the_version(tmp_path: Path) -> None:
    (found,) = _new_violations(tmp_path, "eval/stats.py", "from arwkv import run_recipe")
    assert "take only ['__version__'] from the facade" in found


def test_another_modules_private_helper_is_caught(tmp_path: Path) -> None:
    (found,) = _new_violations(tmp_path, "eval/stats.py", "from arwkv.eval.loglik import _hidden_helper")
    assert "arwkv.eval.stats" in found and "private ['_hidden_helper']" in found
