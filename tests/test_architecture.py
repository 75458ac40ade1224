"""The package tree is the architecture (docs/architecture.md): the layer contracts of setup.cfg
hold (lint-imports), no two modules import each other through any chain, and bip/ stays small
at its top level."""
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    out = subprocess.run([exe, "--config", str(ROOT / "setup.cfg")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def _cycles(graph, modules) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan). An edge between a
    package's __init__ and its own submodules is left out: a registry package imports its
    members so that they register, and they import the registry (bip.models, bip.data)."""
    def edges(m):
        return [t for t in graph.find_modules_directly_imported_by(m)
                if t in modules and not (t.startswith(m + ".") or m.startswith(t + "."))]
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    sys.setrecursionlimit(10000)
    for m in sorted(modules):
        if m not in index:
            visit(m)
    return out


@pytest.mark.parametrize("package", ["bip", "launch"])
def test_no_module_import_cycles(package):
    graph = grimp.build_graph(package)
    modules = {m for m in graph.modules if m == package or m.startswith(package + ".")}
    assert _cycles(graph, modules) == []


def test_the_cycle_check_finds_a_cycle():
    graph = grimp.ImportGraph()
    for m in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(m)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.a")
    graph.add_import(importer="p", imported="p.c")   # a registry importing its member
    graph.add_import(importer="p.c", imported="p")   # and the member the registry
    assert _cycles(graph, {"p", "p.a", "p.b", "p.c"}) == [["p.a", "p.b"]]


def test_bip_has_few_top_level_entries():
    entries = sorted(p.name for p in (ROOT / "bip").iterdir() if p.name != "__pycache__")
    assert len(entries) <= 12, entries
