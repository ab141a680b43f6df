import numpy as np
import pytest
import torch

from fedsilo.errors import ConfigError, ModelError
from fedsilo.models import MODELS, build_model
from fedsilo.weights import WeightLayout


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "dp_cnn"])
@pytest.mark.parametrize("channels, classes", [(1, 2), (3, 5)])
def test_models_fit_medmnist_shapes(name, channels, classes):
    model = build_model(name, in_channels=channels, num_classes=classes, image_size=(28, 28))
    assert model(torch.randn(3, channels, 28, 28)).shape == (3, classes)


def test_resnet_uses_groupnorm_and_no_inplace_relu():
    model = build_model("resnet18", in_channels=1, num_classes=2, image_size=(28, 28))
    kinds = {type(m).__name__ for m in model.modules()}
    assert "GroupNorm" in kinds and "BatchNorm2d" not in kinds
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)


def test_groupnorm_groups_must_divide_channels():
    with pytest.raises(ModelError, match="not divisible"):
        build_model("resnet18", in_channels=1, num_classes=2, image_size=(28, 28), norm_groups=7)


def test_unknown_model():
    with pytest.raises(ConfigError, match="known: basic_unet, dp_cnn, resnet18, scatter_cnn, "
                                          "scatter_linear, small_cnn, unet"):
        MODELS.get("alexnet")


def test_weight_vector_round_trip_is_exact():
    torch.manual_seed(0)
    a = build_model("small_cnn", in_channels=1, num_classes=2, image_size=(28, 28))
    torch.manual_seed(1)
    b = build_model("small_cnn", in_channels=1, num_classes=2, image_size=(28, 28))
    layout = WeightLayout.of(a)
    assert list(layout.names) == sorted(layout.names)
    vector = layout.flatten(a)
    assert vector.dtype == np.float32 and vector.shape == (layout.numel,)
    assert layout.numel == sum(p.numel() for p in a.parameters())
    layout.load(b, vector)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), na
    state = layout.to_state_dict(vector)
    assert set(state) == set(a.state_dict())
