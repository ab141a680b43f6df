"""``fedsilo demo``: three hospitals train a pneumonia classifier on real chest X-rays,
end to end, MPI launched here.

The data is PneumoniaMNIST (MedMNIST v2, CC BY 4.0; ``demo_data/ATTRIBUTION.md``), shipped
with the package.  Its training images are split over the sites with label skew
(Dirichlet), each site's validation images follow its own label mix, and the official test
split is the coordinator's held-out set.  ``--dp`` trains with DP-SGD under a per-site
budget, ``--secure`` sums the updates under pairwise masks (identity keys made here).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedsilo.launch import mpirun_command, rank_environment

#: the label names of PneumoniaMNIST (MedMNIST v2's INFO["pneumoniamnist"]["label"])
CLASS_NAMES = ("normal", "pneumonia")
#: the per-site budget of ``--dp``
DP_EPSILON = 8.0
#: Papernot et al.'s tempered-sigmoid CNN (26k parameters): fast, and steady on these
#: skewed sites with or without DP, where the small CNN flips to "all pneumonia"
#: (benchmarks/RESULTS.md)
DEMO_MODEL = "dp_cnn"


def demo_data() -> Path:
    """The packaged PneumoniaMNIST file."""
    return Path(str(importlib.resources.files("fedsilo") / "demo_data" / "pneumoniamnist.npz"))


def load_source(*, samples: int | None, seed: int) -> Any:
    """PneumoniaMNIST as a prep source; ``samples`` keeps a random subset of the training
    images (val and test stay whole)."""
    from fedsilo.prep.medmnist import load_medmnist
    from fedsilo.prep.source import SourceData

    source = load_medmnist(demo_data())
    images, labels = source.splits["train"]
    if samples is not None and samples < len(labels):
        keep = np.sort(np.random.default_rng(seed).permutation(len(labels))[:samples])
        source = dataclasses.replace(source, splits={**source.splits,
                                                     "train": (images[keep], labels[keep])})
    return SourceData(name="pneumoniamnist", num_classes=source.num_classes,
                      splits=source.splits, provenance={**source.provenance, "demo": True})


def demo_config(*, shards: Path, rounds: int, model: str, seed: int, dp: bool,
                keys: Path | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "seed": seed, "rounds": rounds,
        "data": {"dir": str(shards)}, "model": {"name": model},
        # the recipe of benchmarks/RESULTS.md ("Accuracy under privacy"), with and without DP
        "train": {"epochs": 1, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "lr_decay": 0.95},
        "checkpoint": {"best_by": "auto", "threshold": "none" if dp else "youden"},
        "runtime": {"progress": "off"},
    }
    if dp:
        config["dp"] = {"enabled": True, "target_epsilon": DP_EPSILON, "max_grad_norm": 1.0}
    if keys is not None:
        config["aggregation"] = {"secure": "masks", "keys": str(keys)}
    return config


def run_demo(*, participants: int, rounds: int, model: str | None, samples: int | None,
             partition: str, seed: int, out: str | None, mpirun: str | None,
             dp: bool = False, secure: bool = False) -> int:
    from fedsilo.prep.pipeline import prepare_shards
    from fedsilo.shards import load_manifest, write_manifest

    model = model or DEMO_MODEL
    root = Path(out) if out else Path(tempfile.mkdtemp(prefix="fedsilo-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    shards, run = root / "shards", root / "run"
    modes = [m for m, on in (("DP-SGD, ε = 8 per site", dp), ("masked secure aggregation",
                                                             secure)) if on]
    print(f"fedsilo demo: {participants} hospitals train a pneumonia classifier on chest "
          f"X-rays (PneumoniaMNIST, MedMNIST v2, CC BY 4.0), {rounds} rounds, model {model}"
          + (f", {' and '.join(modes)}" if modes else "") + f", in {root}", flush=True)
    source = load_source(samples=samples, seed=seed)
    prepare_shards(source, out_dir=shards, participants=participants, partition=partition,
                   seed=seed, overwrite=True)
    manifest = load_manifest(shards)
    write_manifest(shards, dataclasses.replace(manifest, class_names=CLASS_NAMES))
    for k, site in enumerate(manifest.sites):
        counts = site.class_counts["train"]
        print(f"fedsilo demo:   hospital {k}: {site.num_samples['train']} training images "
              f"({counts[0]} normal, {counts[1]} pneumonia)", flush=True)
    keys = None
    if secure:
        from fedsilo.crypto.identity import generate_identities

        keys = root / "identity"
        generate_identities(str(keys), num_sites=participants)
    config = demo_config(shards=shards, rounds=rounds, model=model, seed=seed, dp=dp, keys=keys)
    status = train_demo(root, run, config, participants=participants, mpirun=mpirun)
    if status != 0:
        return status
    _print_results(run)
    return 0


def train_demo(root: Path, run: Path, config: dict[str, Any], *, participants: int,
               mpirun: str | None) -> int:
    """Write the demo's ``config`` to ROOT/demo.yaml and train it on participants + 1 ranks;
    the exit status (a failure is said on stderr)."""
    config_path = root / "demo.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = mpirun_command(participants + 1, ["train", "--config", str(config_path),
                                                "--out", str(run)], mpirun=mpirun)
    print("fedsilo demo: " + " ".join(command), flush=True)
    status = subprocess.run(command, env=rank_environment(participants + 1)).returncode
    if status != 0:
        print(f"fedsilo demo: training failed with exit status {status}", file=sys.stderr)
    return status


def _print_results(run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    test = summary["test"]
    print(f"fedsilo demo: final model (round {summary['rounds_completed']}): test accuracy "
          f"{test['acc']:.4f}, AUC {test['auc']:.4f} -> {run / 'model.pt'}")
    best = summary.get("best")
    if best:
        tested = best.get("test") or {}
        line = (f"fedsilo demo: best model by federated validation ({best['metric']} "
                f"{best['value']:.4f}): round {best['round']}")
        if tested:
            line += f", test accuracy {tested['acc']:.4f}, AUC {tested['auc']:.4f}"
        if best.get("threshold") is not None:
            line += f", decision threshold {best['threshold']:.2f}"
        print(f"{line} -> {run / 'best.pt'}")
    else:
        print("fedsilo demo: no best model: under DP no site releases validation metrics, "
              "so the final model is the one to use")
    privacy = summary.get("privacy")
    if privacy:
        spent = ", ".join(f"{float(p['epsilon']):.2f}" for p in privacy.values())
        print(f"fedsilo demo: privacy spent per hospital: ε = {spent} (δ = "
              f"{next(iter(privacy.values()))['delta']:g})")
    report = _report(run)
    print(f"fedsilo demo: run report: {report}")
    use = run / ("best.pt" if best else "model.pt")
    print(f"fedsilo demo: use the model: fedsilo predict --model {use} IMAGES... (or fedsilo "
          f"export --model {use} --format onnx --out model.onnx)")


def _report(run: Path) -> str:
    """The run report's path (``fedsilo report``), or the command that writes it."""
    try:
        from fedsilo.runreport import write_report
    except ImportError:
        return f"fedsilo report {run}"
    try:
        return str(write_report([str(run)], out=None))
    except Exception as exc:  # noqa: BLE001 - the demo's result stands without a report
        return f"not written ({type(exc).__name__}: {exc}); try: fedsilo report {run}"
