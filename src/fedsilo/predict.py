"""``fedsilo predict``: a trained model's class probabilities for images on disk.

Inputs are image files (PNG, JPEG, BMP, TIFF), DICOM files, folders of either (searched
recursively: a DICOM series is a folder), or HDF5 shards written by ``fedsilo prep`` (every
split, with its labels).  Each image goes through what ``fedsilo prep`` does to a source
image (``fedsilo.prep.images`` / ``fedsilo.prep.dicom``: 8-bit, EXIF orientation, channel
conversion, bilinear resize to the model's size), then through the normalization of the
run's test set, read from the model card (:mod:`fedsilo.modelfile`).  Channels: an RGB image
becomes grayscale for a grayscale model (ITU-R 601-2 luma, as ``prep --channels 1`` does);
a grayscale image for an RGB model is refused, since the model learnt from colour it does
not have.

On a shard the probabilities are the coordinator's test evaluation, operation for operation
(same normalization, batch size and float64 softmax): predicting ``test.h5`` gives the run's
test accuracy exactly.

A segmentation model (its card says ``task: segmentation``) writes a mask per image instead
of a CSV row: ``--out`` is then a folder, and each image gives ``STEM_mask.png`` (its
predicted label map at the image's own size, never resized: binary masks as 0/255 so any
viewer shows them, more classes as their class values) and, with ``--probabilities``,
``STEM_prob.png`` (the foreground probability × 255; with more classes one
``STEM_prob_K.png`` per class K > 0), computed in sliding windows as the run's test
evaluation is (docs/segmentation.md).
"""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from fedsilo.errors import DataError
from fedsilo.modelfile import ModelCard, load_model

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
SHARD_SUFFIXES = (".h5", ".hdf5")


@dataclass(frozen=True)
class Batch:
    """Images of one input, uint8 N x C x H x W, with a name per image and labels if known."""

    names: list[str]
    images: np.ndarray
    labels: np.ndarray | None = None


def is_dicom(path: Path) -> bool:
    """A DICOM file by extension, or by its preamble (``DICM`` at byte 128)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def list_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Every file to predict on: files as given, folders searched recursively (hidden
    files and files that are neither images, DICOM nor shards are left out)."""
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            inside = [p for p in sorted(path.rglob("*")) if p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(path).parts)
                      and (p.suffix.lower() in IMAGE_SUFFIXES + SHARD_SUFFIXES or is_dicom(p))]
            if not inside:
                raise DataError(f"{path}: no image, DICOM or HDF5 shard file in this folder")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"input not found: {path}")
    return found


def read_image(path: Path, card: ModelCard) -> np.ndarray:
    """One image file as the model takes it (uint8 C x H x W), or DataError."""
    if is_dicom(path):
        from fedsilo.prep.dicom import DicomDecoder as Decoder
    else:
        from fedsilo.prep.images import ImageDecoder as Decoder
    native = Decoder()(str(path))
    if not isinstance(native, np.ndarray):
        raise DataError(native.message())
    channels = native.shape[0]
    if channels != card.channels and not (channels == 3 and card.channels == 1):
        raise DataError(f"{path} is a {channels}-channel image, but the model takes "
                        f"{card.channels}-channel (RGB) images; a grayscale image has no "
                        f"colour to give it")
    image = Decoder(channels=card.channels, size=card.size)(str(path))
    if not isinstance(image, np.ndarray):  # decoded once already: a changed file
        raise DataError(image.message())
    return image


def read_batches(paths: Sequence[Path], card: ModelCard) -> Iterator[Batch]:
    """The inputs as batches: a shard's splits one batch each, loose images together."""
    loose: list[Path] = []
    for path in paths:
        if path.suffix.lower() in SHARD_SUFFIXES:
            yield from _shard_batches(path, card)
        else:
            loose.append(path)
    if loose:
        yield Batch(names=[str(p) for p in loose],
                    images=np.stack([read_image(p, card) for p in loose]))


