"""Who imports whom inside e2kd: ``python tools/imports.py`` (``--names`` adds what each import takes).

For every core module (``e2kd/*.py``, ``e2kd/data/*.py``): how many other core modules import it, and
which. Read from the source (``ast``), imports inside functions included; nothing is executed. A
module imported by more than half the core for a single helper is a hub a leaf concern should leave.
"""

from __future__ import annotations

import argparse
import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / "e2kd").rglob("*.py")) if "configs" not in p.parts}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> dict[str, set[str]]:
    """{imported core module: names taken from it}."""
    found: dict[str, set[str]] = defaultdict(set)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    found[alias.name].add("*module*")
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, path, node)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in known:  # ``from . import mixup``
                    found[sub].add("*module*")
                elif source in known:
                    found[source].add(alias.name)
    found.pop(module, None)
    return found


def importers() -> dict[str, dict[str, set[str]]]:
    """{module: {importing module: names it takes}}."""
    modules = core_modules()
    by: dict[str, dict[str, set[str]]] = {m: {} for m in modules}
    for module, path in modules.items():
        for imported, names in imports_of(module, path, set(modules)).items():
            by[imported][module] = names
    return by


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", action="store_true", help="list the names each importer takes")
    args = parser.parse_args()
    by = importers()
    total = len(by)
    print(f"{total} core modules; imported by (of the other {total - 1}):")
    for module, users in sorted(by.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        line = f"{len(users):3d}  {module}"
        if args.names:
            line += "  <- " + "; ".join(
                f"{u.removeprefix('e2kd.')}: {', '.join(sorted(n))}" for u, n in sorted(users.items())
            )
        print(line)


if __name__ == "__main__":
    main()
