import pytest
import torch
from torch import nn

from training.models import ARCHITECTURES, VGG_CONFIGS, AlexNet, build_model

# AlexNet's stride-4 stem and three pools need at least 63x63 inputs.
SHAPES = [(arch, channels, size) for arch in ARCHITECTURES
          for channels, size in [(1, 28), (3, 32), (1, 64), (3, 96)]
          if not (arch == "alexnet" and size < 63)]


@pytest.mark.parametrize(("arch", "channels", "size"), SHAPES)
def test_every_architecture_maps_any_input_size_to_class_logits(arch: str, channels: int,
                                                                size: int) -> None:
    model = build_model(arch, in_channels=channels, num_classes=7,
                        **({} if arch == "lenet" else {"width_divisor": 16}))
    out = model.eval()(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_alexnet_at_paper_size_keeps_paper_feature_map() -> None:
    model = build_model("alexnet", in_channels=3, num_classes=1000)
    assert isinstance(model, AlexNet)
    feats = model.features[:-1](torch.randn(1, 3, 224, 224))  # before adaptive pooling
    assert feats.shape == (1, 256, 6, 6)
    assert sum(p.numel() for p in model.parameters()) == 61_100_840  # torchvision's AlexNet


@pytest.mark.parametrize(("arch", "convs"), [("vgg11", 8), ("vgg16", 13), ("vgg19", 16)])
def test_vgg_depth_follows_the_config_table(arch: str, convs: int) -> None:
    model = build_model(arch, in_channels=3, num_classes=10, width_divisor=8)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == convs
    assert len([c for c in VGG_CONFIGS[arch] if c != "M"]) == convs


def test_vgg16_at_full_width_matches_the_paper_parameter_count() -> None:
    model = build_model("vgg16", in_channels=3, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 138_357_544


def test_batch_norm_variant_adds_one_norm_per_conv() -> None:
    model = build_model("vgg11_bn", in_channels=1, num_classes=10, width_divisor=8)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 8


def test_lenet_variants_differ_in_activation_and_pooling() -> None:
    modern = build_model("lenet", variant="modern")
    classic = build_model("lenet", variant="classic")
    assert any(isinstance(m, nn.MaxPool2d) for m in modern.modules())
    assert any(isinstance(m, nn.Sigmoid) for m in classic.modules())
    assert not any(isinstance(m, nn.ReLU) for m in classic.modules())
    # Same shape: LeNet-5's 61,706 parameters at 10 classes.
    assert sum(p.numel() for p in modern.parameters()) == 61_706
    assert sum(p.numel() for p in classic.parameters()) == 61_706


def test_unknown_architecture_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'resnet'.*lenet"):
        build_model("resnet")
