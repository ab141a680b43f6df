"""What turns a built model into the one a run trains, for any model of the zoo: weights
from a file, the DP fix, which layers train, and the trial forward pass at build time.

Each step logs what it changed, and each refusal is a :class:`~fedsilo.errors.ModelError`
raised while the model is built, on every rank, before any data is read.
"""

from __future__ import annotations

import ast
import inspect
import logging
import math
import operator
import textwrap
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from fedsilo.errors import ModelError

log = logging.getLogger("fedsilo")

#: the in-place operators a DP fix rewrites out of place (``out += identity``)
_OUT_OF_PLACE = {operator.iadd: operator.add, operator.imul: operator.mul,
                 operator.isub: operator.sub, operator.itruediv: operator.truediv}


# -- weights from a file ------------------------------------------------------------------


def read_weights(path: str | Path, *, model_name: str) -> dict[str, torch.Tensor]:
    """A ``state_dict`` read with ``torch.load(weights_only=True)`` (no code runs)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"model.weights: file {path} not found (model {model_name!r})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, refused globals: all "not weights"
        raise ModelError(f"model.weights: {path} is not a weights file torch.load(..., "
                         f"weights_only=True) can read: {str(exc).splitlines()[0]}") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(
            state["state_dict"], Mapping):
        state = state["state_dict"]  # a training checkpoint that wraps its state dict
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ModelError(f"model.weights: {path} does not hold a state_dict (a mapping of "
                         f"parameter names to tensors), got {type(state).__name__}")
    return dict(state)


def mismatches(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """How ``state`` differs from ``model``'s state dict: missing and unexpected keys, and
    shapes that differ ([] when it loads as is)."""
    own = model.state_dict()
    problems = []
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_some(unexpected)}")
    shapes = [f"{k} {tuple(state[k].shape)} (the model has {tuple(v.shape)})"
              for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_some(shapes)}")
    return problems


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], *, model_name: str,
                 source: str) -> None:
    """Load ``state`` into ``model`` strictly, or a ModelError naming what does not fit."""
    problems = mismatches(model, state)
    if problems:
        raise ModelError(f"model.weights: {source} is not a state_dict of model {model_name!r} "
                         f"as built for this data: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def _some(items: list[str], limit: int = 4) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)"
                                       if len(items) > limit else "")


# -- module surgery -------------------------------------------------------------------------


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` by ``new``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def head_name(model: nn.Module) -> str:
    """The classifier: the last ``nn.Linear`` in module order (``fc``, ``classifier.1``,
    ``heads.head``...)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ModelError(f"{type(model).__name__} has no nn.Linear classifier to replace or "
                         f"train alone (its head is something else, e.g. a convolution)")
    return names[-1]


# -- the DP fix -------------------------------------------------------------------------------


