"""The package structure holds: data flows one way, and no module imports itself in a circle.

Parses the source (top-level and function-local imports alike), so a lazy import cannot hide a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

PACKAGES = ("mdcache", "mdtrain")
# Command modules of mdtrain: none imports another, except the benches, which measure pretrain's step, and
# distill-loss, which computes pretrain's own objective (its `student_loss`) on held-out or stored crops.
COMMANDS = {"mdtrain.pretrain", "mdtrain.finetune", "mdtrain.evaluate", "mdtrain.ffcv_loader", "mdtrain.bench",
            "mdtrain.bench_storage", "mdtrain.distill_loss"}
ALLOWED_COMMAND_IMPORTS = {("mdtrain.bench", "mdtrain.pretrain"), ("mdtrain.bench_storage", "mdtrain.pretrain"),
                           ("mdtrain.bench_storage", "mdtrain.bench"), ("mdtrain.distill_loss", "mdtrain.pretrain")}


def project_imports(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for pkg in packages:
        for path in sorted((root / pkg).glob("*.py")):
            mod = f"{pkg}.{path.stem}" if path.stem != "__init__" else pkg
            deps: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    deps |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:  # relative: from . import x / from .x import y
                        base = f"{pkg}.{base}" if base else pkg
                    deps.add(base)
                    deps |= {f"{base}.{a.name}" for a in node.names}
            graph[mod] = {d for d in deps if d.split(".")[0] in packages and d != mod}
    modules = set(graph)
    return {m: {d for d in ds if d in modules and d != pkg_of(m)} for m, ds in graph.items()}


def pkg_of(mod: str) -> str:
    return mod.split(".")[0]


def test_mdcache_never_imports_mdtrain():
    bad = sorted((m, d) for m, ds in project_imports().items() if m.startswith("mdcache") for d in ds
                 if d.startswith("mdtrain"))
    assert not bad, f"mdcache must not import mdtrain: {bad}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if not state.get(d) and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if not state.get(m) and (found := visit(m)):
            return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(project_imports())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_command_modules_do_not_import_each_other():
    graph = project_imports()
    bad = sorted((m, d) for m, ds in graph.items() if m in COMMANDS for d in ds
                 if d in COMMANDS and (m, d) not in ALLOWED_COMMAND_IMPORTS)
    assert not bad, f"command modules import other command modules: {bad}"


def test_the_checker_sees_a_lazy_cycle(tmp_path):
    """Negative control: a cycle hidden behind a function-local import is found."""
    pkg = tmp_path / "pkgx"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n    return g\n")
    assert find_cycle(project_imports(tmp_path, ("pkgx",))) == ["pkgx.a", "pkgx.b", "pkgx.a"]


def test_the_mdcache_cli_starts_without_torch(tmp_path):
    """`mdcache --help`, `ls`, `info`, `plan`, `gc` and `rm` took about 3 s, 2 of them importing torch: none of
    them runs a tensor op. Importing the CLI and running `plan` and `ls` imports neither torch, timm nor
    open_clip (a fresh process: this one has them loaded)."""
    import json
    import subprocess
    import sys

    probe = ("import sys, json, runpy\n"
             "import mdcache.cli\n"
             "for argv in (['plan'], ['ls', sys.argv[1]]):\n"
             "    sys.argv = ['mdcache', *argv]\n"
             "    try:\n"
             "        runpy.run_module('mdcache', run_name='__main__')\n"
             "    except SystemExit:\n"
             "        pass\n"
             "print(json.dumps([m for m in ('torch', 'timm', 'open_clip') if m in sys.modules]), file=sys.stderr)\n")
    p = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stderr.strip().splitlines()[-1]) == [] and "no caches under" in p.stdout
