"""The import rules of STYLE.md: one package owns MPI, one module owns HDF5, pure maths
imports neither torch nor mpi4py."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "src" / "fedsilo").rglob("*.py")) + sorted((ROOT / "data_prep").rglob("*.py"))

PURE = ["fedsilo/aggregate.py", "fedsilo/metrics.py", "fedsilo/partition.py", "fedsilo/registry.py",
        "fedsilo/grouping.py", "data_prep/plan.py",
        "fedsilo/errors.py", "fedsilo/strategies/", "fedsilo/privacy/accounting.py",
        "fedsilo/privacy/userlevel.py", "fedsilo/privacy/secret.py", "fedsilo/privacy/budget.py",
        "fedsilo/crypto/params.py", "fedsilo/crypto/masks.py", "fedsilo/crypto/identity.py",
        "fedsilo/crypto/codec.py", "fedsilo/transport.py"]


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
    if any(name.startswith(p) for p in PURE):
        assert not imports & {"torch", "mpi4py", "h5py"}, f"{name} must stay pure: {imports}"
    if name.startswith("data_prep/"):
        assert not imports & {"torch", "mpi4py"}, f"{name} must not need torch or MPI: {imports}"
    if "pydicom" in imports:
        assert name == "data_prep/dicom.py", f"{name} imports pydicom outside data_prep/dicom.py"
    if "PIL" in imports:
        assert name in ("data_prep/images.py", "data_prep/dicom.py"), f"{name} imports Pillow"
