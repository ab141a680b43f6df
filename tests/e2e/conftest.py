from __future__ import annotations

from pathlib import Path

import pytest
from helpers import fedsilo_cli


def make_shards(out: Path, *, participants: int, samples: int = 1500, classes: int = 3,
                partition: str = "dirichlet:1.0", seed: int = 0) -> Path:
    job = fedsilo_cli(["prep", "synthetic", "--samples", str(samples), "--classes", str(classes),
                       "--sites", str(participants), "--partition", partition,
                       "--seed", str(seed), "--out", str(out)])
    assert job.returncode == 0, job.output
    return out


@pytest.fixture(scope="session")
def shards3(tmp_path_factory) -> Path:
    """A synthetic 3-site shard set (for 4-rank jobs).  Tests must not modify it."""
    return make_shards(tmp_path_factory.mktemp("shards3") / "set", participants=3)


@pytest.fixture(scope="session")
def shards1(tmp_path_factory) -> Path:
    """A synthetic 1-site shard set (for 2-rank jobs)."""
    return make_shards(tmp_path_factory.mktemp("shards1") / "set", participants=1, samples=800)
