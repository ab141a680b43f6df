"""torchvision models by name (``model.name: tv:ARCH``): adapted to the data's channels,
classes and size, made DP-ready on request, pretrained weights from a file, frozen layers.

Real models, real forward passes; sizes kept small so the whole file runs in seconds.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from fedsilo.config import load_config
from fedsilo.errors import ConfigError, ModelError
from fedsilo.models import build_for
from fedsilo.privacy.validate import check_model
from fedsilo.weights import WeightLayout


def build(name: str, *, channels: int = 1, size: int = 28, classes: int = 2, sets=()):
    config = load_config(None, overrides=[f"model.name={name}", *sets])
    torch.manual_seed(0)
    return build_for(config, in_channels=channels, num_classes=classes, image_size=(size, size))


@pytest.mark.parametrize("name, channels, size", [
    ("tv:resnet18", 1, 28), ("tv:resnet18", 3, 64), ("tv:efficientnet_b0", 1, 28),
    ("tv:mobilenet_v3_small", 3, 64), ("tv:densenet121", 1, 28),
])
def test_torchvision_models_fit_the_data(name, channels, size):
    model = build(name, channels=channels, size=size, classes=3)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, channels, size, size)).shape == (2, 3)


def test_small_images_get_the_small_stem_and_large_ones_keep_imagenets():
    small = build("tv:resnet18", size=28)
    assert small.conv1.stride == (1, 1) and small.conv1.kernel_size == (3, 3)
    assert small.conv1.in_channels == 1 and isinstance(small.maxpool, nn.Identity)
    assert small.fc.out_features == 2
    large = build("tv:resnet18", channels=3, size=96)
    assert large.conv1.stride == (2, 2) and isinstance(large.maxpool, nn.MaxPool2d)
    forced = build("tv:resnet18", size=28, sets=["model.stem=imagenet"])
    assert forced.conv1.stride == (2, 2)


def test_a_vit_is_built_for_the_image_size_or_refused_clearly():
    # a small ViT: 32 px images make 4 patches, so this is quick even at ViT-B's width
    model = build("tv:vit_b_32", channels=3, size=64, sets=["model.train_layers=head"])
    assert model.image_size == 64
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 2)
    with pytest.raises(ModelError, match="28 px is not a multiple of 32"):
        build("tv:vit_b_32", channels=3, size=28)


def test_unknown_architecture_and_weights_names_fail_at_config_time():
    with pytest.raises(ConfigError, match="did you mean tv:resnet50"):
        load_config(None, overrides=["model.name=tv:resnet5O"])
    with pytest.raises(ConfigError, match="IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"):
        load_config(None, overrides=["model.name=tv:resnet50", "model.weights=IMAGENET9K"])
    with pytest.raises(ConfigError, match="only tv: models"):
        load_config(None, overrides=["model.weights=DEFAULT"])


def test_dp_fix_makes_a_batchnorm_model_trainable_and_logs_what_changed(caplog):
    with caplog.at_level(logging.INFO, logger="fedsilo"):
        model = build("tv:resnet18", sets=["dp.enabled=true"])  # dp_fix: auto
    kinds = {type(m).__name__ for m in model.modules()}
    assert "BatchNorm2d" not in kinds and "GroupNorm" in kinds
    assert "20 BatchNorm2d → GroupNorm" in caplog.text
    assert "BasicBlock rewritten out of place" in caplog.text
    check_model(model, name="tv:resnet18")  # Opacus's validator and ours find nothing
    # one real per-sample gradient step through Opacus's hooks: the in-place residual
    # additions would fail it ("a view ... is being modified inplace")
    from opacus.grad_sample import GradSampleModule

    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    wrapped(torch.randn(2, 1, 28, 28)).sum().backward()
    assert all(p.grad_sample.shape[0] == 2 for p in model.parameters())
    # without DP the model keeps its BatchNorm (dp_fix: auto)
    plain = build("tv:resnet18")
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())


def test_a_model_dp_sgd_cannot_train_names_the_layer():
    model = build("tv:vit_b_32", channels=3, size=32, sets=["model.dp_fix=on"])
    with pytest.raises(ModelError, match=r"layer '\(model\)' \(VisionTransformer\): no "
                       r"per-sample gradient for its own parameter\(s\) class_token"):
        check_model(model, name="tv:vit_b_32")
    # frozen, those parameters are no obstacle (model.train_layers=head does this)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("heads."))
    check_model(model, name="tv:vit_b_32")


def test_weights_from_a_file_load_and_another_architectures_are_named(tmp_path):
    source = build("tv:resnet18")
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)
    loaded = build("tv:resnet18", sets=[f"model.weights={path}"])
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name

    # ImageNet-shaped weights (3 channels, 1000 classes) are adapted: RGB filters summed
    imagenet = tmp_path / "imagenet.pt"
    import torchvision

    torch.manual_seed(1)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), imagenet)
    grey = build("tv:resnet18", size=96, sets=[f"model.weights={imagenet}"])
    assert torch.allclose(grey.conv1.weight, reference.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(grey.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)

    with pytest.raises(ModelError, match=r"not a state_dict of model 'tv:resnet34'.*missing "
                       r"key\(s\): layer1.2.conv1.weight"):
        build("tv:resnet34", sets=[f"model.weights={path}"])
    with pytest.raises(ModelError, match=r"shape mismatch.*fc.weight \(2, 512\) \(the model "
                       r"has \(5, 512\)\)"):
        build("tv:resnet18", classes=5, sets=[f"model.weights={path}"])
    with pytest.raises(ModelError, match="not found"):
        build("tv:resnet18", sets=[f"model.weights={tmp_path / 'nothing.pt'}"])


def test_torchvision_weights_without_internet_say_where_the_file_goes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    from fedsilo.models.torchvision import checkpoint_path, weight_enum

    expected = checkpoint_path(weight_enum("resnet18", "DEFAULT"))
    assert expected == tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    try:
        import socket

        socket.create_connection(("download.pytorch.org", 443), timeout=3).close()
        pytest.skip("this machine reaches download.pytorch.org")
    except OSError:
        pass
    with pytest.raises(ModelError, match=f"place it at {expected}"):
        build("tv:resnet18", sets=["model.weights=DEFAULT"])


def test_freezing_leaves_only_the_head_or_the_last_blocks_trainable():
    model = build("tv:resnet18", sets=["model.train_layers=head"])
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == \
        ["fc.bias", "fc.weight"]
    last = build("tv:resnet18", sets=["model.train_layers=1"])
    trainable = {n.split(".")[0] for n, p in last.named_parameters() if p.requires_grad}
    assert trainable == {"layer4", "fc"}
    with pytest.raises(ModelError, match=r"the model has 5 blocks \(conv1\+bn1, layer1, "):
        build("tv:resnet18", sets=["model.train_layers=7"])
    # frozen parameters still travel in the flat weight vector (their update is zero)
    assert WeightLayout.of(model).numel == sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if b.is_floating_point())


def test_an_image_size_the_model_cannot_take_fails_at_build_time():
    # without the small stem, ResNet's five stride-2 stages leave nothing of a 16 px image
    # for BatchNorm to normalise in training, but eval runs: the trial pass catches
    # shapes no layer can take, such as a ConvNeXt patchify stem larger than the image
    with pytest.raises(ModelError, match=r"cannot process images of shape 3x2x2"):
        build("tv:convnext_tiny", channels=3, size=2, sets=["model.stem=imagenet"])


def test_the_names_read_from_torchvision_source_are_those_it_registers():
    """config checks tv: names from torchvision's source (config/tvnames.py) so that no rank
    imports torch to check one; they must be exactly what torchvision offers once imported."""
    import torchvision.models

    from fedsilo.config.tvnames import catalogue

    imported = {arch: tuple(torchvision.models.get_model_weights(arch).__members__)
                for arch in torchvision.models.list_models(module=torchvision.models)}
    assert catalogue() == imported
