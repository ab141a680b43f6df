"""``fedsilo export``: a trained model as TorchScript or ONNX, checked against PyTorch.

The exported graph is the model itself: input ``images``, float32 N x C x H x W already
normalized as the model card says (``(pixel / 255 - mean) / std``), output ``logits``
N x K (softmax gives the probabilities ``fedsilo predict`` writes).  The card travels
inside the file (TorchScript: the extra file ``fedsilo.json``; ONNX: the metadata property
``fedsilo``), so the preprocessing and the class names go wherever the file goes.

After writing, the file is loaded back (``torch.jit.load``, ``onnxruntime``) and run on a
batch; the largest absolute difference from PyTorch's logits must be at most
:data:`TOLERANCE`, or the export fails (and the file is removed).
"""

from __future__ import annotations

import json
import sys
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
    return torch.randn(CHECK_BATCH, *card.image_shape, generator=generator)


def export_model(model_path: str | Path, *, fmt: str, out: str | Path,
                 log: Any = sys.stdout) -> float:
    """Write the export of ``model_path`` to ``out``; returns the max abs difference."""
    import torch

    if fmt not in FORMATS:
        raise ModelError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    model, card, weights = load_model(model_path)
    out = Path(out)
    if out.is_dir():
        raise ModelError(f"--out {out} is a directory; give the file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    batch = check_batch(card)
    with torch.no_grad():
        expected = model(batch).numpy()
    meta = json.dumps(dict(card.raw), sort_keys=True)
    try:
        got = _torchscript(model, batch, out, meta) if fmt == "torchscript" \
            else _onnx(model, batch, out, meta)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - the exporters raise many types; one answer
        out.unlink(missing_ok=True)
        raise ModelError(f"{fmt} export of {weights} failed: {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:500]}") from None
    diff = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
    verdict = "ok" if diff <= TOLERANCE else "TOO LARGE"
    print(f"fedsilo export: {fmt} {out}: max |PyTorch - {fmt}| = {diff:.3g} over "
          f"{CHECK_BATCH}x{card.num_classes} logits (tolerance {TOLERANCE:g}): {verdict}",
          file=log)
    if not diff <= TOLERANCE:  # NaN fails too
        out.unlink(missing_ok=True)
        raise ModelError(f"the {fmt} export of {weights} differs from PyTorch by {diff:.3g} "
                         f"> {TOLERANCE:g}; the file was removed")
    return diff


def _torchscript(model: Any, batch: Any, out: Path, meta: str) -> np.ndarray:
    import warnings

    import torch

    from fedsilo.rundir import atomic_file

    # TorchScript is deprecated in favour of torch.export, but it is what C++ (libtorch)
    # and most serving stacks load today: asked for by name, it is made without a warning
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        with torch.no_grad():
            traced = torch.jit.trace(model, batch, check_trace=False)
        with atomic_file(out) as handle:
            torch.jit.save(traced, handle, _extra_files={"fedsilo.json": meta})
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
    from fedsilo.rundir import atomic_file

    with atomic_file(out) as handle:
        handle.write(proto.SerializeToString())
    onnx.checker.check_model(str(out))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": batch.numpy()})[0]
