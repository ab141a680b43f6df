"""Using a segmentation model (issue 28): ``fedsilo predict`` writes a PNG mask per image at
the image's own size (and probability maps), never over an existing file; ``fedsilo export``
writes TorchScript and ONNX that agree with PyTorch."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedsilo.errors import DataError
from fedsilo.modelfile import load_model, write_model
from fedsilo.models import build_model


@pytest.fixture(scope="module")
def seg_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("segmodel")
    torch.manual_seed(0)
    model = build_model("basic_unet", in_channels=3, num_classes=2, image_size=(16, 16))
    card = {"model": {"name": "basic_unet"}, "num_classes": 2, "class_names": None,
            "image_shape": [3, 40, 44], "round": 1, "threshold": None,
            "normalization": {"mode": "global", "mean": [0.5] * 3, "std": [0.25] * 3},
            "eval_batch_size": 4, "task": "segmentation",
            "segmentation": {"patch_size": 16, "overlap": 0.25}}
    write_model(root / "model.pt", model.state_dict(), card)
    return root / "model.pt"


def test_predict_writes_a_mask_per_image_at_its_own_size(seg_model, tmp_path):
    from fedsilo.predict import predict
    from fedsilo.segmentation.window import sliding_window

    rng = np.random.default_rng(0)
    sizes = {"a": (23, 37), "b": (40, 44)}
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            tmp_path / f"{name}.png")
    out = tmp_path / "masks"
    result = predict(seg_model, [tmp_path / "a.png", tmp_path / "b.png"], out=out,
                     probability_maps=True)
    assert result["images"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.png", "a_prob.png", "b_mask.png",
                                                     "b_prob.png"]
    model, card, _ = load_model(seg_model)
    for name, size in sizes.items():
        mask = np.asarray(Image.open(out / f"{name}_mask.png"))
        prob = np.asarray(Image.open(out / f"{name}_prob.png"))
        assert mask.shape == prob.shape == size and set(np.unique(mask)) <= {0, 255}
        pixels = np.asarray(Image.open(tmp_path / f"{name}.png")).transpose(2, 0, 1)
        x = (torch.from_numpy(pixels.copy())[None].float() / 255 - 0.5) / 0.25
        logits = sliding_window(model, x, size=16, overlap=0.25)
        expected = (logits[0].argmax(0).numpy() * 255).astype(np.uint8)
        assert (mask == expected).mean() > 0.999  # float32 vs float64 softmax at ties
    with pytest.raises(DataError, match="exist already"):
        predict(seg_model, [tmp_path / "a.png"], out=out)
    with pytest.raises(DataError, match="--out FOLDER"):
        predict(seg_model, [tmp_path / "a.png"])


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_of_a_segmentation_model_matches_pytorch(seg_model, tmp_path, fmt):
    from fedsilo.export import TOLERANCE, export_model

    diff = export_model(seg_model, fmt=fmt, out=tmp_path / f"m.{fmt}", log=io.StringIO())
    assert diff <= TOLERANCE and (tmp_path / f"m.{fmt}").stat().st_size > 0


def test_the_segmentation_demo_config_is_valid_and_ships_its_data(tmp_path):
    from fedsilo.config import config_from_dict
    from fedsilo.segdemo import chase_data, segmentation_config

    data = chase_data()
    assert (data / "ATTRIBUTION.md").is_file()
    assert len(list((data / "training" / "images").glob("*.jpg"))) == 20
    assert len(list((data / "test" / "mask").glob("*_1stHO.png"))) == 8
    config = config_from_dict(segmentation_config(shards=tmp_path, rounds=3, seed=0, patch=96,
                                                  epochs=8, keys=tmp_path))
    assert config.task == "segmentation" and config.model.name == "basic_unet"
    assert config.aggregation.secure == "masks" and config.eval.every == 3


def test_the_shipped_chase_db1_recipe_is_a_valid_segmentation_config():
    """jobs/configs/chase_db1.yaml (docs/segmentation.md's recommendation) loads, and is the
    recipe benchmarks/RESULTS.md measured."""
    from fedsilo.config import load_config

    root = Path(__file__).resolve().parents[2]
    config = load_config(root / "jobs" / "configs" / "chase_db1.yaml")
    assert config.task == "segmentation" and config.model.name == "basic_unet"
    assert (config.rounds, config.train.epochs, config.train.batch_size) == (80, 20, 8)
    assert (config.train.optimizer, config.train.lr, config.train.lr_decay) == \
        ("adam", 0.002, 0.96)
    assert (config.segmentation.patch_size, config.segmentation.foreground) == (128, 0.5)


def test_report_and_tensorboard_show_segmentation_figures(tmp_path):
    """A copy of a stored run with segmentation figures added: the report's segmentation
    table and overlay images, and TensorBoard's test/dice."""
    import json
    import shutil

    from fedsilo.boardlog import scalars
    from fedsilo.runreport import write_report

    run = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "runs" / "plain", run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.update(dice=0.5, iou=0.33, hd95=12.5, dice_per_class=[0.95, 0.5])
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = json.loads((run / "summary.json").read_text())
    summary["test"].update(dice=0.625, iou=0.45, hd95=None, dice_per_class=[0.9, 0.625])
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "overlays").mkdir()
    for i in range(6):
        Image.fromarray(np.full((4, 12, 3), i, np.uint8)).save(run / "overlays" / f"t{i}.png")
    html = write_report([run], out=tmp_path / "report").read_text()
    assert '<table id="segmentation">' in html and 'data-value="0.625"' in html
    assert "0.9000, 0.6250" in html and html.count('class="overlay"') == 4
    assert scalars(rows[0])["test/dice"] == 0.5 and scalars(rows[0])["test/hd95"] == 12.5