def _shard_batches(path: Path, card: ModelCard) -> Iterator[Batch]:
    from fedsilo.errors import ShardError
    from fedsilo.shards import read_shard

    try:
        shard = read_shard(path)
    except ShardError as exc:
        raise DataError(str(exc)) from None
    for split, data in shard.splits.items():
        shape = tuple(data.images.shape[1:])
        if shape != card.image_shape:
            raise DataError(f"{path}: split {split!r} holds {'x'.join(map(str, shape))} images, "
                            f"the model takes {'x'.join(map(str, card.image_shape))}; prepare "
                            f"the shard with the run's size and channels")
        if data.labels.size and int(data.labels.max()) >= card.num_classes:
            raise DataError(f"{path}: split {split!r} has label {int(data.labels.max())}, the "
                            f"model knows {card.num_classes} classes")
        yield Batch(names=[f"{path}:{split}[{i}]" for i in range(len(data.labels))],
                    images=data.images, labels=data.labels)


def probabilities(model: Any, images: np.ndarray, card: ModelCard) -> np.ndarray:
    """Class probabilities (float64, N x K) of uint8 images, as the coordinator's test
    evaluation computes them: the same float32 normalization (``loading.normalize``:
    ``(x / 255 - mean) / std``), the same batch size, softmax in float64."""
    import torch

    from fedsilo.loading import channel_stat, normalize

    cpu = torch.device("cpu")
    mean, std = channel_stat(card.mean, cpu), channel_stat(card.std, cpu)
    batch_size = card.eval_batch_size
    out = []
    with torch.no_grad():
        for begin in range(0, len(images), batch_size):
            pixels = torch.from_numpy(np.ascontiguousarray(images[begin: begin + batch_size]))
            logits = model(normalize(pixels, mean, std))
            out.append(torch.softmax(logits.double(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, card.num_classes))


def decide(probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Predicted class indexes: MedMNIST's rule (binary: p1 > 0.5; else argmax), or
    p1 > ``threshold`` for a binary model with a stored threshold.

    >>> decide(np.array([[0.5, 0.5], [0.3, 0.7]])).tolist(), decide(np.array([[0.6, 0.4]]), 0.3).tolist()
    ([0, 1], [1])
    """  # noqa: E501
    if probs.shape[1] == 2:
        return (probs[:, 1] > (0.5 if threshold is None else threshold)).astype(np.int64)
    return probs.argmax(axis=1)


def _write_csv(out: Path, text: str) -> None:
    """``text`` into ``out`` atomically: on any failure ``out`` is as it was, and the error
    is one line naming it."""
    from fedsilo.rundir import atomic_write_text

    if out.is_dir():
        raise DataError(f"--out {out} is a directory; give the CSV file to write")
    try:
        atomic_write_text(out, text, retry="run fedsilo predict again")
    except OSError as exc:
        kept = f"{out} is unchanged" if out.exists() else "nothing was written"
        raise DataError(f"cannot write --out {out}: {exc.strerror or exc}; {kept}: choose "
                        f"another --out") from None


def predict_masks(model: Any, card: ModelCard, paths: Sequence[Path], *, out: Path,
                  probabilities: bool = False) -> list[Path]:
    """A segmentation model's mask (and probability maps) of every image file, written into
    the folder ``out``; returns the files written.  An existing file is never replaced."""
    import torch

    from fedsilo.loading import channel_stat, normalize
    from fedsilo.prep.images import write_png
    from fedsilo.segmentation.window import sliding_window

    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; a segmentation model writes a folder of masks")
    if any(p.suffix.lower() in SHARD_SUFFIXES for p in paths):
        raise DataError("segmentation models predict on image files, not shards (yet)")
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        raise DataError("two inputs share a name stem; their masks would collide")
    planned = [out / f"{stem}_mask.png" for stem in stems]
    taken = [str(p) for p in planned if p.exists()]
    if taken:
        raise DataError(f"{len(taken)} mask file(s) exist already (e.g. {taken[0]}); choose "
                        f"another --out (existing files are never replaced)")
    out.mkdir(parents=True, exist_ok=True)
    cpu = torch.device("cpu")
    mean, std = channel_stat(card.mean, cpu), channel_stat(card.std, cpu)
    assert card.patch_size is not None
    written: list[Path] = []
    from fedsilo.prep.dicom import DicomDecoder
    from fedsilo.prep.images import ImageDecoder

    for path, target in zip(paths, planned):
        decoder: Any = DicomDecoder(channels=card.channels) if is_dicom(path) \
            else ImageDecoder(channels=card.channels)
        image = decoder(str(path))
        if not isinstance(image, np.ndarray):
            raise DataError(image.message())
        pixels = normalize(torch.from_numpy(np.ascontiguousarray(image))[None], mean, std)
        logits = sliding_window(model, pixels, size=card.patch_size, overlap=card.overlap,
                                batch_size=card.eval_batch_size)
        probs = torch.softmax(logits[0].double(), dim=0).numpy()
        labels = probs.argmax(0).astype(np.uint8)
        write_png(str(target), labels * 255 if card.num_classes == 2 else labels)
        written.append(target)
        if probabilities:
            for k in range(1, card.num_classes):
                suffix = "" if card.num_classes == 2 else f"_{k}"
                prob_path = out / f"{path.stem}_prob{suffix}.png"
                if prob_path.exists():
                    raise DataError(f"{prob_path} exists already; choose another --out")
                write_png(str(prob_path), np.rint(probs[k] * 255).astype(np.uint8))
                written.append(prob_path)
    return written


def predict(model_path: str | Path, inputs: Sequence[str | Path], *,
            out: str | Path | None = None, log: Any = None,
            probability_maps: bool = False) -> dict[str, Any]:
    """Write the CSV (``out``, or stdout) and return what it found: images, and the accuracy
    on labelled inputs (shards).  A segmentation model writes masks into the folder ``out``
    instead (:func:`predict_masks`).  Bad input raises ModelError or DataError."""
    model, card, weights = load_model(model_path)
    paths = list_inputs(inputs)
    if card.task == "segmentation":
        if out is None:
            raise DataError("a segmentation model writes a mask per image: give --out FOLDER")
        written = predict_masks(model, card, paths, out=Path(out),
                                probabilities=probability_maps)
        print(f"fedsilo predict: {len(paths)} mask(s) with {weights} -> {out}",
              file=sys.stderr if log is None else log)
        return {"images": len(paths), "model": str(weights), "files": [str(p) for p in written],
                "accuracy": None, "labelled": 0, "threshold": None}
    threshold = card.threshold if card.num_classes == 2 else None
    columns = ["source", "label", *[f"prob_{c}" for c in card.class_names], "predicted"]
    if threshold is not None:
        columns += ["threshold", "predicted_at_threshold"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    num_images, num_labelled, num_correct = 0, 0, 0
    for batch in read_batches(paths, card):
        probs = probabilities(model, batch.images, card)
        predicted = decide(probs)
        at_threshold = decide(probs, threshold) if threshold is not None else None
        for i, name in enumerate(batch.names):
            label = "" if batch.labels is None else card.class_names[int(batch.labels[i])]
            row = [name, label, *[repr(float(p)) for p in probs[i]],
                   card.class_names[int(predicted[i])]]
            if at_threshold is not None:
                row += [repr(threshold), card.class_names[int(at_threshold[i])]]
            writer.writerow(row)
        num_images += len(batch.names)
        if batch.labels is not None:
            num_labelled += len(batch.labels)
            num_correct += int((predicted == batch.labels).sum())
    text = buffer.getvalue()
    if out is None:
        sys.stdout.write(text)
    else:
        _write_csv(Path(out), text)
    result: dict[str, Any] = {"images": num_images, "model": str(weights),
                              "accuracy": num_correct / num_labelled if num_labelled else None,
                              "labelled": num_labelled, "threshold": threshold}
    line = f"fedsilo predict: {num_images} image(s) with {weights}"
    if num_labelled:
        line += f"; accuracy {result['accuracy']:.4f} on {num_labelled} labelled"
    if out is not None:
        line += f" -> {out}"
    print(line, file=sys.stderr if log is None else log)  # sys.stderr when called
    return result
