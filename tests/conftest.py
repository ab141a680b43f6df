"""Makes ``tests/helpers.py`` importable from every test folder."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: scripts run under mpirun or as a patched ``fedsilo`` command, not modules to import
#: (--doctest-modules would import them)
collect_ignore_glob = ["mpi/suite_*.py", "mpi/harness.py", "e2e/inject*.py",
                       "unit/local_comm_script.py",
                       "multinode/deadline_job.py"]
