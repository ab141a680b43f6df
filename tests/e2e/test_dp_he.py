"""Differential privacy composed with encrypted aggregation, as real 4-rank jobs: noise is
added locally before encryption, a site out of budget keeps feeding the encrypted tree (an
encrypted zero), and the result equals the same DP run without encryption.

The noise comes from each site's secret, so two runs never draw the same noise: "the same
run" is a plaintext run's checkpoint resumed twice, once in plaintext (the run itself) and
once with encryption switched on, both continuing from the same secrets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import fedsilo_cli
from localjobs import local_mpirun
from test_dp_train import SIGMA, budget_after_two_rounds, crash_copy, dp_args, rows_of

#: the jobs run on ranks forked in-process (tests/localjobs.py; faithful to mpirun by
#: test_local_faithful.py)
pytestmark = [pytest.mark.local, pytest.mark.slow]


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dp-he") / "keys"
    job = fedsilo_cli(["keys", "--out", str(out)])
    assert job.returncode == 0, job.output
    return out


def test_budget_stop_under_encryption_equals_plaintext(shards3: Path, keys: Path, tmp_path):
    budget = budget_after_two_rounds(shards3)
    extra = ["--set", f"dp.noise_multiplier={SIGMA}", "--set", "dp.target_epsilon=1000",
             "--set", f"dp.sites.1.target_epsilon={budget}", "--set", "checkpoint.keep=10"]
    plain = tmp_path / "plain"
    job = local_mpirun(4, dp_args(shards3, plain, *extra), timeout=300)
    assert job.returncode == 0, job.output[-3000:]
    # rounds 3 and 4 again, from the same secrets, encrypted
    encrypted = crash_copy(plain, tmp_path / "encrypted", after_round=2)
    job = local_mpirun(4, ["train", "--resume", str(encrypted), "--set", "he.enabled=true",
                     "--set", f"he.keys={keys}"], timeout=300)
    assert job.returncode == 0, job.output[-3000:]
    assert "participant 1 has spent its privacy budget" in job.stderr

    rows = rows_of(encrypted)
    for row in rows[2:]:  # site 1 sits out from round 3 ...
        assert set(row["participants"]) == {"0", "2"} and row["stopped"] == {"1": 3}
        # ... and, left out of the plan, its rank idles: no ciphertext (two of three; under
        # DP the row holds no per-site size or time), no weights
        assert "ciphertext_bytes" not in row["he"] and "encrypt_s_per_site" not in row["he"]
        numel = sum(t.numel() for t in torch.load(encrypted / "model.pt",
                                                  weights_only=True).values())
        per_param = row["he"]["ciphertext_bytes_total"] / numel  # ~7.6 B per ciphertext
        assert 2 * 6 < per_param < 2 * 9, per_param  # two ciphertexts, not three
        assert "local" not in row["seconds"] and row["seconds"]["round"] == \
            round(row["seconds"]["round"])
        assert row["bytes"]["broadcast"] == 2 * 4 * sum(
            t.numel() for t in torch.load(encrypted / "model.pt", weights_only=True).values())
    assert [r["epsilon"] for r in rows] == [r["epsilon"] for r in rows_of(plain)]
    a = torch.load(plain / "model.pt", weights_only=True)
    b = torch.load(encrypted / "model.pt", weights_only=True)
    for name in a:  # CKKS sums are exact to ~1e-9 per value
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)


def test_user_level_distributed_noise_under_encryption(shards3: Path, keys: Path, tmp_path):
    """Each participant adds its noise share (from its secret) before encrypting, so the
    encrypted round equals the plaintext one to CKKS precision: the noise really is in the
    sum, and encryption moves the coordinator's guarantee from σ/√m to σ."""
    user = ["--set", "dp.user.enabled=true", "--set", "dp.user.noise=distributed",
            "--set", "dp.user.clip_norm=0.5", "--set", "dp.user.noise_multiplier=1.0",
            "--set", "checkpoint.keep=10"]
    plain = tmp_path / "plain"
    job = local_mpirun(4, dp_args(shards3, plain, *user, rounds=2), timeout=300)
    assert job.returncode == 0, job.output[-3000:]
    encrypted = crash_copy(plain, tmp_path / "encrypted", after_round=1)
    job = local_mpirun(4, ["train", "--resume", str(encrypted), "--set", "he.enabled=true",
                     "--set", f"he.keys={keys}"], timeout=300)
    assert job.returncode == 0, job.output[-3000:]
    rows = rows_of(encrypted)
    assert "he" in rows[1] and all(r["user_epsilon"] > 0 for r in rows)
    assert [r["user_epsilon"] for r in rows] == [r["user_epsilon"] for r in rows_of(plain)]
    # against the coordinator: round 1 in plaintext (σ/√3), round 2 encrypted (σ)
    assert rows[1]["user_epsilon_coordinator"] < rows_of(plain)[1]["user_epsilon_coordinator"]
    summary = json.loads((encrypted / "summary.json").read_text())
    assert summary["user_privacy"]["epsilon"] == pytest.approx(rows[-1]["user_epsilon"])
    a = torch.load(plain / "model.pt", weights_only=True)
    b = torch.load(encrypted / "model.pt", weights_only=True)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)
