"""``fedsilo export``: a trained model as TorchScript or ONNX, checked against PyTorch.

The exported graph is the model itself: input ``images``, float32 N x C x H x W already
normalized as the model card says (``(pixel / 255 - mean) / std``), output ``logits``
N x K (softmax gives the probabilities ``fedsilo predict`` writes); a segmentation model
takes windows of its patch size and gives ``logits`` N x K x H x W (``fedsilo predict``
slides it over whole images).  The card travels
inside the file (TorchScript: the extra file ``fedsilo.json``; ONNX: the metadata property
``fedsilo``), so the preprocessing and the class names go wherever the file goes.

After writing, the file is loaded back (``torch.jit.load``, ``onnxruntime``) and run on a
batch; the largest absolute difference from PyTorch's logits must be at most
:data:`TOLERANCE`, or the export fails (and nothing is written: a file already at
``--out`` stays as it was).
"""

from __future__ import annotations

import errno
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedsilo.errors import ModelError
from fedsilo.modelfile import ModelCard, load_model

#: the largest |PyTorch − export| accepted on any logit of the check batch
TOLERANCE = 1e-5
FORMATS = ("torchscript", "onnx")
#: images in the check batch (the ONNX graph is exported with a dynamic batch size)
CHECK_BATCH = 8


def check_batch(card: ModelCard, *, seed: int = 0) -> Any:
    """A batch shaped like the model's input: normalized pixels are roughly standard normal."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randn(CHECK_BATCH, *card.input_shape, generator=generator)


def export_model(model_path: str | Path, *, fmt: str, out: str | Path,
                 log: Any = None) -> float:
    """Write the export of ``model_path`` to ``out``; returns the max abs difference.

    The export is written to a temporary file beside ``out``, loaded back and checked there,
    and renamed to ``out`` only once it passed: a failed export (a bug, a full disk, a
    difference over :data:`TOLERANCE`) leaves whatever was at ``out`` as it was."""
    import torch

    if fmt not in FORMATS:
        raise ModelError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    model, card, weights = load_model(model_path)
    out = Path(out)
    if out.is_dir():
        raise ModelError(f"--out {out} is a directory; give the file to write")
    batch = check_batch(card)
    with torch.no_grad():
        expected = model(batch).numpy()
    meta = json.dumps(dict(card.raw), sort_keys=True)
    tmp = _temporary(out)
    try:
        try:
            got = _torchscript(model, batch, tmp, meta) if fmt == "torchscript" \
                else _onnx(model, batch, tmp, meta)
        except (ModelError, OSError):
            raise
        except Exception as exc:  # noqa: BLE001 - the exporters raise many types; one answer
            cause = _os_error(exc)
            if cause is not None:
                raise cause from None
            raise ModelError(f"{fmt} export of {weights} failed: {type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:500]}") from None
        diff = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
        verdict = "ok" if diff <= TOLERANCE else "TOO LARGE"
        print(f"fedsilo export: {fmt} {out}: max |PyTorch - {fmt}| = {diff:.3g} over "
              f"{CHECK_BATCH}x{card.num_classes} logits (tolerance {TOLERANCE:g}): {verdict}",
              file=sys.stdout if log is None else log)
        if not diff <= TOLERANCE:  # NaN fails too
            raise ModelError(f"the {fmt} export of {weights} differs from PyTorch by "
                             f"{diff:.3g} > {TOLERANCE:g}; it was not written to {out}")
        os.replace(tmp, out)
    except OSError as exc:
        raise _write_error(exc, out) from None
    finally:
        tmp.unlink(missing_ok=True)  # this call's own temporary, never ``out``
    return diff


def _temporary(out: Path) -> Path:
    """A new empty file beside ``out`` (same file system: the rename is atomic)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as exc:
        raise _write_error(exc, out) from None
    os.close(fd)
    return Path(name)


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind an exporter's own exception (torch's zip writer and ONNX wrap
    it), if any."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return None


def _write_error(exc: OSError, out: Path) -> ModelError:
    unchanged = f"{out} is unchanged" if out.exists() else "nothing was written"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ModelError(f"no space left on the device (or quota) while writing {out}; "
                          f"{unchanged}: free space there and run fedsilo export again")
    if exc.errno == errno.EROFS:
        return ModelError(f"cannot write {out}: the file system is read-only; {unchanged}: "
                          f"choose another --out")
    return ModelError(f"cannot write {out}: {exc.strerror or exc}; {unchanged}: choose "
                      f"another --out")


def _torchscript(model: Any, batch: Any, out: Path, meta: str) -> np.ndarray:
    import warnings

    import torch

    # TorchScript is deprecated in favour of torch.export, but it is what C++ (libtorch)
    # and most serving stacks load today: asked for by name, it is made without a warning
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        with torch.no_grad():
            traced = torch.jit.trace(model, batch, check_trace=False)
        with out.open("wb") as handle:
            torch.jit.save(traced, handle, _extra_files={"fedsilo.json": meta})
            handle.flush()
            os.fsync(handle.fileno())
        loaded = torch.jit.load(str(out), map_location="cpu")
        with torch.no_grad():
            return loaded(batch).numpy()


def _onnx(model: Any, batch: Any, out: Path, meta: str) -> np.ndarray:
    import onnx
    import onnxruntime
    import torch

    program = torch.onnx.export(
        model, (batch,), None, input_names=["images"], output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = "fedsilo", meta
    with out.open("wb") as handle:
        handle.write(proto.SerializeToString())
        handle.flush()
        os.fsync(handle.fileno())
    onnx.checker.check_model(str(out))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": batch.numpy()})[0]
