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
per-sample gradients already formed for the norm, contracted with c).  Models with another parametrized
layer type are not supported here (the engine uses Opacus's hooks for them).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

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
        self.handles = [m.register_forward_hook(self._capture) for m in self.layers]

    def _capture(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self.capturing:
            self.inputs[module] = inputs[0].detach()
            self.outputs[module] = output
            self.versions[module] = output._version

    def clipped_sum(self, images: torch.Tensor, labels: torch.Tensor, *, max_grad_norm: float,
                    loss_fn: Callable = F.cross_entropy) -> torch.Tensor:
        """Set each ``p.grad`` to Σ_i min(1, C/(‖g_i‖+1e-6)) g_i; returns the summed loss."""
        self.capturing = True
        try:
            losses = loss_fn(self.model(images), labels, reduction="none")
        finally:
            self.capturing = False
        layers = list(self.outputs)
        for module in layers:
            # b must be the gradient w.r.t. what the layer computed; an in-place change of
            # its output afterwards (out += identity, ReLU(inplace=True)) would alter that
            if self.outputs[module]._version != self.versions[module]:
                self.inputs.clear(), self.outputs.clear()
                raise RuntimeError(f"the output of layer '{self.names[module]}' "
                                   f"({type(module).__name__}) is modified in place")
        total = losses.sum()
        backprops = torch.autograd.grad(total, [self.outputs[m] for m in layers])
        self.outputs.clear()
        inputs, self.inputs = self.inputs, {}
        n = images.shape[0]
        norms_sq = torch.zeros(n, device=images.device, dtype=losses.dtype)
        parts = []
        for module, b in zip(layers, backprops):
            part = _per_sample(module, inputs[module], b)
            norms_sq += part.norm_sq
            parts.append(part)
        factor = (max_grad_norm / (norms_sq.sqrt() + 1e-6)).clamp(max=1.0)
        for part in parts:
            part.write_clipped_sum(factor)
        return total.detach()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _Part:
    """One layer's per-sample squared norms, and how to form its clipped gradient sum."""

    def __init__(self, norm_sq: torch.Tensor, write) -> None:
        self.norm_sq, self.write_clipped_sum = norm_sq, write


def _per_sample(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> _Part:
    n = a.shape[0]
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
        grads = b.reshape(n, b.shape[1], -1)                        # N × p × T
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
