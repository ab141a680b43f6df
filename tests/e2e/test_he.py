"""Encrypted aggregation end to end: training, and every key problem as an agreed error."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import fedsilo_cli
from localjobs import local_mpirun
from test_faults import assert_agreed_failure

#: the jobs run on ranks forked in-process (tests/localjobs.py; faithful to mpirun by
#: test_local_faithful.py)
pytestmark = [pytest.mark.local, pytest.mark.slow]

HERE = Path(__file__).resolve().parent


def make_keys(out: Path, *extra: str) -> Path:
    job = fedsilo_cli(["keys", "--out", str(out), *extra])
    assert job.returncode == 0, job.output
    return out


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    return make_keys(tmp_path_factory.mktemp("he") / "keys")


def train(shards: Path, out: Path, *extra: str, rounds: int = 2, env: dict | None = None,
          python_args=("-m", "fedsilo")):
    args = ["train", "--set", f"data.dir={shards}", "--set", f"rounds={rounds}",
            "--set", "train.lr=0.05", "--set", "train.batch_size=32", *extra, "--out", str(out)]
    if env:
        os.environ.update(env)
    try:
        return local_mpirun(4, args, timeout=240, python_args=python_args)
    finally:
        for key in env or {}:
            os.environ.pop(key)


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_encrypted_training_matches_plaintext(shards3, keys, tmp_path):
    plain = train(shards3, tmp_path / "plain")
    assert plain.returncode == 0, plain.output[-3000:]
    enc = train(shards3, tmp_path / "enc", "--set", "he.enabled=true", "--set", f"he.keys={keys}")
    assert enc.returncode == 0, enc.output[-3000:]
    assert "WARNING: The input does not fit" not in enc.output

    a, b = rows(tmp_path / "plain"), rows(tmp_path / "enc")
    assert abs(a[-1]["acc"] - b[-1]["acc"]) <= 0.005, (a[-1]["acc"], b[-1]["acc"])
    # the aggregate is exact to ~1e-10 per value: the models agree to float32 noise
    ma = torch.load(tmp_path / "plain" / "model.pt", weights_only=True)
    mb = torch.load(tmp_path / "enc" / "model.pt", weights_only=True)
    for name in ma:
        assert torch.allclose(ma[name], mb[name], atol=1e-4, rtol=1e-3), name

    for row in b:
        he = row["he"]
        assert set(he["ciphertext_bytes"]) == {"0", "1", "2"}
        assert he["ciphertext_bytes_per_param"] <= 8  # seeded, two values per slot
        assert he["encrypt_s"] > 0 and he["reduce_s"] >= 0 and he["decrypt_s"] > 0
        # the coordinator receives every ciphertext (it cannot open them) and the float32
        # aggregate; the one decrypting participant receives only the encrypted total
        assert he["coordinator_receives_bytes"] == sum(he["ciphertext_bytes"].values()) \
            + row["bytes"]["broadcast"] // 3
        # the total: two polynomials where a fresh ciphertext has one and a seed
        fresh = max(he["ciphertext_bytes"].values())
        assert 1.8 * fresh < he["aggregator_receives_bytes"] < 2.2 * fresh
        assert row["bytes"]["reduce"] == sum(he["ciphertext_bytes"].values()) \
            + he["aggregator_receives_bytes"] + row["bytes"]["broadcast"] // 3
        assert he["add_s"] >= 0
    assert "he" not in a[-1]


def test_missing_keys_stop_every_rank(shards3, tmp_path):
    job = train(shards3, tmp_path / "run", "--set", "he.enabled=true",
                "--set", f"he.keys={tmp_path / 'nowhere'}")
    assert_agreed_failure(job, "KeyFileError", "does not exist", "fedsilo keys")


def test_coordinator_given_the_secret_key(shards3, keys, tmp_path):
    bad = Path(shutil.copytree(keys, tmp_path / "keys"))
    shutil.copy(bad / "participant.key", bad / "coordinator.ctx")
    job = train(shards3, tmp_path / "run", "--set", "he.enabled=true", "--set", f"he.keys={bad}")
    assert_agreed_failure(job, "coordinator", "is a participant key file")


def test_participants_with_different_keys(shards3, keys, tmp_path):
    bad = Path(shutil.copytree(keys, tmp_path / "keys"))
    other = make_keys(tmp_path / "other")
    shutil.copy(other / "participant.key", bad / "stolen.key")
    job = train(shards3, tmp_path / "run", "--set", "he.enabled=true", "--set", f"he.keys={bad}",
                env={"FEDSILO_TEST_KEY_FILE": "3:stolen.key"},
                python_args=(str(HERE / "inject_keys.py"),))
    assert_agreed_failure(job, "participants hold different encryption keys", "ranks [3]")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before any training


@pytest.mark.parametrize("other_params, needle", [
    (("--poly-modulus-degree", "4096", "--data-bits", "54", "--scale-bits", "44"),
     "CKKS parameters"),
    ((), "does not belong to the participants' key"),
])
def test_coordinator_context_from_another_key_set(shards3, keys, tmp_path, other_params, needle):
    bad = Path(shutil.copytree(keys, tmp_path / "keys"))
    other = make_keys(tmp_path / "other", *other_params)
    shutil.copy(other / "coordinator.ctx", bad / "coordinator.ctx")
    job = train(shards3, tmp_path / "run", "--set", "he.enabled=true", "--set", f"he.keys={bad}")
    assert_agreed_failure(job, "encryption keys", needle)
