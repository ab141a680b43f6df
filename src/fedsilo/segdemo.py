"""``fedsilo demo --task segmentation``: three hospitals train a retinal-vessel U-Net on real
fundus photographs, end to end, MPI launched here.

The data is CHASE_DB1 (Fraz et al., IEEE TBME 2012; CC BY 4.0, attribution in
``demo_data/chase_db1/ATTRIBUTION.md``), shipped with the package: 20 training images of
children 01-10 split over the sites *by child* (both eyes of a child at one hospital), the
8 images of children 11-14 as the coordinator's test set.  It ends with the test Dice and
the folder of overlay images (photograph | true vessels | predicted vessels).
"""

from __future__ import annotations

import importlib.resources
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedsilo.demo import train_demo

#: a child's number in CHASE_DB1's file names (Image_07L.jpg: child 07)
CHILD_PATTERN = r"Image_(\d+)"


def chase_data() -> Path:
    """The packaged CHASE_DB1 folder (training/, test/, ATTRIBUTION.md)."""
    return Path(str(importlib.resources.files("fedsilo") / "demo_data" / "chase_db1"))


def segmentation_config(*, shards: Path, rounds: int, seed: int, patch: int, epochs: int,
                        keys: Path | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "seed": seed, "rounds": rounds, "task": "segmentation",
        "data": {"dir": str(shards)}, "model": {"name": "basic_unet"},
        # one epoch is one patch per image: epochs patches per image and round
        "train": {"epochs": epochs, "batch_size": 8, "optimizer": "adam", "lr": 0.002},
        "segmentation": {"patch_size": patch},
        # sliding windows over 8 whole 960 x 999 images: evaluated at the end only
        "eval": {"every": rounds, "batch_size": 16},
        "checkpoint": {"best_by": "none"},
        "runtime": {"progress": "off"},
    }
    if keys is not None:
        config["aggregation"] = {"secure": "masks", "keys": str(keys)}
    return config


def run_segmentation_demo(*, participants: int, rounds: int, seed: int, out: str | None,
                          mpirun: str | None, secure: bool = False, patch: int = 96,
                          epochs: int = 8) -> int:
    from fedsilo.prep.segmentation import pair_folders, prepare_segmentation

    root = Path(out) if out else Path(tempfile.mkdtemp(prefix="fedsilo-segdemo-"))
    root.mkdir(parents=True, exist_ok=True)
    shards, run = root / "shards", root / "run"
    data = chase_data()
    print(f"fedsilo demo: {participants} hospitals train a retinal-vessel U-Net on CHASE_DB1 "
          f"(Fraz et al. 2012, CC BY 4.0), split by child, {rounds} rounds"
          + (", masked secure aggregation" if secure else "") + f", in {root}", flush=True)
    pairs, bad = pair_folders(data / "training" / "images", data / "training" / "mask",
                              group_pattern=CHILD_PATTERN)
    test, test_bad = pair_folders(data / "test" / "images", data / "test" / "mask",
                                  group_pattern=CHILD_PATTERN)
    manifest = prepare_segmentation(
        pairs, test_pairs=test, pre_bad=[*bad, *test_bad], out=shards, sites=participants,
        seed=seed, val_fraction=0.0, overwrite=True, class_names=["background", "vessel"],
        source={"name": "CHASE_DB1", "licence": "CC BY 4.0"})
    groups = (manifest.segmentation or {}).get("groups", {})
    for k, site in enumerate(manifest.sites):
        children = sorted(set(groups.get(site.file, {}).get("train", [])))
        print(f"fedsilo demo:   hospital {k}: {site.num_samples['train']} images of children "
              f"{', '.join(children)}", flush=True)
    keys = None
    if secure:
        from fedsilo.crypto.identity import generate_identities

        keys = root / "identity"
        generate_identities(str(keys), num_sites=participants)
    config = segmentation_config(shards=shards, rounds=rounds, seed=seed, patch=patch,
                                 epochs=epochs, keys=keys)
    status = train_demo(root, run, config, participants=participants, mpirun=mpirun)
    if status != 0:
        return status
    test_row = json.loads((run / "summary.json").read_text())["test"]
    # in the run directory, where fedsilo report finds them (the demo's test images are
    # public; a hospital's own test images may not be, so train never writes these)
    overlays = write_overlays(run / "model.pt", shards / "test.h5", run / "overlays")
    print(f"fedsilo demo: final model: test Dice {test_row['dice']:.4f}, IoU "
          f"{test_row['iou']:.4f}, pixel AUC {test_row['auc']:.4f}, HD95 "
          f"{test_row['hd95']:.1f} px -> {run / 'model.pt'}")
    print(f"fedsilo demo: overlays (photograph | true vessels | predicted vessels): {overlays}")
    from fedsilo.demo import _report

    print(f"fedsilo demo: run report: {_report(run)}")
    print(f"fedsilo demo: masks for your own images: fedsilo predict --model {run / 'model.pt'} "
          f"IMAGES... --out MASKS_DIR")
    return 0


def write_overlays(model_path: Path, test_shard: Path, out: Path, *, count: int = 4) -> Path:
    """One PNG for each of the first ``count`` test images into ``out``: the photograph, the
    true mask and the predicted mask side by side; returns ``out``."""
    import torch

    from fedsilo.loading import channel_stat, normalize
    from fedsilo.modelfile import load_model
    from fedsilo.prep.images import write_png
    from fedsilo.segmentation.window import sliding_window
    from fedsilo.shards import read_masks, read_shard

    model, card, _ = load_model(model_path)
    assert card.patch_size is not None
    data = read_shard(test_shard, splits=["test"]).splits["test"]
    masks = read_masks(test_shard, "test")
    mean = channel_stat(card.mean, torch.device("cpu"))
    std = channel_stat(card.std, torch.device("cpu"))
    out.mkdir(parents=True, exist_ok=True)
    for i, (image, mask) in enumerate(zip(data.images[:count], masks[:count])):
        pixels = normalize(torch.from_numpy(image.copy())[None], mean, std)
        logits = sliding_window(model, pixels, size=card.patch_size, overlap=card.overlap,
                                batch_size=card.eval_batch_size)
        pred = logits[0].argmax(0).numpy().astype(np.uint8)
        rgb = image.transpose(1, 2, 0) if image.shape[0] == 3 else \
            np.repeat(image.transpose(1, 2, 0), 3, axis=2)
        panel = np.concatenate([rgb, np.repeat(mask[..., None] * 255, 3, axis=2),
                                np.repeat(pred[..., None] * 255, 3, axis=2)], axis=1)
        write_png(str(out / f"test-{i:02d}.png"), panel)
    return out
