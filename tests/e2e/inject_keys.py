"""Run ``fedsilo`` with participant RANK opening another key file (key fault tests only).

FEDSILO_TEST_KEY_FILE=RANK:NAME makes MPI rank RANK open DIR/NAME instead of
DIR/participant.key, as if that site had been given a different key.
"""

import os
import sys

from mpi4py import MPI

rank, name = os.environ["FEDSILO_TEST_KEY_FILE"].split(":")
if MPI.COMM_WORLD.Get_rank() == int(rank):
    import fedsilo.crypto.ckks as ckks

    ckks.PARTICIPANT_FILE = name

from fedsilo.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
