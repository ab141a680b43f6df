"""Preparing a shard set one file per task (a SLURM array) gives the serial result exactly."""

import json

import pytest

from fedsilo.errors import ConfigError, DataError
from fedsilo.prep.pipeline import prepare_shards
from fedsilo.prep.synthetic import make_synthetic


def files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("order", [["site:0", "site:1", "site:2", "test"],
                                   ["test", "site:2", "site:0", "site:1"]])
def test_one_file_per_task_equals_serial(tmp_path, order):
    source = make_synthetic(num_samples=600, num_classes=3, seed=4)
    kwargs = dict(participants=3, partition="dirichlet:0.5", seed=4)
    prepare_shards(source, out_dir=tmp_path / "serial", **kwargs)
    results = [prepare_shards(source, out_dir=tmp_path / "array", only=only, **kwargs)
               for only in order]
    # only the task that completed the set wrote (and returned) the manifest
    assert [r is not None for r in results] == [False, False, False, True]
    assert files(tmp_path / "array") == files(tmp_path / "serial")


def test_manifest_waits_for_files_of_this_set(tmp_path):
    source = make_synthetic(num_samples=600, num_classes=3, seed=4)
    prepare_shards(source, out_dir=tmp_path, participants=2, partition="iid", seed=1)
    # a new set with another seed, over the old one: old files must not be vouched for
    assert prepare_shards(source, out_dir=tmp_path, participants=2, partition="iid", seed=2,
                          only="site:0", overwrite=True) is None
    assert not (tmp_path / "manifest.json").exists()
    prepare_shards(source, out_dir=tmp_path, participants=2, partition="iid", seed=2,
                   only="test", overwrite=True)
    assert not (tmp_path / "manifest.json").exists()  # site-001 is still the old set's
    manifest = prepare_shards(source, out_dir=tmp_path, participants=2, partition="iid", seed=2,
                              only="site:1", overwrite=True)
    assert (manifest is not None
            and json.loads((tmp_path / "manifest.json").read_text())["seed"] == 2)


def test_only_is_validated_and_respects_existing_sets(tmp_path):
    source = make_synthetic(num_samples=300, num_classes=2, seed=0)
    with pytest.raises(ConfigError, match="--only must be"):
        prepare_shards(source, out_dir=tmp_path, participants=2, partition="iid", seed=0,
                       only="site:2")
    prepare_shards(source, out_dir=tmp_path, participants=2, partition="iid", seed=0)
    with pytest.raises(DataError, match="already holds a shard set"):
        prepare_shards(source, out_dir=tmp_path, participants=2, partition="iid", seed=0,
                       only="test")
