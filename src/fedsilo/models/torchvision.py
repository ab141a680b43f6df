"""Any torchvision classification model by name: ``model.name: tv:ARCH`` (``tv:resnet50``,
``tv:densenet121``, ``tv:efficientnet_b0``, ``tv:convnext_tiny``, ``tv:vit_b_16``...), built by
``torchvision.models.get_model`` and adapted to the shard set (docs/models.md):

- **channels**: the first 3-channel convolution takes the data's C channels; with pretrained
  weights its filters are summed over RGB for C = 1 (the standard trick: a grey image seen
  as R = G = B gives the same response), else tiled over the C channels and scaled by 3/C;
- **classes**: the last ``nn.Linear`` (``fc``, ``classifier.1``, ``heads.head``) is replaced
  by a fresh one with the data's classes;
- **size**: images of at most :data:`SMALL_IMAGE` px get the small-image stem (``model.stem:
  auto``): ResNet/ResNeXt/Wide-ResNet and DenseNet a 3×3 stride-1 first convolution without
  the max-pool (the MedMNIST v2 ResNet-18 (28) baseline; with pretrained weights the
  pretrained kernel is kept at stride 1), other convolutional models their first
  convolution at stride 1; a ViT is built for the data's (square) size, its position
  embeddings interpolated from the pretrained ones (torchvision's ``interpolate_embeddings``).

torchvision is imported only here, and this module only by runs that name a ``tv:`` model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from fedsilo.config import names_torchvision_weights
from fedsilo.config.tvnames import PREFIX, check_name  # noqa: F401 - check_name re-exported
from fedsilo.errors import ConfigError, ModelError
from fedsilo.models.adapt import head_name, mismatches, set_module

log = logging.getLogger("fedsilo")

#: images up to this side get the small-image stem under ``model.stem: auto``
SMALL_IMAGE = 64


def weight_enum(arch: str, weights: str) -> Any:
    """torchvision's weights entry ``weights`` (``IMAGENET1K_V2``, ``DEFAULT``) of ``arch``."""
    import torchvision.models

    enum = torchvision.models.get_model_weights(arch)
    try:
        return enum[weights]
    except KeyError:
        raise ConfigError(f"config key 'model.weights': {arch} has no weights {weights!r}; "
                          f"known: {', '.join(enum.__members__)} (or a path to a .pth file)"
                          ) from None


