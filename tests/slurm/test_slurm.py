"""The job scripts on a real single-node SLURM (slurmctld, slurmd, munge) started by
``../shared/tools/slurm-local``: the prep → train pipeline with its afterok dependency, and
pre-emption (signal → checkpoint → requeue → resume) ending with the uninterrupted weights."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import PNEUMONIA, REPO, SHARED, mpirun

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

SLURM_LOCAL = SHARED / "tools" / "slurm-local"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running cluster (8 CPUs advertised on 2 cores: tasks oversubscribe) and the
    environment that talks to it; stopped after the module's tests."""
    # where slurm-local cannot start at all, skip and say why; where it can (root, the tool
    # present: CI), a failure to start is a failure, never a skip
    if not SLURM_LOCAL.is_file():
        pytest.skip(f"no {SLURM_LOCAL}: the SLURM tests need ../shared/tools/slurm-local")
    if os.geteuid() != 0:
        pytest.skip("slurm-local starts slurmctld, slurmd and munge and installs Debian's "
                    "packages: it needs root (CI runs these tests as root)")
    state = tmp_path_factory.mktemp("slurm-state")
    env = dict(os.environ, SLURM_LOCAL_CPUS="8")
    up = subprocess.run([str(SLURM_LOCAL), "up", "--state-dir", str(state)], env=env,
                        capture_output=True, text=True, timeout=900)
    assert up.returncode == 0, up.stderr[-3000:]
    for name, value in re.findall(r"^export (\w+)=(.*)$", up.stdout, re.M):
        env[name] = value.strip("'\"")
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env["PATH"]
    env["FEDSILO"] = str(Path(bin_dir) / "fedsilo")
    env["PYTHON"] = sys.executable
    yield env
    subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
    subprocess.run([str(SLURM_LOCAL), "down", "--state-dir", str(state)], env=env,
                   capture_output=True, timeout=300)


