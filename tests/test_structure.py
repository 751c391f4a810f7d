import pytest
"""The module structure: imports point one way (no cycle, also not through a function-local
import), and the library reads no other module's private names."""
import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGES = {"compress": ROOT / "compress"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _imports(path: Path, name: str, modules: dict) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import statement, at any depth."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub, []) if sub in modules else (base, [alias.name]))
    return [(m, names) for m, names in out if m in modules]


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    graph = {name: sorted({m for m, _ in _imports(path, name, modules)} - {name}) for name, path in modules.items()}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node)
    # the front ends stand on top: only `python -m compress` (and the reference pages, generated from the
    # parser) imports the CLI, only the CLI's commands the recipe runner, and nothing below the front ends
    # imports them
    assert sorted(n for n, deps in graph.items() if "compress.app.cli" in deps) == ["compress.__main__",
                                                                                   "compress.app.reference"]
    assert [n for n, deps in graph.items() if "compress.app.pipeline" in deps] == ["compress.app.commands"]
    assert not [n for n, deps in graph.items() if not n.startswith(("compress.app", "compress.__"))
                and any(d.startswith("compress.app") for d in deps)]


def test_no_module_reads_another_modules_private_names():
    modules = _modules()
    offenders = [f"{name} takes {taken} from {m}" for name, path in modules.items()
                 for m, names in _imports(path, name, modules) for taken in names
                 if taken.startswith("_") and m.rsplit(".", 1)[0] != name.rsplit(".", 1)[0]]
    assert not offenders, offenders


@pytest.mark.slow
def test_export_installs_inside_compress(tmp_path):
    """Away from the checkout, the package is compress.export; no top-level `export` is installed
    to collide with another project's."""
    code = ("import importlib.util, compress.export; print(compress.export.__file__); "
            "print(importlib.util.find_spec('export'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    where, spec = out.stdout.split()[0], out.stdout.split()[-1]
    assert Path(where).resolve() == (ROOT / "compress" / "export" / "__init__.py").resolve() and spec == "None"
