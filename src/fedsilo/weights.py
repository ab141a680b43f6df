"""Model weights as one flat, contiguous float32 vector: the unit that crosses MPI.

Tensors are laid out sorted by name (as Horovod does), so every rank agrees on the layout
whatever order a model registers its parameters in.  Only floating-point tensors of the
state dict travel; integer buffers (none in the zoo) would stay local.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class WeightLayout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numel: int

    @classmethod
    def of(cls, model: nn.Module) -> "WeightLayout":
        state = model.state_dict()
        names = tuple(sorted(k for k, v in state.items() if v.is_floating_point()))
        shapes = tuple(tuple(state[n].shape) for n in names)
        offsets, total = [], 0
        for shape in shapes:
            offsets.append(total)
            total += int(np.prod(shape, dtype=np.int64))
        return cls(names, shapes, tuple(offsets), total)

    def empty(self, *, pinned: bool = False) -> np.ndarray:
        """A float32 buffer for the whole model.  ``pinned``: page-locked host memory (when
        CUDA is present), so copies between the GPU and the buffer MPI sends are DMA
        transfers instead of staged through pageable memory."""
        if pinned and torch.cuda.is_available():
            return torch.empty(self.numel, dtype=torch.float32, pin_memory=True).numpy()
        return np.empty(self.numel, dtype=np.float32)

    def flatten(self, model: nn.Module, out: np.ndarray | None = None) -> np.ndarray:
        """Copy the model's weights into ``out`` (allocated when None) and return it."""
        out = self.empty() if out is None else out
        view = torch.from_numpy(out)
        state = model.state_dict()
        for name, shape, offset in zip(self.names, self.shapes, self.offsets):
            tensor = state[name].detach()
            view[offset: offset + tensor.numel()].copy_(tensor.reshape(-1))
        return out

    def load(self, model: nn.Module, vector: np.ndarray) -> None:
        """Copy ``vector`` into the model's weights (in place, keeping the optimizer's refs)."""
        if vector.shape != (self.numel,):
            raise ValueError(f"weight vector has shape {vector.shape}, expected ({self.numel},)")
        source = torch.from_numpy(vector)
        state = model.state_dict()
        with torch.no_grad():
            for name, shape, offset in zip(self.names, self.shapes, self.offsets):
                tensor = state[name]
                tensor.copy_(source[offset: offset + tensor.numel()].view(shape))

    def to_state_dict(self, vector: np.ndarray) -> dict[str, torch.Tensor]:
        """A plain ``state_dict`` (CPU tensors, cloned) for ``torch.save``."""
        return {name: torch.from_numpy(vector[o: o + int(np.prod(s, dtype=np.int64))]
                                       .copy()).view(s)
                for name, shape, o in zip(self.names, self.shapes, self.offsets) for s in [shape]}
