"""Per-sample clipping without per-sample gradients of the big layers: mixed ghost clipping
(Bu, Mao & Xu, "Scalable and Efficient Training of Large Convolutional Neural Networks with
Differential Privacy", NeurIPS 2022; Li et al. 2022 for the ghost norm of linear layers).

One forward pass keeps each parametrized layer's input a and, through
``torch.autograd.grad`` on the layer outputs, the gradient b of the summed loss with respect
to its output (no weight gradients are formed).  From those, each sample's gradient norm:

- Linear (inputs N×d): ‖a_i b_iᵀ‖ = ‖a_i‖·‖b_i‖;
- Conv2d: with a_i unfolded to T×(k²c) and b_i to T×p, ‖Σ_t a_t b_tᵀ‖² is either
  Σ_{t,t'} (a_t·a_t')(b_t·b_t') (ghost norm, O(T²) per sample) or the norm of the explicit
  per-sample gradient (O(k²c·p)), whichever is cheaper for that layer — Bu et al.'s rule;
- GroupNorm: per channel Σ_hw x̂·b and Σ_hw b, which are small.

The clipped sum Σ_i c_i g_i, c_i = min(1, C/‖g_i‖), is then formed from the same a and b
without a second backward pass ("book-keeping", Bu, Wang, Zha & Karypis, ICML 2023): for
a Linear layer (c ⊙ b)ᵀ a, for a convolution the same over the unfolded positions (or the
per-sample gradients already formed for the norm, contracted with c).  Models with another
parametrized layer type are not supported here (the engine uses Opacus's hooks for them), nor
are models that share weights (a layer run twice in one forward pass, or one parameter in two
layers): the formulas above take one input and one output gradient per parameter, and would
silently give the wrong norms and sums.  Those raise :class:`SharedLayerError`.

Augmentation multiplicity (``group`` K, De et al. 2022): sample i is K consecutive rows (its
views) and g_i the mean of their gradients.  A sample's views are then what a sequence's
positions are to a Linear layer, and extra positions to a convolution, so the same formulas
give ‖g_i‖ and Σ c_i g_i over the K·T positions of each sample; the loss is divided by K.
Norms and sums are formed in fp32 from whatever precision autocast ran the forward pass in.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager

import torch
from torch import nn
from torch.nn import functional as F

from fedsilo.errors import ModelError

SUPPORTED = (nn.Linear, nn.Conv2d, nn.GroupNorm)


def supports(model: nn.Module) -> bool:
    """Whether every layer of ``model`` that owns trainable parameters is one this handles."""
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and (type(module) not in SUPPORTED or _unsupported_conv(module)):
            return False
    return True


def _unsupported_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"
                                              or isinstance(module.padding, str))


class SharedLayerError(ModelError):
    """A model shares weights: a layer runs more than once in one forward pass, or two layers
    own the same parameter.  Mixed ghost clipping cannot clip it; Opacus's hooks can."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{reason}; mixed ghost clipping handles each parametrized layer once; "
                         f"use dp.grad_sample_mode=hooks")
        self.reason = reason


