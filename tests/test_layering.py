"""The package's import layers: no import circle, each module imports only lower layers.

The layers are documented in :data:`nngf_fem.control.LAYERS`. The static check reads
every import statement (module level and inside functions) of every module; the dynamic
check imports low modules in a fresh interpreter without the package's ``__init__`` and
lists what they pull in.
"""

import nngf_fem as nf  # noqa: I001

import ast
import json
import pathlib
import subprocess
import sys

import pytest

from nngf_fem.control import LAYERS

PKG = pathlib.Path(nf.__file__).parent


def _name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] or ["__init__"]
    return ".".join(parts)


def _module_names() -> list[str]:
    return sorted(_name(p) for p in PKG.rglob("*.py"))


def _resolve(target: str) -> str:
    """Layer key of an imported ``nngf_fem...`` name (a submodule or the package)."""
    rest = target.removeprefix("nngf_fem").lstrip(".")
    while rest and rest not in LAYERS:
        rest = rest.rpartition(".")[0]
    return rest or "__init__"


def _imports(path: pathlib.Path) -> set[str]:
    me = _name(path)
    package = me if path.name == "__init__.py" and me != "__init__" else me.rpartition(".")[0]
    return _imports_of(path.read_text(), me, package)


def _imports_of(source: str, me: str, package: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(["nngf_fem", *base, *(node.module or "").split(".")]).rstrip(".")
            else:
                mod = node.module or ""
            # "from nngf_fem import io": the submodule, when it is one
            names = [f"{mod}.{a.name}" if f"{mod}.{a.name}".removeprefix("nngf_fem.")
                     in LAYERS else mod for a in node.names]
        else:
            continue
        found |= {n for n in names if n == "nngf_fem" or n.startswith("nngf_fem.")}
    return {_resolve(n) for n in found} - {me}


def test_every_module_has_a_layer():
    missing = [m for m in _module_names() if m not in LAYERS]
    assert not missing, f"add these modules to nngf_fem.control.LAYERS: {missing}"
    stale = [m for m in LAYERS if m not in _module_names()]
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


def test_imports_go_down_the_layers():
    bad = []
    for path in PKG.rglob("*.py"):
        me = _name(path)
        for dep in _imports(path):
            if LAYERS[dep] >= LAYERS[me]:
                bad.append(f"{me} (layer {LAYERS[me]}) imports {dep} (layer {LAYERS[dep]})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle():
    graph = {_name(p): _imports(p) for p in PKG.rglob("*.py")}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack, node, dep]))
            if state.get(dep) is None:
                visit(dep, [*stack, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_the_checker_sees_upward_and_lazy_imports():
    """The static check is not vacuous: lazy, relative and package imports are found."""
    src = ("import numpy\n"
           "from nngf_fem.mpi import raise_on_any\n"
           "def f():\n"
           "    from nngf_fem.flow import NaturalGradientFlow\n"
           "    from . import io\n"
           "    from .classical import tao\n"
           "    import nngf_fem as nf\n")
    assert _imports_of(src, "energies", "") == {"mpi", "flow", "io", "classical.tao",
                                                 "__init__"}
    assert _imports_of("from .fe_control import FEControl\n", "classical.tao",
                       "classical") == {"classical.fe_control"}


ISOLATED = ["control", "metrics", "energies", "pde", "flow"]


@pytest.mark.skip_in_parallel
@pytest.mark.parametrize("module", ISOLATED)
def test_module_imports_in_isolation(module):
    """Import ``nngf_fem.<module>`` without the package __init__: only lower layers load."""
    code = f"""
import importlib, json, sys, types
pkg = types.ModuleType("nngf_fem")
pkg.__path__ = [{str(PKG)!r}]
sys.modules["nngf_fem"] = pkg
importlib.import_module("nngf_fem._backend")
importlib.import_module("nngf_fem.{module}")
print(json.dumps(sorted(m for m in sys.modules if m.startswith("nngf_fem."))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    loaded = {_resolve(m) for m in json.loads(out.strip().splitlines()[-1])} - {"_backend"}
    upward = sorted(m for m in loaded - {module} if LAYERS[m] >= LAYERS[module])
    assert not upward, f"importing nngf_fem.{module} loads higher layers: {upward}"
    assert module in loaded