def dp_fix(model: nn.Module, *, norm_groups: int = 32) -> tuple[nn.Module, list[str]]:
    """Make ``model`` trainable with DP-SGD, as Opacus's ``ModuleValidator.fix`` does, and
    say what changed: BatchNorm → GroupNorm (gcd(norm_groups, C) groups, the BatchNorm's
    affine weight and bias kept, running statistics dropped), in-place activations made
    out of place, other layers Opacus knows how to replace (MultiheadAttention →
    DPMultiheadAttention), and in-place residual additions (``out += identity``) in a
    ``forward`` rewritten out of place through torch.fx.  Returns the model and the changes.
    """
    changes: list[str] = []
    batch_norms = [(n, m) for n, m in model.named_modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for name, bn in batch_norms:
        groups = math.gcd(norm_groups, bn.num_features)
        gn = nn.GroupNorm(groups, bn.num_features, eps=bn.eps, affine=bn.affine)
        if bn.affine:
            with torch.no_grad():
                gn.weight.copy_(bn.weight)
                gn.bias.copy_(bn.bias)
            gn.weight.requires_grad_(bn.weight.requires_grad)
            gn.bias.requires_grad_(bn.bias.requires_grad)
        set_module(model, name, gn.to(_device_of(bn)))
    if batch_norms:
        changes.append(f"{len(batch_norms)} {type(batch_norms[0][1]).__name__} → GroupNorm "
                       f"({', '.join(n for n, _ in batch_norms[:3])}"
                       f"{', ...' if len(batch_norms) > 3 else ''})")
    inplace = [n for n, m in model.named_modules() if getattr(m, "inplace", False) is True]
    for name in inplace:
        model.get_submodule(name).inplace = False
    if inplace:
        changes.append(f"{len(inplace)} in-place activation(s) made out of place")
    model, more = _opacus_fix(model)
    changes += more
    model, rewritten = _out_of_place(model)
    if rewritten:
        changes.append(f"in-place updates in the forward() of {', '.join(rewritten)} "
                       f"rewritten out of place (torch.fx)")
    return model, changes


def _device_of(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _opacus_fix(model: nn.Module) -> tuple[nn.Module, list[str]]:
    from opacus.validators import ModuleValidator

    before = {n: type(m).__name__ for n, m in model.named_modules()}
    if not any(type(m) in ModuleValidator.FIXERS for m in model.modules()):
        return model, []
    fixed = ModuleValidator.fix(model)
    after = {n: type(m).__name__ for n, m in fixed.named_modules()}
    replaced = [f"{n} ({before[n]} → {after[n]})" for n in before
                if n in after and before[n] != after[n]]
    return fixed, [f"Opacus replaced {len(replaced)} layer(s): {_some(replaced)}"]


def _out_of_place(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """``model`` traced by torch.fx when a ``forward`` of its own classes updates a tensor in
    place (``out += identity``, ``F.relu(x, inplace=True)``: they break Opacus's per-sample
    gradient hooks): the traced graph records the out-of-place operation.  The model comes
    back unchanged when no forward does, or torch.fx cannot trace it (then the DP engine's
    trial step names the failure).  Returns the model and the classes whose forward was
    rewritten."""
    import torch.fx

    classes = sorted({type(m).__name__ for m in model.modules() if _updates_in_place(type(m))})
    if not classes:
        return model, []

    class Tracer(torch.fx.Tracer):
        # modules without children stay leaves: their training-mode branches (stochastic
        # depth, dropout) are then not frozen into the graph at trace time
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return super().is_leaf_module(m, qualname) or not any(True for _ in m.children())

    try:
        graph = Tracer().trace(model)
    except Exception as exc:  # any construct fx cannot trace: leave the model as written
        log.debug("torch.fx cannot trace %s (%s): in-place additions left as they are",
                  type(model).__name__, exc)
        return model, []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _OUT_OF_PLACE:
            node.target = _OUT_OF_PLACE[node.target]
        if node.op in ("call_function", "call_method") and node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}  # F.relu(x, inplace=True)
    rewritten = torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
    if set(model.state_dict()) != set(rewritten.state_dict()):
        # fx dropped modules that forward() never calls: keep the model's state dict
        return model, []
    return rewritten, classes


def _updates_in_place(cls: type) -> bool:
    """Whether ``cls.forward`` (a class outside torch.nn) has an augmented assignment."""
    forward = getattr(cls, "forward", None)
    if forward is None or cls.__module__.startswith("torch.nn"):
        return False
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):
        return False
    return any(isinstance(node, ast.AugAssign) or (
        isinstance(node, ast.keyword) and node.arg == "inplace"
        and isinstance(node.value, ast.Constant) and node.value.value is True)
        for node in ast.walk(tree))


# -- which layers train ---------------------------------------------------------------------


def blocks(model: nn.Module, *, head: str) -> list[str]:
    """The model's blocks in order, head excluded: its parametrized top-level children,
    descending into any child holding over 90 % of the parameters (``features`` of
    DenseNet/EfficientNet/ConvNeXt, ``encoder.layers`` of ViT); a child with no
    convolution or linear layer (a lone norm) joins the block before it."""
    total = sum(p.numel() for p in model.parameters())
    units = [n for n, m in model.named_children() if _size(m)]
    while True:
        big = next((u for u in units if u != head and not head.startswith(u + ".")
                    and _size(model.get_submodule(u)) > 0.9 * total
                    and any(True for _ in model.get_submodule(u).children())), None)
        if big is None:
            break
        i = units.index(big)
        inner = [f"{big}.{n}" for n, m in model.get_submodule(big).named_children() if _size(m)]
        units[i: i + 1] = inner
    units = [u for u in units if u != head and not head.startswith(u + ".")]
    merged: list[str] = []
    for u in units:
        weighty = any(isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention))
                      for m in model.get_submodule(u).modules())
        if weighty or not merged:
            merged.append(u)
        else:
            merged[-1] = f"{merged[-1]}+{u}"
    return merged


def _size(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def freeze(model: nn.Module, train_layers: str | int, *, head: str) -> list[str]:
    """Leave only ``train_layers`` trainable: ``all``, ``head`` (the classifier), or an
    integer N (the last N :func:`blocks` and the head).  Returns the trainable prefixes."""
    if train_layers == "all":
        return [""]
    trainable = [head]
    if train_layers != "head":
        found = blocks(model, head=head)
        n = int(train_layers)
        if not 1 <= n <= len(found):
            raise ModelError(f"model.train_layers={n}: the model has {len(found)} blocks "
                             f"({', '.join(found)}); use 1..{len(found)}, head or all")
        trainable = [p for b in found[-n:] for p in b.split("+")] + trainable
    for name, param in model.named_parameters():
        param.requires_grad_(any(name.startswith(p + ".") for p in trainable))
    return trainable


def describe_trainable(model: nn.Module) -> str:
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    train = sum(p.numel() for p in params if p.requires_grad)
    return f"{train:,} of {total:,} parameters trainable"


# -- the trial forward pass ------------------------------------------------------------------


def check_forward(model: nn.Module, *, model_name: str, in_channels: int,
                  image_size: tuple[int, int], num_classes: int, dense: bool = False) -> None:
    """Run a zero image through ``model``: a model that cannot take ``in_channels ×
    image_size`` images, or outputs another number of classes, fails here, at build time."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.zeros(1, in_channels, *image_size, device=_device_of(model)))
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise ModelError(f"model {model_name!r} cannot process images of shape "
                         f"{in_channels}x{image_size[0]}x{image_size[1]}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                         ) from None
    finally:
        model.train(was_training)
    if dense:  # a segmentation model: one logit per class and pixel
        if not isinstance(logits, torch.Tensor) or logits.shape != (1, num_classes,
                                                                    *image_size):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else "?"
            raise ModelError(f"model {model_name!r} outputs {shape} for one image; expected "
                             f"(1, {num_classes}, {image_size[0]}, {image_size[1]}) logits")
        return
    if not isinstance(logits, torch.Tensor) or logits.shape != (1, num_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelError(f"model {model_name!r} outputs {shape} for one image; expected "
                         f"(1, {num_classes}) logits")