def checkpoint_path(entry: Any) -> Path:
    """Where torch hub keeps the file of weights ``entry`` (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(entry.url).path)


def fetch(entry: Any) -> Path:
    """The cached file of ``entry``, downloaded into torch hub's cache when missing; a
    ModelError saying where to put the file when it cannot be downloaded."""
    path = checkpoint_path(entry)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", entry.url, path)
    try:
        torch.hub.download_url_to_file(entry.url, str(path), progress=False)
    except Exception as exc:  # URLError, HTTPError, socket timeouts, a full disk...
        raise ModelError(
            f"model.weights: cannot download {entry} from {entry.url} "
            f"({type(exc).__name__}: {exc}); on a machine without internet, download that "
            f"file elsewhere and place it at {path} (torch hub's checkpoint directory; "
            f"TORCH_HOME moves it), or give model.weights the path of a .pth file") from None
    return path


def build(arch: str, *, in_channels: int, num_classes: int, image_size: tuple[int, int],
          weights: str | None, stem: str) -> tuple[nn.Module, dict[str, torch.Tensor] | None,
                                                    list[str]]:
    """``arch`` adapted to the data.  Returns the model, weights read from a file that are
    not ImageNet-shaped (to be loaded once the model is in its final form), and the list of
    adaptations made."""
    import torchvision.models

    from fedsilo.models.adapt import read_weights

    notes: list[str] = []
    vit = arch.startswith("vit_")
    if vit:
        if image_size[0] != image_size[1]:
            raise ModelError(f"model 'tv:{arch}' takes square images; the shards hold "
                             f"{image_size[0]}x{image_size[1]}")
        patch = int(arch.split("_")[-1])
        if image_size[0] % patch:
            raise ModelError(
                f"model 'tv:{arch}' cuts images into {patch}x{patch} patches, and "
                f"{image_size[0]} px is not a multiple of {patch}; prepare the data at a size "
                f"that is (e.g. fedsilo prep medmnist --size 64 or 224), or choose a "
                f"convolutional model")
    pending = None
    pretrained = False
    if weights is not None and names_torchvision_weights(weights):
        entry = weight_enum(arch, weights)
        fetch(entry)
        model = torchvision.models.get_model(arch, weights=entry)
        pretrained = True
        notes.append(f"weights {entry} ({checkpoint_path(entry).name})")
        if vit and model.image_size != image_size[0]:
            model = _resize_vit(arch, model, image_size[0])
            notes.append(f"position embeddings interpolated to {image_size[0]} px")
    else:
        model = torchvision.models.get_model(arch, **({"image_size": image_size[0]} if vit
                                                      else {}))
        if weights is not None:
            state = read_weights(weights, model_name=PREFIX + arch)
            if not mismatches(model, state):
                model.load_state_dict(state)
                pretrained = True
                notes.append(f"weights {weights}")
            else:
                pending = state  # maybe saved from an adapted model: tried after adapting
    _drop_aux(model)
    if not vit:
        _stem(model, stem=stem, image_size=image_size, pretrained=pretrained, notes=notes)
    _channels(model, in_channels, pretrained=pretrained, notes=notes)
    head = head_name(model)
    old = model.get_submodule(head)
    if old.out_features != num_classes or not pretrained:
        set_module(model, head, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
        notes.append(f"head {head} -> {num_classes} classes")
    return model, pending, notes


def _resize_vit(arch: str, model: nn.Module, size: int) -> nn.Module:
    import torchvision.models
    from torchvision.models.vision_transformer import interpolate_embeddings

    state = interpolate_embeddings(size, model.patch_size, model.state_dict())
    resized = torchvision.models.get_model(arch, image_size=size)
    resized.load_state_dict(state)
    return resized


def _drop_aux(model: nn.Module) -> None:
    """GoogLeNet/Inception: no auxiliary classifiers (a run trains one head)."""
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for name in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, name):
                setattr(model, name, None)


def _first_conv(model: nn.Module) -> str | None:
    return next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def _stem(model: nn.Module, *, stem: str, image_size: tuple[int, int], pretrained: bool,
          notes: list[str]) -> None:
    small = stem == "small" or (stem == "auto" and max(image_size) <= SMALL_IMAGE)
    if not small:
        return
    pools = {"conv1": "maxpool", "features.conv0": "features.pool0"}  # ResNets, DenseNets
    conv_name = next((c for c in pools if _has(model, c)), None)
    if conv_name is not None and _has(model, pools[conv_name]):
        set_module(model, pools[conv_name], nn.Identity())
        conv = model.get_submodule(conv_name)
        if pretrained:
            conv.stride = (1, 1)
        else:
            set_module(model, conv_name, nn.Conv2d(conv.in_channels, conv.out_channels, 3,
                                                   stride=1, padding=1, bias=False))
        notes.append(f"small-image stem ({conv_name} "
                     f"{'stride 1' if pretrained else '3x3 stride 1'}, no {pools[conv_name]})")
        return
    conv_name = _first_conv(model)
    if conv_name is not None:
        model.get_submodule(conv_name).stride = (1, 1)
        notes.append(f"small-image stem ({conv_name} stride 1)")


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _channels(model: nn.Module, in_channels: int, *, pretrained: bool, notes: list[str]) -> None:
    name = next((n for n, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.in_channels == 3), None)
    if in_channels == 3 or name is None:
        return
    old = model.get_submodule(name)
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, stride=old.stride,
                    padding=old.padding, dilation=old.dilation, bias=old.bias is not None)
    how = "fresh"
    if pretrained:
        with torch.no_grad():
            if in_channels == 1:
                new.weight.copy_(old.weight.sum(dim=1, keepdim=True))
                how = "RGB filters summed"
            else:
                reps = -(-in_channels // 3)
                new.weight.copy_(old.weight.repeat(1, reps, 1, 1)[:, :in_channels]
                                 * (3 / in_channels))
                how = "RGB filters tiled, scaled by 3/C"
            if old.bias is not None:
                new.bias.copy_(old.bias)
    set_module(model, name, new)
    notes.append(f"{name} takes {in_channels} channel(s) ({how})")