def job_records(env: dict, job: str) -> list[dict[str, str]]:
    """``scontrol show job -o`` as dicts (one per array task)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True,
                         text=True).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def wait_for(env: dict, job: str, states: set[str], *, timeout: float) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = job_records(env, job)
        if records and all(r.get("JobState") in states for r in records):
            return records
        time.sleep(1)
    pytest.fail(f"job {job} did not reach {states} within {timeout} s: {job_records(env, job)}")


def write_config(path: Path, shards: Path, **extra) -> Path:
    config = {"rounds": 2, "data": {"dir": str(shards)}, "model": {"name": "small_cnn"},
              "runtime": {"threads": 1}, "train": {"batch_size": 64}}
    config.update(extra)
    path.write_text(yaml.safe_dump(config))
    return path


def test_pipeline_prep_array_then_train(slurm, tmp_path):
    shards, run = tmp_path / "shards", tmp_path / "run"
    config = write_config(tmp_path / "cfg.yaml", shards)
    submit = subprocess.run([str(REPO / "jobs" / "slurm" / "pipeline.sh"), str(PNEUMONIA),
                             str(config), str(run)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120,
                            env=dict(slurm, SITES="3", PARTITION="dirichlet:0.5"))
    assert submit.returncode == 0, submit.stderr
    prep = re.search(r"prep job (\d+)", submit.stdout).group(1)
    train = re.search(r"train job (\d+) \(afterok:(\d+)", submit.stdout)
    assert train.group(2) == prep

    prep_tasks = wait_for(slurm, prep, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=600)
    train_job = wait_for(slurm, train.group(1), {"COMPLETED", "FAILED", "CANCELLED"},
                         timeout=600)[0]
    assert len(prep_tasks) == 4  # 3 site shards + test.h5
    assert all(t["JobState"] == "COMPLETED" and t["ExitCode"] == "0:0" for t in prep_tasks)
    assert train_job["JobState"] == "COMPLETED" and train_job["ExitCode"] == "0:0", \
        (tmp_path / f"fedsilo-train-{train.group(1)}.out").read_text()[-3000:]
    assert train_job["NumTasks"] == "4"
    # the dependency held: training started after the last preparation task ended
    assert train_job["StartTime"] >= max(t["EndTime"] for t in prep_tasks)

    assert (run / "model.pt").exists() and (run / "summary.json").exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    # the array wrote exactly what a serial `fedsilo prep` writes
    serial = tmp_path / "serial"
    subprocess.run([sys.executable, "-m", "fedsilo", "prep", "medmnist", "--source", str(PNEUMONIA),
                    "--sites", "3", "--partition", "dirichlet:0.5", "--seed", "0",
                    "--out", str(serial)], check=True, capture_output=True, timeout=300)
    for name in ("manifest.json", "site-000.h5", "site-001.h5", "site-002.h5", "test.h5"):
        assert (shards / name).read_bytes() == (serial / name).read_bytes(), name


def test_preemption_checkpoints_requeues_and_ends_identically(slurm, tmp_path):
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, "-m", "fedsilo", "prep", "synthetic", "--samples", "2400",
                    "--classes", "3", "--sites", "3", "--partition", "dirichlet:1.0",
                    "--out", str(shards)], check=True, capture_output=True, timeout=300)
    config = write_config(tmp_path / "cfg.yaml", shards, rounds=8)

    reference = tmp_path / "reference"
    job = mpirun(4, ["train", "--config", str(config), "--out", str(reference)], timeout=300)
    assert job.returncode == 0, job.output[-3000:]

    run = tmp_path / "run"
    submit = subprocess.run(["sbatch", "--parsable", "--ntasks=4",
                             str(REPO / "jobs" / "slurm" / "train.sbatch"), str(config), str(run)],
                            cwd=tmp_path, env=slurm, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip()
    marker = run / "checkpoints" / "round-0002" / "coordinator.pt"
    deadline = time.monotonic() + 300
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), job_records(slurm, job_id)
    # what --signal=USR1@120 does before the time limit: USR1 to every task of the step
    subprocess.run(["scancel", "--signal=USR1", job_id], env=slurm, check=True)

    # requeued: SLURM holds a requeued job for a while (BeginTime); release it now
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        record = job_records(slurm, job_id)[0]
        if record.get("Restarts") == "1" and record["JobState"] == "PENDING":
            # only once the node has finished cleaning up the first run: a job started
            # while its node is still completing fails to launch
            node_state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=slurm,
                                        capture_output=True, text=True).stdout.strip()
            if node_state == "idle":
                time.sleep(2)
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                               env=slurm)
                break
        if record["JobState"] in {"FAILED", "CANCELLED", "COMPLETED"}:
            break
        time.sleep(0.5)
    final = wait_for(slurm, job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=600)[0]
    log = (tmp_path / f"fedsilo-train-{job_id}.out").read_text()
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", log[-3000:]
    assert "received SIGUSR1" in log and "requeueing" in log and "(restart 1)" in log
    assert "resuming it with its own config.yaml" in log

    expected = torch.load(reference / "model.pt", weights_only=True)
    actual = torch.load(run / "model.pt", weights_only=True)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_prep_array_of_a_csv_source_with_natural_sites_then_train_on_fewer_ranks(slurm,
                                                                                  tmp_path):
    """A hospital-style source (PNG files + a labels CSV naming each image's hospital) as a
    prep array: one task per natural site plus the test task, byte-identical to a serial
    run; then a training of its 3 sites on 2 participant ranks."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = ["file,diagnosis,hospital"]
    (tmp_path / "imgs").mkdir()
    for n in range(180):
        hospital = ("north", "south", "west")[n % 3]
        label = int(rng.integers(0, 2))
        # a learnable signal: the two classes differ in brightness
        image = np.clip(rng.normal(90 + 80 * label, 30, (16, 16)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / "imgs" / f"{n:03d}.png")
        rows.append(f"{n:03d}.png,{('normal', 'pneumonia')[label]},{hospital}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    args = ["csv", "--images", str(tmp_path / "imgs"), "--labels", str(tmp_path / "labels.csv"),
            "--path-column", "file", "--label-column", "diagnosis",
            "--partition", "natural:hospital", "--size", "28", "28"]
    shards = tmp_path / "shards"
    submit = subprocess.run(["sbatch", "--parsable", "--array=0-3", "--chdir", str(tmp_path),
                             str(REPO / "jobs" / "slurm" / "prep.sbatch"), *args,
                             "--out", str(shards)],
                            env=slurm, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    tasks = wait_for(slurm, submit.stdout.strip().split(";")[0],
                     {"COMPLETED", "FAILED", "CANCELLED"}, timeout=600)
    assert len(tasks) == 4 and all(t["JobState"] == "COMPLETED" for t in tasks), \
        [(t["JobState"], t["ExitCode"]) for t in tasks]
    serial = tmp_path / "serial"
    subprocess.run([sys.executable, "-m", "fedsilo", "prep", *args, "--out", str(serial)],
                   check=True, capture_output=True, timeout=300)
    for name in ("manifest.json", "site-000.h5", "site-001.h5", "site-002.h5", "test.h5"):
        assert (shards / name).read_bytes() == (serial / name).read_bytes(), name

    run = tmp_path / "run"
    job = mpirun(3, ["train", "--config", str(write_config(tmp_path / "cfg.yaml", shards)),
                     "--set", "rounds=3", "--set", "train.lr=0.05", "--out", str(run)],
                 timeout=300)
    assert job.returncode == 0, job.output[-3000:]
    assert "2 participants (3 sites)" in job.stderr
    summary = yaml.safe_load((run / "summary.json").read_text())
    assert summary["test"]["acc"] > 0.7, summary["test"]  # brightness is easy to learn
