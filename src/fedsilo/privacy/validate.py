"""Refuse models that DP-SGD cannot train, up front and naming the offending layer.

Three checks, cheapest first: layer types Opacus's ``ModuleValidator`` rejects (BatchNorm
mixes the samples of a batch) or cannot compute per-sample gradients for (a trainable
parameter a layer owns outside Opacus's layer types, such as ViT's class token), modules
that modify their input in place (they break the per-sample gradient hooks: "Output 0 of
BackwardHookFunction is a view and is being modified inplace"), and a trial
forward/backward pass on two samples, which catches what no static check sees (an
``out += identity`` inside a ``forward``).
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from fedsilo.errors import ModelError


def static_problems(model: nn.Module) -> list[str]:
    """Descriptions of the layers of ``model`` that DP-SGD cannot train ([] when none)."""
    problems = []
    unsupported = False  # the list of layers Opacus supports is said once
    was_training = model.training
    model.train()  # Opacus's validator also insists on training mode, which is not our point
    for name, module in model.named_modules():
        label = f"layer '{name or '(model)'}' ({type(module).__name__})"
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            problems.append(f"{label}: BatchNorm mixes the samples of a batch; use GroupNorm")
        elif getattr(module, "inplace", False) is True:
            problems.append(f"{label}: in-place operation breaks per-sample gradients; "
                            f"set inplace=False")
        else:
            for error in ModuleValidator.validate(module, strict=False):
                if not any(child for child in module.children()):
                    problems.append(f"{label}: {str(error).split('.')[0]}")
            own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if own and type(module) not in GradSampleModule.GRAD_SAMPLERS:
                problems.append(f"{label}: no per-sample gradient for its own parameter(s) "
                                f"{', '.join(own)}" + ("" if unsupported else (
                                    " (Opacus computes them for the layers "
                                    + ", ".join(sorted(t.__name__ for t in
                                                       GradSampleModule.GRAD_SAMPLERS))
                                    + "; freeze the others with model.train_layers)")))
                unsupported = True
    model.train(was_training)
    return problems


def check_model(model: nn.Module, *, name: str) -> None:
    """Raise :class:`ModelError` naming every layer of ``model`` that DP-SGD cannot train.

    >>> check_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)), name="demo")
    Traceback (most recent call last):
    ...
    fedsilo.errors.ModelError: model 'demo' cannot be trained with DP-SGD: layer '1' (BatchNorm2d): BatchNorm mixes the samples of a batch; use GroupNorm
    """  # noqa: E501
    problems = static_problems(model)
    if problems:
        raise ModelError(f"model {name!r} cannot be trained with DP-SGD: " + "; ".join(problems))


def check_trainable(step: Callable[[torch.Tensor], None], sample: torch.Tensor, *, name: str,
                    params: Sequence[nn.Parameter]) -> None:
    """Run one clipped per-sample-gradient ``step`` on ``sample`` (two images), then clear
    the gradients it left; a failure is a :class:`ModelError` naming the likely cause."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            step(sample)
    except RuntimeError as exc:
        raise ModelError(
            f"model {name!r} cannot be trained with DP-SGD: its first per-sample backward pass "
            f"fails ({str(exc).splitlines()[0]}); the usual cause is an in-place operation in a "
            f"forward() such as 'out += identity' (write 'out = out + identity')") from None
    finally:
        for p in params:
            p.grad = None
            p.grad_sample = None
