"""Masked secure aggregation end to end, as real multi-rank jobs: the masked sum equals the
plaintext one within the fixed-point error (several sites per rank, sites sitting out,
partial participation, DP), every key problem and bad input stops every rank with one
message, the floor on contributors holds, and a resumed run is bit-identical."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_shards
from helpers import fedsilo_cli
from localjobs import local_mpirun
from test_dp_train import crash_copy
from test_faults import assert_agreed_failure

#: the jobs run on ranks forked in-process (tests/localjobs.py; faithful to mpirun by
#: test_local_faithful.py)
pytestmark = [pytest.mark.local, pytest.mark.slow]

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def shards4(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("secure4") / "set", participants=4, samples=800)


def identities(out: Path, sites: int) -> Path:
    job = fedsilo_cli(["keys", "--identity", "--sites", str(sites), "--out", str(out)])
    assert job.returncode == 0, job.output
    return out


@pytest.fixture(scope="module")
def ids4(tmp_path_factory) -> Path:
    return identities(tmp_path_factory.mktemp("ids") / "keys", 4)


def train(shards: Path, out: Path, *extra: str, ranks: int = 3, rounds: int = 2,
          fault: str | None = None):
    argv = ["train", "--set", f"data.dir={shards}", "--set", f"rounds={rounds}",
            "--set", "train.max_steps=2", "--set", "checkpoint.keep=10",
            "--set", "runtime.progress=off", *extra, "--out", str(out)]
    if fault:
        os.environ["FEDSILO_TEST_FAULT"] = fault
    try:
        return local_mpirun(ranks, argv, timeout=240,
                      python_args=(str(HERE / "inject.py"),) if fault else ("-m", "fedsilo"))
    finally:
        os.environ.pop("FEDSILO_TEST_FAULT", None)


def masks(keys: Path, *extra: str) -> list[str]:
    return ["--set", "aggregation.secure=masks", "--set", f"aggregation.keys={keys}", *extra]


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)


def assert_close(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= atol, worst


def test_masked_sum_equals_the_plaintext_sum(shards4, ids4, tmp_path):
    """4 sites on 2 participant ranks (2 each), 3 of 4 sampled per round, site 1 failing its
    first round (skipped): the masked run ends where the float64 plaintext run does, to the
    fixed-point resolution (2^-32 per value, per round)."""
    common = ["--set", "participation.fraction=0.75", "--set", "participation.min=3",
              "--set", "on_participant_error=skip", "--set", "runtime.reduce_dtype=float64"]
    plain = train(shards4, tmp_path / "plain", *common, fault="data:1:2")
    assert plain.returncode == 0, plain.output[-3000:]
    masked = train(shards4, tmp_path / "masked", *common, *masks(ids4), fault="data:1:2")
    assert masked.returncode == 0, masked.output[-3000:]
    assert_close(tmp_path / "plain", tmp_path / "masked", atol=1e-6)
    a, b = rows(tmp_path / "plain"), rows(tmp_path / "masked")
    assert [r["sampled"] for r in a] == [r["sampled"] for r in b]
    assert any(r["dropped"] for r in b), "no site sat out: the test lost its point"
    for row in b:
        assert row["masks"]["bytes_per_param"] == 8.0
        assert row["bytes"]["reduce"] == 8 * 2 * sum(w.numel() for w in
                                                     weights(tmp_path / "masked").values())
        assert row["contributors"] >= 2 and "refused" not in row


def test_masks_compose_with_dp_and_resume_bit_identically(shards4, ids4, tmp_path):
    """Sample-level DP (noise from each site's secret, added before masking) and user-level
    distributed shares: a plaintext run resumed under masks from its round-1 checkpoint
    (same secrets, so the same noise) ends where the plaintext run does; and a masked run
    killed during round 2 and resumed ends bit-identical (integer sums do not depend on the
    order of addition or on the masks)."""
    dp = ["--set", "dp.enabled=true", "--set", "dp.noise_multiplier=1.0",
          "--set", "dp.target_epsilon=null", "--set", "dp.user.enabled=true",
          "--set", "dp.user.noise=distributed", "--set", "dp.user.clip_norm=0.5",
          "--set", "dp.user.noise_multiplier=0.5", "--set", "runtime.reduce_dtype=float64"]
    plain = train(shards4, tmp_path / "plain", *dp)
    assert plain.returncode == 0, plain.output[-3000:]
    switched = crash_copy(tmp_path / "plain", tmp_path / "switched", after_round=1)
    job = local_mpirun(3, ["train", "--resume", str(switched), *masks(ids4)], timeout=240)
    assert job.returncode == 0, job.output[-3000:]
    assert "masks" in rows(switched)[1]
    assert_close(tmp_path / "plain", switched, atol=1e-6)

    crashed = crash_copy(switched, tmp_path / "crashed", after_round=1)
    job = local_mpirun(3, ["train", "--resume", str(crashed)], timeout=240)
    assert job.returncode == 0, job.output[-3000:]
    a, b = weights(switched), weights(crashed)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed masked run differs"


def test_missing_identity_key_stops_every_rank(shards4, ids4, tmp_path):
    keys = Path(shutil.copytree(ids4, tmp_path / "keys"))
    (keys / "site-002.key").unlink()
    job = train(shards4, tmp_path / "run", *masks(keys))
    assert_agreed_failure(job, "KeyFileError", "site-002.key", ranks=3)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_foreign_identity_key_stops_every_rank(shards4, ids4, tmp_path):
    keys = Path(shutil.copytree(ids4, tmp_path / "keys"))
    other = identities(tmp_path / "other", 4)
    (keys / "site-001.key").unlink()
    shutil.copy(other / "site-001.key", keys / "site-001.key")
    job = train(shards4, tmp_path / "run", *masks(keys))
    assert_agreed_failure(job, "does not match the public key listed for site 1", ranks=3)


def test_overflowing_update_is_an_error_on_every_rank(shards4, ids4, tmp_path):
    """An update of 1e6 does not fit 2^62 / 2 ranks at 52 fractional bits: a clear error
    before the Reduce, never a silently wrapped sum (the same update fits at 32 bits)."""
    job = train(shards4, tmp_path / "run", *masks(ids4, "--set", "aggregation.frac_bits=52"),
                fault="huge:2:1")
    assert_agreed_failure(job, "UpdateError", "aggregation.frac_bits", ranks=3)
    assert not (tmp_path / "run" / "checkpoints" / "round-0001" / "coordinator.pt").exists()


def test_a_round_with_too_few_contributors_is_refused(shards4, ids4, tmp_path):
    """Site 2 fails its first round (skipped), so 3 sites contribute; with a floor of 4
    every participant refuses to release the round and the model does not move."""
    job = train(shards4, tmp_path / "floor", *masks(ids4), "--set", "on_participant_error=skip",
                "--set", "aggregation.min_contributors=4", fault="data:2:1", rounds=1)
    assert job.returncode == 0, job.output[-3000:]
    (row,) = rows(tmp_path / "floor")
    assert row["refused"] == "3 contributor(s) < aggregation.min_contributors = 4"
    assert "round 1 is refused by the participants" in job.stderr
    assert "no update of this rank is sent" in job.stderr
    start = torch.load(tmp_path / "floor" / "checkpoints" / "round-0001" / "coordinator.pt",
                       weights_only=True)["weights"]
    torch.manual_seed(0)
    from fedsilo.models import build_model
    from fedsilo.weights import WeightLayout

    model = build_model("small_cnn", in_channels=1, num_classes=3, image_size=(28, 28))
    initial = torch.from_numpy(WeightLayout.of(model).flatten(model).copy())
    assert torch.equal(start, initial), "a refused round moved the model"
