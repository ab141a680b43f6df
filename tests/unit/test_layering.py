"""The import rules of STYLE.md: one package owns MPI, one module owns HDF5, pure maths
imports neither torch nor mpi4py nor h5py; the import graph of fedsilo has no cycle and no
import from a lower layer to a higher one (issue #25).

Three checks.  The static one reads each file's own import statements (who may name
mpi4py, h5py, tenseal, pydicom, Pillow).  The honest one imports each pure module in a fresh
interpreter and looks at ``sys.modules``: a module that names no heavy package itself but
imports one that does (``privacy/accounting.py`` through Opacus, for instance) is caught.
The graph one reads every ``import fedsilo...`` of every module, those at module level and
those inside functions (run later, but a cycle or an upward dependency all the same), and
checks them against the layers of ``LAYERS``.
"""

import ast
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = (sorted((ROOT / "src" / "fedsilo").rglob("*.py"))
           + sorted((ROOT / "data_prep").rglob("*.py")))

#: pure maths and small policy modules: numpy (and cryptography, yaml) at most
PURE_MODULES = [
    "fedsilo.aggregate", "fedsilo.metrics", "fedsilo.registry", "fedsilo.errors",
    "fedsilo.seeds", "fedsilo.messages", "fedsilo.transport", "fedsilo.participation",
    "fedsilo.config", "fedsilo.strategies", "fedsilo.privacy.userlevel",
    "fedsilo.privacy.secret", "fedsilo.crypto.params", "fedsilo.crypto.masks",
    "fedsilo.crypto.identity", "fedsilo.crypto.codec", "fedsilo.prep.partition",
    "fedsilo.prep.grouping", "fedsilo.prep.plan", "fedsilo.selection",
]
#: what a pure module must not pull in, directly or through anything it imports
HEAVY = ("torch", "mpi4py", "h5py", "tenseal", "opacus", "torchvision")
#: not pure, said plainly: the DP accountants wrap Opacus's, and Opacus imports torch
NOT_PURE = {"fedsilo.privacy.accounting": "opacus"}
#: the prep tools never need torch or MPI (they run on login nodes and laptops)
NO_TORCH_OR_MPI = ["fedsilo.prep.cli", "fedsilo.prep.pipeline", "fedsilo.prep.medmnist",
                   "fedsilo.prep.images", "fedsilo.prep.dicom", "fedsilo.prep.records",
                  "fedsilo.prep.segmentation"]

#: imports each module in turn in one fresh interpreter and records what each import added:
#: the first module that pulls a heavy package in is the one it is attributed to
#: a plain run (no DP, no encryption, a small CNN) in the order a rank imports: the launch
#: and configuration stages (nothing heavy: bad input is reported before torch loads), then
#: the roles (torch, but no torchvision, Opacus, TenSEAL or matplotlib)
PLAIN_RUN = ["fedsilo.cli", "fedsilo.federation", "fedsilo.coordinator", "fedsilo.participant",
             "fedsilo.models"]

_PROBE = """
import importlib, json, sys
seen, added = set(sys.modules), {}
for name in sys.argv[1:]:
    importlib.import_module(name)
    added[name] = sorted({m.split(".")[0] for m in set(sys.modules) - seen})
    seen = set(sys.modules)
print(json.dumps(added))
"""


