"""Run ``fedsilo`` with participant RANK opening another key file (key fault tests only).

FEDSILO_TEST_KEY_FILE=RANK:NAME makes MPI rank RANK open DIR/NAME instead of
DIR/participant.key, as if that site had been given a different key.
"""

import os
import sys

rank, name = os.environ["FEDSILO_TEST_KEY_FILE"].split(":")
# the rank from the launcher's environment: under mpirun and in the in-process tier alike
if int(os.environ["OMPI_COMM_WORLD_RANK"]) == int(rank):
    import fedsilo.crypto.ckks as ckks

    ckks.PARTICIPANT_FILE = name

from fedsilo.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
