"""The import rules of STYLE.md: one package owns MPI, one module owns HDF5, pure maths
imports neither torch nor mpi4py nor h5py.

Two checks.  The static one reads each file's own import statements (who may name
mpi4py, h5py, tenseal, pydicom, Pillow).  The honest one imports each pure module in a fresh
interpreter and looks at ``sys.modules``: a module that names no heavy package itself but
imports one that does (``privacy/accounting.py`` through Opacus, for instance) is caught.
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
