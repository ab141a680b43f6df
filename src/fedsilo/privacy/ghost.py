"""Per-sample clipping without per-sample gradients of the big layers: mixed ghost clipping
(Bu, Mao & Xu, "Scalable and Efficient Training of Large Convolutional Neural Networks with
Differential Privacy", NeurIPS 2022; Li et al. 2022 for the ghost norm of linear layers).

One forward pass keeps each parametrized layer's input a and, through
``torch.autograd.grad`` on the layer outputs, the gradient b of the summed loss with respect
to its output (no weight gradients are formed).  From those, each sample's gradient norm:

- Linear (inputs N×d): ‖a_i b_iᵀ‖ = ‖a_i‖·‖b_i‖;
- Conv2d: with a_i unfolded to T×(k²c) and b_i to T×p, ‖Σ_t a_t b_tᵀ‖² is either
  Σ_{t,t'} (a_t·a_t')(b_t·b_t') (ghost norm, O(T²(d+p)) per sample) or the norm of the
  explicit per-sample gradient (O(T·d·p), formed by one grouped convolution backward pass,
  Rochette et al. 2019), whichever takes fewer operations for that layer
  (:func:`conv_method`; Bu et al. 2022 compare memory instead, and pick the ghost norm for
  layers where it is slower);
- GroupNorm, LayerNorm: per channel Σ x̂·b and Σ b, which are small;
- Embedding: ‖g_i‖² = Σ_{t,t'} [index_t = index_t'] b_t·b_t' over the sample's positions.

The clipped sum Σ_i c_i g_i, c_i = min(1, C/‖g_i‖), is then formed from the same a and b
without a second backward pass through the model ("book-keeping", Bu, Wang, Zha & Karypis,
ICML 2023): for a Linear layer (c ⊙ b)ᵀ a, for a convolution the ordinary weight gradient
of c ⊙ b (one convolution backward pass, the non-private step's own kernel) or, where the
per-sample gradients were formed for the norm, their contraction with c.  Models with
another parametrized layer type are not supported here (the engine uses Opacus's hooks for
them), nor are models that share weights (a layer run twice in one forward pass, or one
parameter in two layers): the formulas above take one input and one output gradient per
parameter, and would silently give the wrong norms and sums.  Those raise
:class:`SharedLayerError`.

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

SUPPORTED = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)


def supports(model: nn.Module) -> bool:
    """Whether every layer of ``model`` that owns trainable parameters is one this handles."""
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and (type(module) not in SUPPORTED or _unsupported_conv(module)
                    or _unsupported_embedding(module)):
            return False
    return True


def _unsupported_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"
                                              or isinstance(module.padding, str))


def _unsupported_embedding(module: nn.Module) -> bool:
    # max_norm rewrites the weight in the forward pass; sparse and frequency-scaled
    # gradients are not the plain sums formed here
    return isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse
                                                 or module.scale_grad_by_freq)


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
        #: output positions (H×W) of each convolution, seen by :meth:`check_forward`
        self.positions: dict[nn.Module, int] = {}
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
            self.positions = {m: outs[0].shape[2] * outs[0].shape[3]
                              for m, outs in self.runs.items() if isinstance(m, nn.Conv2d)}
        finally:
            self.capturing = False
            self._forget()
            self.model.train(was_training)

    def describe(self, *, rows: int) -> str:
        """How each layer is clipped at a batch of ``rows`` (for the log), e.g.
        ``"Conv2d: per-sample gradients (features.0, features.3); Linear: ghost norm (2)"``."""
        counts: dict[str, list[str]] = {}
        for module in self.layers:
            kind = type(module).__name__
            if isinstance(module, nn.Conv2d) and module in self.positions:
                method = conv_method(module, positions=self.positions[module], rows=rows)
                kind += ": ghost norm" if method == "ghost" else ": per-sample gradients"
            elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                kind += ": per-sample gradients"
            else:
                kind += ": ghost norm"
            counts.setdefault(kind, []).append(self.names[module] or "(model)")
        return "; ".join(f"{kind} ({', '.join(names) if len(names) <= 4 else len(names)})"
                         for kind, names in counts.items())

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
    weight: Any = module.weight
    bias: Any = getattr(module, "bias", None)  # an Embedding has none
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
        return _conv(module, a, b, n=n, group=group, use_w=use_w, use_b=use_b)
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
    if isinstance(module, nn.LayerNorm):
        return _layer_norm(module, a, b, n=n, group=group, use_w=use_w, use_b=use_b)
    if isinstance(module, nn.Embedding):
        return _embedding(module, a, b, n=n, group=group)
    raise TypeError(f"no per-sample norm for {type(module).__name__}")


def _layer_norm(module: nn.LayerNorm, a: torch.Tensor, b: torch.Tensor, *, n: int, group: int,
                use_w: bool, use_b: bool) -> _Part:
    """LayerNorm: per sample, Σ over its positions (and views) of x̂ ⊙ b and of b, the size
    of the normalized shape (small: formed explicitly)."""
    weight, bias = module.weight, module.bias
    normalized = F.layer_norm(a, module.normalized_shape, eps=module.eps)
    shape = tuple(module.normalized_shape)
    g_w = (normalized * b).reshape(n, -1, *shape).sum(1)
    g_b = b.reshape(n, -1, *shape).sum(1)
    norm_sq = torch.zeros(n, device=a.device, dtype=b.dtype)
    if use_w:
        norm_sq = norm_sq + g_w.reshape(n, -1).pow(2).sum(1)
    if use_b:
        norm_sq = norm_sq + g_b.reshape(n, -1).pow(2).sum(1)

    def write(c: torch.Tensor) -> None:
        if use_w:
            weight.grad = torch.einsum("i,i...->...", c, g_w)
        if use_b:
            bias.grad = torch.einsum("i,i...->...", c, g_b)
    return _Part(norm_sq, write)


def _embedding(module: nn.Embedding, index: torch.Tensor, b: torch.Tensor, *, n: int,
               group: int) -> _Part:
    """Embedding: sample i's gradient adds b_t to row index_t at each of its positions t
    (rows of ``padding_idx`` get none, as in torch), so ‖g_i‖² = Σ_{t,t'} [index_t =
    index_t'] b_t·b_t' (a ghost norm over its positions), and the clipped sum adds c_i b_t
    to row index_t."""
    weight = module.weight
    dim = b.shape[-1]
    index = index.reshape(n, -1)
    b = b.reshape(n, -1, dim)
    if module.padding_idx is not None:
        b = b * (index != module.padding_idx).unsqueeze(-1).to(b.dtype)
    same = (index.unsqueeze(2) == index.unsqueeze(1)).to(b.dtype)
    norm_sq = (same * torch.bmm(b, b.transpose(1, 2))).sum((1, 2))

    def write(c: torch.Tensor) -> None:
        grad = torch.zeros(weight.shape, dtype=b.dtype, device=b.device)
        weight.grad = grad.index_add_(0, index.reshape(-1),
                                      (b * c.view(n, 1, 1)).reshape(-1, dim))
    return _Part(norm_sq, write)


#: per-sample gradients of one layer beyond this many bytes are never formed (the ghost norm
#: is used instead, whatever it costs)
PER_SAMPLE_BYTES = 256 * 2**20


def conv_method(module: nn.Conv2d, *, positions: int, rows: int) -> str:
    """How the per-sample norms of a convolution are formed: ``"ghost"`` (Gram matrices of
    its T positions, O(T²(d+p)) per sample) or ``"per_sample"`` (its per-sample gradients,
    O(T·d·p) per sample, from one grouped convolution backward pass), whichever costs fewer
    operations, the per-sample gradients only while ``rows`` of them fit in
    :data:`PER_SAMPLE_BYTES`.  A function of the shapes alone, so every run of the same
    job chooses alike (a resumed run stays bit-identical).

    (Bu et al. 2022 compare the memory of the two, 2T² against d·p; counted in operations
    the explicit gradients win more often, and a grouped backward pass forms them at about
    the speed of the ordinary weight gradient: measured in benchmarks/RESULTS.md, #27.)

    >>> conv_method(nn.Conv2d(64, 64, 3), positions=28 * 28, rows=64)   # ResNet-18 layer1
    'per_sample'
    >>> conv_method(nn.Conv2d(256, 256, 3), positions=7 * 7, rows=64)   # layer3
    'ghost'
    """
    d = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    p = module.out_channels
    if positions * (d + p) < d * p or 4 * rows * d * p > PER_SAMPLE_BYTES:
        return "ghost"
    return "per_sample"


def _conv(module: nn.Conv2d, a: torch.Tensor, b: torch.Tensor, *, n: int, group: int,
          use_w: bool, use_b: bool) -> _Part:
    """A convolution's norms (:func:`conv_method`) and clipped sum: the sum is the ordinary
    weight gradient of the output gradients scaled by each sample's factor (one
    convolution backward pass, as the non-private step's), or, where the per-sample
    gradients were formed anyway, their contraction with the factors."""
    weight, bias = module.weight, module.bias
    rows, p = a.shape[0], b.shape[1]
    positions = group * b.shape[2] * b.shape[3]
    method = conv_method(module, positions=positions, rows=rows) if use_w else "none"
    bias_sum = b.reshape(n, group, p, -1).sum((1, 3))
    norm_sq: Any = 0
    per_sample = None
    if method == "per_sample":
        per_sample = _conv_per_row(module, a, b)
        if group > 1:
            per_sample = per_sample.view(n, group, -1).sum(1)
        norm_sq = per_sample.reshape(n, -1).pow(2).sum(1)
    elif method == "ghost":
        cols = F.unfold(a, module.kernel_size, dilation=module.dilation,
                        padding=module.padding, stride=module.stride)   # rows × (c k²) × T
        grads = b.reshape(rows, p, -1)                                 # rows × p × T
        if group > 1:  # a sample's views are more positions: N × · × KT
            cols, grads = _positions(cols, group), _positions(grads, group)
        norm_sq = (torch.bmm(cols.transpose(1, 2), cols)
                   * torch.bmm(grads.transpose(1, 2), grads)).sum((1, 2))
        del cols, grads
    if use_b:
        norm_sq = norm_sq + bias_sum.pow(2).sum(1)

    def write(c: torch.Tensor) -> None:
        if use_w:
            if per_sample is not None:
                weight.grad = (c @ per_sample.reshape(n, -1)).view_as(weight)
            else:
                scaled = b * c.repeat_interleave(group).view(-1, 1, 1, 1)
                weight.grad = _conv_weight_grad(module, a, scaled, groups=1)
        if use_b:
            bias.grad = c @ bias_sum
    return _Part(norm_sq, write)


def _conv_weight_grad(module: nn.Conv2d, a: torch.Tensor, b: torch.Tensor, *, groups: int
                      ) -> torch.Tensor:
    """The weight gradient of ``module`` for input ``a`` and output gradient ``b``; with
    ``groups`` = rows, ``a`` and ``b`` folded into one image of rows × channels, it is
    each row's gradient (the weight's values are not needed: a stand-in of its shape, on
    the CPU one of zero strides that takes no memory; cuDNN may want a real one)."""
    weight = module.weight
    shape = (weight.shape[0] * groups, *weight.shape[1:])
    stand_in = torch.empty((), dtype=a.dtype, device=a.device).expand(shape) \
        if a.device.type == "cpu" else torch.empty(shape, dtype=a.dtype, device=a.device)
    padding = module.padding
    assert not isinstance(padding, str), "supports() refuses string padding"
    return torch.ops.aten.convolution_backward(
        b, a, stand_in, None, module.stride, padding, module.dilation, False, (0, 0),
        groups, (False, True, False))[1]


def _conv_per_row(module: nn.Conv2d, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each row's weight gradient, rows × p × c × k × k: one grouped backward pass over the
    rows side by side as the channels of one image (the grouped-convolution form of
    Rochette et al. 2019, as ``torch.func.vmap`` batches a convolution's backward)."""
    rows = a.shape[0]
    grads = _conv_weight_grad(module, a.reshape(1, -1, *a.shape[2:]),
                              b.reshape(1, -1, *b.shape[2:]), groups=rows)
    return grads.view(rows, *module.weight.shape)


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
