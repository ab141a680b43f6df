"""The CMake/CTest entry point: configure with the installed MPI and Python, run the suites."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

pytestmark = [pytest.mark.mpi, pytest.mark.slow]


def test_cmake_configures_and_ctest_passes(tmp_path: Path) -> None:
    assert shutil.which("cmake") and shutil.which("ctest"), "cmake is part of the test setup"
    build = tmp_path / "build"
    configure = subprocess.run(["cmake", "-S", str(REPO), "-B", str(build),
                                f"-DPython3_EXECUTABLE={sys.executable}"],
                               capture_output=True, text=True, timeout=300)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    assert "mpi4py loads" in configure.stdout
    listing = subprocess.run(["ctest", "--test-dir", str(build), "-N"], capture_output=True,
                             text=True, timeout=60).stdout
    assert ("unit" in listing and "mpi.suite_world.np2" in listing
            and "mpi.suite_world.np4" in listing)
    # one registered MPI suite, run through CTest's own mpiexec line (the suites themselves
    # and the unit tests run in this pytest session already: tests/mpi/test_suites.py)
    run = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure",
                          "-R", "^mpi.suite_world.np2$"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    assert "100% tests passed, 0 tests failed out of 1" in run.stdout
