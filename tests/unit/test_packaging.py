"""environment.yml (conda, for clusters) lists the same packages as pyproject.toml."""

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[2]
#: PyPI name -> conda-forge name where they differ
CONDA_NAMES = {"torch": "pytorch"}


def requirement(text: str) -> tuple[str, str]:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(.*?)\s*", text)
    assert match, text
    return match.group(1).lower(), match.group(2).replace(" ", "")


def pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in ("mpi", "test"):
        lines += project["optional-dependencies"][extra]
    return {CONDA_NAMES.get(name, name): spec for name, spec in map(requirement, lines)}


def conda_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    found = {}
    for item in env["dependencies"]:
        if isinstance(item, dict):  # the pip: section
            found.update(requirement(p) for p in item["pip"] if not p.startswith("-"))
        elif not item.startswith(("python", "pip")) or item.startswith("python-"):
            name, spec = requirement(item)
            found[name] = spec
    return found


def test_environment_matches_pyproject():
    assert conda_requirements() == pyproject_requirements()


def test_environment_installs_fedsilo_itself():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    assert "-e ." in pip