class GhostClipper:
    """Clipped per-sample gradient sums for ``model``; hooks are registered once."""

    def __init__(self, model: nn.Module) -> None:
        if not supports(model):
            raise ValueError("model has layers mixed ghost clipping does not cover")
        self.model = model
        self.layers = [m for m in model.modules()
                       if any(p.requires_grad for p in m.parameters(recurse=False))]
        self.capturing = False
        self.inputs: dict[nn.Module, torch.Tensor] = {}
        self.outputs: dict[nn.Module, torch.Tensor] = {}
        self.versions: dict[nn.Module, int] = {}
        self.names = {m: name for name, m in model.named_modules()}
        _refuse_tied_parameters(self.layers, self.names)
        #: the outputs of every run of each layer in the forward pass being captured
        self.runs: dict[nn.Module, list[torch.Tensor]] = {}
        self.handles = [m.register_forward_hook(self._capture) for m in self.layers]

    def _capture(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        # a run outside autograd (under torch.no_grad) adds nothing to any gradient
        if self.capturing and output.requires_grad:
            self.runs.setdefault(module, []).append(output)
            self.inputs[module] = inputs[0].detach()
            self.outputs[module] = output
            self.versions[module] = output._version

    def clipped_sum(self, images: torch.Tensor, labels: torch.Tensor, *, max_grad_norm: float,
                    loss_fn: Callable = F.cross_entropy, group: int = 1,
                    autocast: Callable[[], ContextManager[Any]] = nullcontext) -> torch.Tensor:
        """Set each ``p.grad`` to Σ_i min(1, C/(‖g_i‖+1e-6)) g_i; returns the summed loss.

        ``group`` > 1: each sample is ``group`` consecutive rows, g_i the mean of their
        gradients; ``autocast``: the context of the forward pass (mixed precision)."""
        self.capturing = True
        try:
            with autocast():
                losses = loss_fn(self.model(images), labels, reduction="none")
            self._refuse_repeated_runs()
        except BaseException:
            self._forget()
            raise
        finally:
            self.capturing = False
        self.runs.clear()
        layers = list(self.outputs)
        for module in layers:
            # b must be the gradient w.r.t. what the layer computed; an in-place change of
            # its output afterwards (out += identity, ReLU(inplace=True)) would alter that
            if self.outputs[module]._version != self.versions[module]:
                self._forget()
                raise RuntimeError(f"the output of layer '{self.names[module]}' "
                                   f"({type(module).__name__}) is modified in place")
        total = wide(losses).sum() / group
        backprops = torch.autograd.grad(total, [self.outputs[m] for m in layers])
        self.outputs.clear()
        inputs, self.inputs = self.inputs, {}
        n = images.shape[0] // group
        norms_sq = torch.zeros(n, device=images.device, dtype=total.dtype)
        parts = []
        for module, b in zip(layers, backprops):
            part = _per_sample(module, inputs[module], b, group=group)
            norms_sq += part.norm_sq
            parts.append(part)
        factor = (max_grad_norm / (norms_sq.sqrt() + 1e-6)).clamp(max=1.0)
        for part in parts:
            part.write_clipped_sum(factor)
        return total.detach()

    def check_forward(self, images: torch.Tensor) -> None:
        """One training-mode forward pass on ``images`` (two samples are enough) for what only
        running the model shows: :class:`SharedLayerError` where a layer runs more than once,
        and a plain :class:`ModelError` where, besides, the output of one of its runs does not
        reach the model's output (Opacus's hooks then never form that layer's per-sample
        gradients: they wait for a backward pass through every run).  The global random state
        is left as it was; a forward pass that fails is left to the caller's trial step."""
        was_training = self.model.training
        self.model.train()
        on_cpu = images.device.type == "cpu"  # the CPU generator is always forked
        self.capturing = True
        try:
            with torch.random.fork_rng(devices=[] if on_cpu else [images.device],
                                       device_type=None if on_cpu else images.device.type):
                try:
                    output = self.model(images)
                except RuntimeError:
                    return
            self._refuse_dead_runs(output)
            self._refuse_repeated_runs()
        finally:
            self.capturing = False
            self._forget()
            self.model.train(was_training)

    def _refuse_repeated_runs(self) -> None:
        repeated = [f"layer '{self.names[m]}' ({type(m).__name__}) runs {len(outs)} times"
                    for m, outs in self.runs.items() if len(outs) > 1]
        if repeated:
            raise SharedLayerError(", ".join(repeated) + " in one forward pass")

    def _refuse_dead_runs(self, output: torch.Tensor) -> None:
        repeated = [(m, i) for m, outs in self.runs.items() if len(outs) > 1
                    for i in range(len(outs))]
        if not repeated:
            return
        grads = torch.autograd.grad(output.sum(), [self.runs[m][i] for m, i in repeated],
                                    allow_unused=True)
        for (module, i), grad in zip(repeated, grads):
            if grad is None:
                raise ModelError(
                    f"layer '{self.names[module]}' ({type(module).__name__}) runs "
                    f"{len(self.runs[module])} times in one forward pass and the output of run "
                    f"{i + 1} does not reach the model's output: neither mixed ghost clipping nor "
                    f"Opacus's hooks give per-sample gradients then; make that run under "
                    f"torch.no_grad() or drop it")

    def _forget(self) -> None:
        for store in (self.inputs, self.outputs, self.versions, self.runs):
            store.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _Part:
    """One layer's per-sample squared norms, and how to form its clipped gradient sum."""

    def __init__(self, norm_sq: torch.Tensor, write) -> None:
        self.norm_sq, self.write_clipped_sum = norm_sq, write


def _per_sample(module: nn.Module, a: torch.Tensor, b: torch.Tensor, *, group: int = 1
                ) -> _Part:
    """Layer input ``a`` and output gradient ``b`` of each row; a sample is ``group`` rows."""
    a, b = wide(a), wide(b)
    n = a.shape[0] // group
    weight, bias = module.weight, module.bias
    use_w = weight is not None and weight.requires_grad
    use_b = bias is not None and bias.requires_grad
    if isinstance(module, nn.Linear):
        a, b = a.reshape(n, -1, a.shape[-1]), b.reshape(n, -1, b.shape[-1])
        if a.shape[1] == 1:
            a2, b2 = a[:, 0], b[:, 0]
            norm_sq = a2.pow(2).sum(1) * b2.pow(2).sum(1) if use_w else 0
        else:  # a sequence: ghost norm over its positions
            norm_sq = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(b, b.transpose(1, 2))
                       ).sum((1, 2)) if use_w else 0
        bias_sum = b.sum(1)
        if use_b:
            norm_sq = norm_sq + bias_sum.pow(2).sum(1)

        def write(c: torch.Tensor) -> None:
            cb = b * c.view(n, 1, 1)
            if use_w:
                weight.grad = cb.reshape(-1, cb.shape[-1]).t() @ a.reshape(-1, a.shape[-1])
            if use_b:
                bias.grad = c @ bias_sum
        return _Part(norm_sq, write)
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=module.padding,
                        stride=module.stride)                       # N × (c k²) × T
        grads = b.reshape(a.shape[0], b.shape[1], -1)               # N × p × T
        if group > 1:  # a sample's views are more positions: N/K × · × KT
            cols = _positions(cols, group)
            grads = _positions(grads, group)
        positions, d, p = cols.shape[2], cols.shape[1], grads.shape[1]
        per_sample = None
        if not use_w:
            norm_sq = 0
        elif 2 * positions * positions < d * p:   # Bu et al.: ghost norm is cheaper
            norm_sq = (torch.bmm(cols.transpose(1, 2), cols)
                       * torch.bmm(grads.transpose(1, 2), grads)).sum((1, 2))
        else:
            per_sample = torch.bmm(grads, cols.transpose(1, 2))    # N × p × (c k²)
            norm_sq = per_sample.pow(2).sum((1, 2))
        bias_sum = grads.sum(2)
        if use_b:
            norm_sq = norm_sq + bias_sum.pow(2).sum(1)

        def write(c: torch.Tensor) -> None:
            if use_w:
                if per_sample is not None:
                    flat = torch.einsum("i,ipd->pd", c, per_sample)
                else:
                    cg = (grads * c.view(n, 1, 1)).transpose(0, 1).reshape(p, -1)
                    flat = cg @ cols.transpose(1, 2).reshape(-1, d)
                weight.grad = flat.view_as(weight)
            if use_b:
                bias.grad = c @ bias_sum
        return _Part(norm_sq, write)
    if isinstance(module, nn.GroupNorm):
        normalized = F.group_norm(a, module.num_groups, eps=module.eps)
        dims = tuple(range(2, a.dim()))
        g_w, g_b = (normalized * b).sum(dims), b.sum(dims)
        if group > 1:
            g_w, g_b = g_w.view(n, group, -1).sum(1), g_b.view(n, group, -1).sum(1)
        norm_sq = torch.zeros(n, device=a.device, dtype=b.dtype)
        if use_w:
            norm_sq = norm_sq + g_w.pow(2).sum(1)
        if use_b:
            norm_sq = norm_sq + g_b.pow(2).sum(1)

        def write(c: torch.Tensor) -> None:
            if use_w:
                weight.grad = c @ g_w
            if use_b:
                bias.grad = c @ g_b
        return _Part(norm_sq, write)
    raise TypeError(f"no per-sample norm for {type(module).__name__}")


def wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 when autocast left it in fp16 or bf16 (else as it is)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _positions(x: torch.Tensor, group: int) -> torch.Tensor:
    """(N·K) × d × T rows -> N × d × (K·T): each sample's K views side by side."""
    rows, d, t = x.shape
    return x.view(rows // group, group, d, t).transpose(1, 2).reshape(rows // group, d, group * t)


def _refuse_tied_parameters(layers: list[nn.Module], names: dict[nn.Module, str]) -> None:
    """Raise :class:`SharedLayerError` where two layers own the same parameter (tied weights):
    each layer would overwrite the other's ``p.grad`` and the per-sample norm would miss the
    cross term."""
    owner: dict[int, nn.Module] = {}
    for module in layers:
        for p in module.parameters(recurse=False):
            first = owner.setdefault(id(p), module)
            if first is not module:
                raise SharedLayerError(
                    f"layers '{names[first]}' ({type(first).__name__}) and '{names[module]}' "
                    f"({type(module).__name__}) share a parameter")


def clipper_for(model: nn.Module, *, sample: torch.Tensor) -> GhostClipper:
    """A :class:`GhostClipper` for ``model`` once a forward pass on ``sample`` shows no weight
    sharing; else :class:`SharedLayerError` (or :class:`ModelError`), with no hook left behind."""
    clipper = GhostClipper(model)
    try:
        clipper.check_forward(sample)
    except BaseException:
        clipper.remove()
        raise
    return clipper
