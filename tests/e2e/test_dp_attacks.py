"""Attacks on the DP guarantees, written as an adversary would mount them, with only what
that adversary holds.  Each test fails on a fedsilo whose privacy does not hold.

The noise attack (finding 1 of the DP issue): a reader of the run directory knows the
config (seed, learning rate), σ, q and the step count (summary.json, metrics.jsonl), the
shard sizes (manifest.json) and the model before and after a round.  If the DP-SGD noise
came from a generator seeded by public values, the reader could regenerate it and strip it
from the participant's update, leaving the noise-free sum of clipped gradients.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import fedsilo_cli
from localjobs import local_mpirun

#: the jobs run on ranks forked in-process (tests/localjobs.py; faithful to mpirun by
#: test_local_faithful.py)
pytestmark = [pytest.mark.local, pytest.mark.slow]

STEPS, BATCH, SIGMA, LR = 5, 16, 0.8, 0.1


def dp_run(shards: Path, out: Path, *extra: str, rounds: int = 1) -> None:
    """One participant (so the global step is that participant's update), dp_cnn, plain
    SGD without momentum (so the update is linear in the noise)."""
    job = local_mpirun(2, ["train", "--set", f"data.dir={shards}", "--set", f"rounds={rounds}",
                     "--set", "model.name=dp_cnn", "--set", f"train.lr={LR}",
                     "--set", "train.momentum=0", "--set", f"train.batch_size={BATCH}",
                     "--set", f"train.max_steps={STEPS}", "--set", "dp.enabled=true",
                     "--set", "dp.target_epsilon=null",
                     "--set", f"dp.noise_multiplier={SIGMA}", "--set", "checkpoint.keep=5",
                     *extra, "--out", str(out)], timeout=300)
    assert job.returncode == 0, job.output[-4000:]


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[k].reshape(-1).double() for k in sorted(state)])


def public_view(run: Path, shards: Path) -> dict:
    """Everything a reader of the run directory learns, as the attack needs it."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    privacy = json.loads((run / "summary.json").read_text())["privacy"]["0"]
    manifest = json.loads((shards / "manifest.json").read_text())
    from fedsilo.models import build_model

    torch.manual_seed(config["seed"])  # the initial weights follow from the public seed
    model = build_model(config["model"]["name"], in_channels=1,
                        num_classes=manifest["num_classes"], image_size=(28, 28))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    after = torch.load(run / "model.pt", weights_only=True)
    return {"config": config, "sigma": privacy["noise_multiplier"],
            "q": privacy["sample_rate"], "steps": privacy["steps"],
            "n": manifest["sites"][0]["num_samples"]["train"], "model": model,
            "update": flat(after) - flat(before)}


def noise_effect(view: dict, draws: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """What the given per-step noise does to the weights: plain SGD without momentum moves
    them by −lr/(qN) Σ_t noise_t."""
    total = {k: sum(d[k] for d in draws) for k in draws[0]}
    scale = -view["config"]["train"]["lr"] / (view["q"] * view["n"])
    return flat(total) * scale


def replay_public_seed(view: dict) -> torch.Tensor:
    """The attacker's regeneration: the per-(seed, round, site) generator that fedsilo used
    to seed its DP randomness from, Poisson masks and noise drawn in the engine's order."""
    from fedsilo.training import round_seed

    model = view["model"]
    names = {id(p): n for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(round_seed(view["config"]["seed"], 1, 0))
    draws = []
    for _ in range(view["steps"]):
        torch.rand(view["n"], generator=generator)  # the Poisson mask
        draws.append({names[id(p)]: torch.normal(0.0, view["sigma"], size=p.shape,
                                                 generator=generator)
                      for p in model.parameters() if p.requires_grad})
    return noise_effect(view, draws)


def replay_with_secret(view: dict, run: Path) -> torch.Tensor:
    """The participant's own replay: the noise from its secret (only its checkpoint holds
    it).  This proves the harness: the noise is the update's dominant part, and whoever
    holds the secret can reproduce it exactly."""
    from fedsilo.privacy.secret import Purpose, SecretStream

    state = torch.load(run / "checkpoints" / "round-0001" / "site-000.pt", weights_only=True)
    secret = bytes(state["secret"].tolist())
    params = [(n, p) for n, p in view["model"].named_parameters() if p.requires_grad]
    draws = []
    for step in range(view["steps"]):
        stream = SecretStream(secret, purpose=Purpose.NOISE, round_index=1, step=step)
        draw = {}
        for name, p in params:
            values = np.empty(p.numel(), dtype=np.float32)
            stream.fill_gaussian(values, std=view["sigma"])
            draw[name] = torch.from_numpy(values).view_as(p)
        draws.append(draw)
    return noise_effect(view, draws)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def dp_runs(shards1: Path, tmp_path_factory) -> tuple[Path, Path]:
    """Two DP runs of the same configuration and config.seed (shared by the tests)."""
    root = tmp_path_factory.mktemp("dp-attack")
    dp_run(shards1, root / "a")
    dp_run(shards1, root / "b")
    return root / "a", root / "b"


def test_noise_cannot_be_regenerated_from_the_run_directory(shards1: Path, dp_runs) -> None:
    run = dp_runs[0]
    view = public_view(run, shards1)
    update = view["update"]

    # the participant itself: its noise makes up nearly all of the update
    own = replay_with_secret(view, run)
    truth = update - own  # the noise-free sum of clipped gradients (times −lr/qN)
    assert cosine(own, update) > 0.99
    assert float(truth.norm()) < 0.2 * float(update.norm())

    # the attacker: the public seed yields noise unrelated to the real one
    guess = replay_public_seed(view)
    assert abs(cosine(guess, update)) < 0.1, "the noise follows from public values"
    recovered = update - guess
    assert abs(cosine(recovered, truth)) < 0.1
    assert float(recovered.norm()) > 0.5 * float(update.norm())  # nothing was stripped


def test_same_seed_draws_different_noise(shards1: Path, dp_runs) -> None:
    """Two DP runs with the same config.seed: if their noise were equal, the difference
    of their updates would cancel it."""
    first, second = dp_runs
    a = flat(torch.load(first / "model.pt", weights_only=True))
    b = flat(torch.load(second / "model.pt", weights_only=True))
    view = public_view(first, shards1)
    update = view["update"]
    # independent noise: the two updates are about as far apart as √2 · noise
    assert float((a - b).norm()) > 0.8 * float(update.norm())


# -- user-level DP: the noise is calibrated to what is released ---------------------------


def user_run(shards: Path, out: Path, *, noise: str, rounds: int, extra=()) -> None:
    """Site 1 (rank 2) fails its first local training and is skipped: a planned site that
    does not contribute.  σ at its floor and C tiny, so the test can see the signal."""
    import os

    argv = ["train", "--set", f"data.dir={shards}", "--set", f"rounds={rounds}",
            "--set", "train.max_steps=2", "--set", "checkpoint.keep=10",
            "--set", "on_participant_error=skip", "--set", "dp.user.enabled=true",
            "--set", f"dp.user.noise={noise}", "--set", f"dp.user.clip_norm={USER_CLIP}",
            "--set", f"dp.user.noise_multiplier={USER_SIGMA}", *extra, "--out", str(out)]
    os.environ["FEDSILO_TEST_FAULT"] = "data:2:1"
    try:
        job = local_mpirun(4, argv, timeout=300,
                     python_args=(str(Path(__file__).parent / "inject.py"),))
    finally:
        os.environ.pop("FEDSILO_TEST_FAULT")
    assert job.returncode == 0, job.output[-4000:]


USER_CLIP, USER_SIGMA = 0.01, 0.01


def regenerate(secret: bytes, *, round_index: int, numel: int, std: float) -> torch.Tensor:
    """User-level noise, by a party that holds ``secret`` (the test plays that party)."""
    from fedsilo.privacy.secret import Purpose, SecretStream

    out = np.empty(numel, dtype=np.float32)
    SecretStream(secret, purpose=Purpose.USER_NOISE, round_index=round_index,
                 step=0).fill_gaussian(out, std=std)
    return torch.from_numpy(out).double()


def weights_after(run: Path, round_index: int) -> torch.Tensor:
    if round_index == 0:  # the initial weights follow from the public seed
        from test_dp_train import initial_and_round1

        return initial_and_round1(run)[0].double()
    state = torch.load(run / "checkpoints" / f"round-{round_index:04d}" / "coordinator.pt",
                       weights_only=True)
    return state["weights"].double()


def secret_of(run: Path, round_index: int, name: str) -> bytes:
    state = torch.load(run / "checkpoints" / f"round-{round_index:04d}" / name,
                       weights_only=True)
    return bytes(state["secret"].tolist())


@pytest.mark.parametrize("noise", ["central", "distributed"])
def test_user_level_noise_is_calibrated_to_the_released_sum(shards3: Path, tmp_path: Path,
                                                            noise: str) -> None:
    """With a planned site that does not contribute, the released update must still carry
    noise σ·S on a sum whose sensitivity is S = C·max w: the old code rescaled the sum by
    1/(weight that answered) after adding the noise (finding 2).  Every party that holds a
    secret removes its noise here; what is left is the clipped signal, whose norm the
    sensitivity bounds."""
    run = tmp_path / "run"
    partial = noise == "distributed"  # also: partial participation, 2 of 3 sites a round
    user_run(shards3, run, noise=noise, rounds=3 if partial else 1,
             extra=["--set", "participation.fraction=0.6", "--set", "participation.min=2"]
             if partial else [])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    manifest = json.loads((shards3 / "manifest.json").read_text())
    counts = [s["num_samples"]["train"] for s in manifest["sites"]]
    w = [n / sum(counts) for n in counts]  # fixed for the job, over every site
    assert "1" in rows[0]["dropped"] and "1" not in rows[0]["participants"]
    for r, row in enumerate(rows, start=1):
        planned = row["sampled"]
        move = weights_after(run, r) - weights_after(run, r - 1)
        std = USER_SIGMA * USER_CLIP * max(w)
        if noise == "central":
            total = regenerate(secret_of(run, r, "coordinator.pt"), round_index=r,
                               numel=move.numel(), std=std)
        else:  # every planned site's share, the dropped one's included
            total = sum(regenerate(secret_of(run, r, f"site-{k:03d}.pt"), round_index=r,
                                   numel=move.numel(), std=std / math.sqrt(len(planned)))
                        for k in planned)
        planned_weight = sum(w[k] for k in planned)
        signal = move - total / planned_weight
        contributed = [int(k) for k in row["participants"]]
        bound = USER_CLIP * sum(w[k] for k in contributed) / planned_weight
        assert 0.2 * bound < float(signal.norm()) <= bound * 1.001, (r, float(signal.norm()),
                                                                      bound)
        # the noise really is there, at the calibrated size
        assert float((move - signal).norm()) == pytest.approx(
            std / planned_weight * math.sqrt(move.numel()), rel=0.02)
    # per-site ε: no amplification by sampling, one Gaussian mechanism per planned round
    from fedsilo.privacy import PrivacyAccountant

    last = rows[-1]
    for k in range(3):
        times = sum(str(k) in map(str, row["sampled"]) for row in rows)
        acc = PrivacyAccountant("rdp")
        acc.spend(noise_multiplier=USER_SIGMA, sample_rate=1.0, num_steps=times)
        assert last["user_epsilon_per_site"].get(str(k), 0.0) == pytest.approx(
            acc.epsilon(delta=1e-5) if times else 0.0)


def test_participants_refuse_weights_that_single_them_out(shards3: Path, tmp_path: Path) -> None:
    """A coordinator that inflates one site's weight (to read its update out of the sum, or
    to let it dominate the model) is refused, and every rank stops with the same message
    naming the weights asked and the weights expected.  Every participant checks every
    sampled site's weight now, not only its own, so all three refuse."""
    import os

    os.environ["FEDSILO_TEST_FAULT"] = "weights:0:2"
    try:
        job = local_mpirun(4, ["train", "--set", f"data.dir={shards3}", "--set", "rounds=2",
                         "--set", "train.max_steps=1", "--out", str(tmp_path / "run")],
                     timeout=120, python_args=(str(Path(__file__).parent / "inject.py"),))
    finally:
        os.environ.pop("FEDSILO_TEST_FAULT")
    assert job.returncode == 2, job.output[-3000:]
    import re

    needle = "participant refuses round 1: the coordinator asks for weights"
    assert "failed on 3 of 4 ranks" in job.stderr  # the three participants
    asked, expected = re.search(r"asks for weights \{.*2: ([0-9.]+)\}, but the manifest and "
                                r"strategy 'fedavg' give \{.*2: ([0-9.]+)\}", job.stderr).groups()
    assert float(asked) == pytest.approx(10 * float(expected))  # site 2's, inflated
    for rank in range(4):
        mine = [line for line in job.stderr.splitlines()
                if line.startswith(f"[rank {rank}/4]") and " ERROR " in line]
        assert mine and needle in mine[0] and "PolicyError" in mine[0], job.stderr[-3000:]
    assert "Traceback" not in job.stderr
    assert not (tmp_path / "run" / "checkpoints" / "round-0001" / "coordinator.pt").exists()


# -- the released part of a run directory carries no secret -------------------------------


def test_the_released_part_carries_no_secret_and_sites_keep_their_own_state(
        shards3: Path, tmp_path: Path) -> None:
    """The attack of the privacy issue: central user-level noise was drawn from a secret in
    ``coordinator.pt``, which the docs listed as readable by a reader of the run directory,
    and with it the noise came off the released models (cosine 1.0).  Now the run directory
    has a released part (``fedsilo release``, ``fedsilo report``) and private parts: the
    coordinator's checkpoints, and each site's state in a directory of its own
    (``checkpoint.site_dir``).  No secret's bytes are in anything released; the control
    shows the search would find them where they are.  A resume finds each site's state."""
    run, sites = tmp_path / "run", tmp_path / "hospital-{site}"
    argv = ["train", "--set", f"data.dir={shards3}", "--set", "train.max_steps=2",
            "--set", "dp.enabled=true", "--set", "dp.noise_multiplier=1.0",
            "--set", "dp.target_epsilon=null", "--set", "dp.user.enabled=true",
            "--set", "dp.user.noise=central", "--set", "runtime.tensorboard=true",
            "--set", f"checkpoint.site_dir={sites}", "--set", "runtime.progress=off"]
    job = local_mpirun(4, [*argv, "--set", "rounds=2", "--out", str(run)], timeout=300)
    assert job.returncode == 0, job.output[-3000:]
    assert not list(run.glob("checkpoints/*/site-*.pt")), "site state in the shared run dir"
    site_files = sorted(tmp_path.glob("hospital-*/round-*/site-*.pt"))
    assert len(site_files) == 6 and all(f.stat().st_mode & 0o077 == 0 for f in site_files)
    secrets = [secret_of(run, 2, "coordinator.pt")] + [
        bytes(torch.load(f, weights_only=True)["secret"].tolist()) for f in site_files
        if "round-0002" in str(f)]
    assert len(secrets) == 4 and all(len(s) == 32 for s in secrets)
    # the control: the search finds a secret where it is
    assert secrets[0] in (run / "checkpoints" / "round-0002" / "coordinator.pt").read_bytes()
    assert all(s in f.read_bytes() for s, f in zip(secrets[1:], site_files[1::2]))

    assert fedsilo_cli(["report", str(run)]).returncode == 0
    release = tmp_path / "release"
    job = fedsilo_cli(["release", str(run), "--out", str(release)])
    assert job.returncode == 0, job.output
    released = [p for p in release.rglob("*") if p.is_file()]
    assert {"model.pt", "metrics.jsonl", "summary.json", "config.yaml"} <= \
        {p.name for p in released}
    assert not [p for p in released if "checkpoints" in p.parts or p.suffix == ".key"]
    assert any("tensorboard" in p.parts for p in released) and \
        any("report" in p.parts for p in released)
    for path in [*released, *[p for p in (run / "report").rglob("*") if p.is_file()]]:
        data = path.read_bytes()
        assert not any(s in data for s in secrets), f"a secret in released {path}"
    # nothing is overwritten: a second release into the same place is refused
    again = fedsilo_cli(["release", str(run), "--out", str(release)])
    assert again.returncode != 0 and "not an empty directory" in again.stderr

    job = local_mpirun(4, ["train", "--resume", str(run), "--set", "rounds=3"], timeout=300)
    assert job.returncode == 0, job.output[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    # each site keeps checkpoint.keep + 1 rounds of its own
    assert sorted(p.name for p in (tmp_path / "hospital-000").iterdir()) == \
        ["round-0001", "round-0002", "round-0003"]