def _loaded(modules: list[str]) -> dict[str, set[str]]:
    """For each of ``modules``, the top-level packages its import added, in a fresh
    interpreter that imports them in order."""
    result = subprocess.run([sys.executable, "-c", _PROBE, *modules], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, f"import failed:\n{result.stderr[-2000:]}"
    return {k: set(v) for k, v in json.loads(result.stdout.splitlines()[-1]).items()}


@pytest.fixture(scope="module")
def loaded() -> dict[str, set[str]]:
    groups = [PURE_MODULES, NO_TORCH_OR_MPI, PLAIN_RUN] + [[m] for m in NOT_PURE]
    with ThreadPoolExecutor(max_workers=len(groups)) as pool:
        return {k: v for found in pool.map(_loaded, groups) for k, v in found.items()}


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_modules_load_no_heavy_package(loaded, module):
    heavy = sorted(loaded[module] & set(HEAVY))
    assert not heavy, f"{module} is meant to be pure but importing it loads {heavy}"


@pytest.mark.parametrize("module, why", sorted(NOT_PURE.items()))
def test_modules_said_not_pure_really_are_not(loaded, module, why):
    """If one of these became pure, move it to PURE_MODULES: the list must stay honest."""
    assert why in loaded[module], f"{module} no longer loads {why}: list it as pure"


@pytest.mark.parametrize("module", NO_TORCH_OR_MPI)
def test_prep_loads_neither_torch_nor_mpi(loaded, module):
    assert not loaded[module] & {"torch", "mpi4py"}, module


def test_the_import_budget_of_a_plain_run(loaded):
    """What a rank of a plain run pays for at start-up (issue #16: torchvision, Opacus and
    TenSEAL cost 5 s a rank and a plain run needs none of them)."""
    before_roles = loaded["fedsilo.cli"] | loaded["fedsilo.federation"]
    heavy = before_roles & {"torch", "torchvision", "opacus", "tenseal", "matplotlib"}
    assert not heavy, f"launch and configuration import {sorted(heavy)}"
    everything = set().union(*(loaded[m] for m in PLAIN_RUN))
    assert "torch" in everything  # the test would pass vacuously if nothing was imported
    unused = everything & {"torchvision", "opacus", "tenseal", "matplotlib", "scipy",
                           "tensorboard"}
    assert not unused, f"a plain run imports {sorted(unused)}"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix().removeprefix("src/")


def test_sources_found():
    assert len(SOURCES) > 20


@pytest.mark.parametrize("path", SOURCES, ids=rel)
def test_import_rules(path):
    name, imports = rel(path), imported_modules(path)
    if "mpi4py" in imports:
        assert name.startswith("fedsilo/comm/"), f"{name} imports mpi4py outside fedsilo.comm"
    if "h5py" in imports:
        assert name.startswith("fedsilo/shards/"), f"{name} imports h5py outside fedsilo.shards"
    if "tenseal" in imports:
        assert name == "fedsilo/crypto/ckks.py", f"{name} imports tenseal"
    if "data_prep" in imports:
        pytest.fail(f"{name} imports data_prep: it is installed as fedsilo.prep")
    if "pydicom" in imports:
        assert name == "data_prep/dicom.py", f"{name} imports pydicom outside data_prep/dicom.py"
    if "PIL" in imports:
        assert name in ("data_prep/images.py", "data_prep/dicom.py"), f"{name} imports Pillow"


def test_checking_a_configuration_imports_no_torch():
    """Rank 0 checks the configuration (the model's name among them) before anything is
    checked or agreed; importing torch there kept every other rank waiting ~2 s on 2 cores
    and put torch before the shard checks (issue #16).  A ``tv:`` name and its weights are
    checked from torchvision's source, not by importing it (issue #25)."""
    probe = ("import sys\nfrom fedsilo.config import load_config\n"
             "for name in ('small_cnn', 'dp_cnn', 'resnet18', 'tv:resnet50', 'tv:vit_b_16'):\n"
             "    load_config(None, overrides=[f'model.name={name}', 'dp.enabled=true'])\n"
             "    load_config(None, overrides=[f'model.name={name}'])\n"
             "load_config(None, overrides=['model.name=tv:resnet50',\n"
             "                             'model.weights=IMAGENET1K_V2'])\n"
             "try:\n"
             "    load_config(None, overrides=['model.name=tv:resnet05'])\n"
             "except Exception as exc:\n"
             "    assert 'did you mean tv:resnet50' in str(exc), exc\n"
             "print(sorted(m for m in ('torch', 'torchvision', 'opacus', 'tenseal', 'mpi4py')\n"
             "             if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", result.stdout


#: who may import these packages (paths relative to src/, or data_prep/)
ALLOWED_IMPORTERS = {
    # DP-SGD and its accountants; the DP fix of a model (ModuleValidator)
    "opacus": {"fedsilo/privacy/accounting.py", "fedsilo/privacy/engine.py",
               "fedsilo/privacy/validate.py", "fedsilo/models/adapt.py"},
    # models, augmentation, torchvision's datasets for prep; tvnames only as the fallback
    # where torchvision's source cannot be read (inside a function)
    "torchvision": {"fedsilo/models/torchvision.py", "fedsilo/models/resnet.py",
                    "fedsilo/augment.py", "data_prep/tvdatasets.py", "fedsilo/config/tvnames.py"},
    # identity keys, pairwise masks, the sites' DP secret
    "cryptography": {"fedsilo/crypto/identity.py", "fedsilo/crypto/masks.py",
                     "fedsilo/privacy/secret.py"},
}


@pytest.mark.parametrize("package", sorted(ALLOWED_IMPORTERS))
def test_heavy_packages_are_imported_only_where_allowed(package):
    importers = {rel(path) for path in SOURCES if package in imported_modules(path)}
    assert importers, f"nothing imports {package}: the rule is stale"
    stray = sorted(importers - ALLOWED_IMPORTERS[package])
    assert not stray, f"{package} imported outside its modules: {stray}"


#: layers, lowest first: a module imports from its own layer and those below it, never from
#: one above.  A module belongs to the layer of its longest prefix listed here; a new module
#: fails ``test_every_module_has_a_layer`` until it is placed
LAYERS: list[tuple[str, list[str]]] = [
    ("core", ["fedsilo", "fedsilo.errors", "fedsilo.registry", "fedsilo.seeds", "fedsilo.log"]),
    ("configuration", ["fedsilo.config"]),
    ("foundations: maths, formats, MPI, records", [
        "fedsilo.aggregate", "fedsilo.metrics", "fedsilo.messages", "fedsilo.participation",
        "fedsilo.selection", "fedsilo.verification", "fedsilo.crypto", "fedsilo.shards",
        "fedsilo.prep", "fedsilo.rundir", "fedsilo.checkpointfile", "fedsilo.comm",
        "fedsilo.stopping", "fedsilo.boardlog", "fedsilo.progress", "fedsilo.weights",
        "fedsilo.runtime"]),
    ("plug-ins and local training", [
        "fedsilo.models", "fedsilo.strategies", "fedsilo.privacy", "fedsilo.augment",
        "fedsilo.loading", "fedsilo.training", "fedsilo.segmentation", "fedsilo.tasks",
        "fedsilo.modelfile"]),
    ("the round", ["fedsilo.transport", "fedsilo.roles", "fedsilo.report", "fedsilo.coordinator",
                   "fedsilo.participant", "fedsilo.federation"]),
    ("tools", ["fedsilo.cli", "fedsilo.__main__", "fedsilo.baseline", "fedsilo.personalize",
               "fedsilo.predict", "fedsilo.export", "fedsilo.audit_cli", "fedsilo.demo",
               "fedsilo.segdemo", "fedsilo.launch", "fedsilo.runrecords", "fedsilo.runreport",
               "fedsilo.runplots"]),
]


def module_name(path: Path) -> str:
    """``src/fedsilo/config/io.py`` -> ``fedsilo.config.io``; data_prep is ``fedsilo.prep``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts = ["fedsilo", "prep", *parts[1:]] if parts[0] == "data_prep" else parts[1:]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


#: the graph's modules: prep once, as data_prep (src/fedsilo/prep is a link to it)
MODULES = {module_name(p): p for p in SOURCES if "fedsilo/prep/" not in p.as_posix()}


def _resolve(name: str) -> str | None:
    """The module an imported name lives in (``fedsilo.config.load_config`` ->
    ``fedsilo.config``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def fedsilo_imports(module: str) -> list[tuple[str, bool]]:
    """Each fedsilo module ``module`` imports, and whether inside a function (imports under
    ``if TYPE_CHECKING:`` are for the type checker and never run)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{alias.name}" for alias in child.names]
            for name in names:
                target = _resolve(name) if name.startswith("fedsilo") else None
                if target and target != module:
                    found.append((target, inner))
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def layer_of(module: str) -> int | None:
    best, layer = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module.startswith(prefix + ".") and prefix != "fedsilo"  # not everything
            if (module == prefix or inside) and len(prefix) > best:
                best, layer = len(prefix), index
    return layer


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, bool]]]:
    return {module: fedsilo_imports(module) for module in MODULES}


def test_the_graph_sees_the_imports(graph):
    """The walk itself: it finds a known module-level and a known in-function import."""
    assert ("fedsilo.errors", False) in graph["fedsilo.config.schema"]
    assert ("fedsilo.config.tvnames", True) in graph["fedsilo.config.model"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if layer_of(m) is None)
    assert not missing, f"place these modules in LAYERS: {missing}"


def test_the_import_graph_has_no_cycle(graph):
    """Counted twice: over module-level imports (a cycle there can fail at import time) and
    over every import, those inside functions too (a cycle all the same: neither module can
    be understood, tested or moved without the other)."""
    top = {m: {t for t, inner in found if not inner} for m, found in graph.items()}
    every = {m: {t for t, _ in found} for m, found in graph.items()}
    assert (cycles(top), cycles(every)) == ([], [])


def test_no_import_runs_up_the_layers(graph):
    upward = sorted(f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
                    + (" in a function" if inner else "")
                    for m, found in graph.items() for t, inner in found
                    if layer_of(m) is not None and layer_of(t) is not None
                    and layer_of(t) > layer_of(m))
    assert not upward, "\n".join(upward)


def test_no_config_module_imports_a_model_or_a_strategy(graph):
    """The configuration finds plug-ins through its registries (``config/plugins.py``)."""
    wrong = sorted((m, t) for m, found in graph.items() if m.startswith("fedsilo.config")
                   for t, _ in found if t.startswith(("fedsilo.models", "fedsilo.strategies")))
    assert not wrong
