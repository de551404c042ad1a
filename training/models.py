"""LeNet-5, AlexNet and VGG, built from small config tables.

Every constructor takes the dataset's channel count and class count; AlexNet and VGG
end their feature extractors with adaptive pooling (as torchvision does) so one
definition serves 224x224 paper-sized inputs and 32-64 pixel CPU-sized ones.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
from torch import nn

LeNetVariant = Literal["modern", "classic"]

# VGG configurations from Simonyan & Zisserman (2014), table 1: channels, "M" = max-pool.
VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}

# AlexNet (Krizhevsky et al. 2012, single-tower form as in torchvision):
# (out_channels, kernel, stride, padding, max-pool after).
ALEXNET_CONFIG: list[tuple[int, int, int, int, bool]] = [
    (64, 11, 4, 2, True),
    (192, 5, 1, 2, True),
    (384, 3, 1, 1, False),
    (256, 3, 1, 1, False),
    (256, 3, 1, 1, True),
]


def _scaled(channels: int, width_divisor: int) -> int:
    return max(1, channels // width_divisor)


def _classifier(in_features: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    """The two-hidden-layer head shared by AlexNet and VGG."""
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) for 1x28x28 digits, padded as in the 32x32 original.

    `classic` uses sigmoid activations and average pooling as in the paper; `modern`
    uses ReLU and max pooling, which trains faster and generalises better.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10,
                 variant: LeNetVariant = "modern") -> None:
        super().__init__()
        act: Callable[[], nn.Module] = nn.ReLU if variant == "modern" else nn.Sigmoid
        pool: Callable[[], nn.Module] = (
            (lambda: nn.MaxPool2d(2)) if variant == "modern" else (lambda: nn.AvgPool2d(2))
        )
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2), act(), pool(),   # C1, S2
            nn.Conv2d(6, 16, kernel_size=5), act(), pool(),                       # C3, S4
            nn.AdaptiveAvgPool2d(5),  # a no-op at 28x28; lets other sizes through
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), act(),                                    # C5
            nn.Linear(120, 84), act(),                                            # F6
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _PooledClassifier(nn.Module):
    """Convolutional `layers`, adaptive pooling and the two-hidden-layer head: the shape
    AlexNet and VGG share (as torchvision's `features`/`avgpool`/`classifier`)."""

    def __init__(self, layers: list[nn.Module], channels: int, num_classes: int,
                 width_divisor: int, pool_size: int, dropout: float) -> None:
        super().__init__()
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(pool_size))
        self.classifier = _classifier(channels * pool_size * pool_size,
                                      _scaled(4096, width_divisor), num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class AlexNet(_PooledClassifier):
    """AlexNet from `ALEXNET_CONFIG` for inputs of 63x63 and up; `width_divisor` narrows
    every layer for CPU runs."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, width_divisor: int = 1,
                 pool_size: int = 6, dropout: float = 0.5) -> None:
        layers: list[nn.Module] = []
        channels = in_channels
        for out, kernel, stride, padding, pool_after in ALEXNET_CONFIG:
            out = _scaled(out, width_divisor)
            layers += [nn.Conv2d(channels, out, kernel, stride, padding), nn.ReLU(inplace=True)]
            if pool_after:
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True))
            channels = out
        super().__init__(layers, channels, num_classes, width_divisor, pool_size, dropout)


class VGG(_PooledClassifier):
    """VGG from a `VGG_CONFIGS` entry, optionally with batch norm after each convolution."""

    def __init__(self, config: list[int | str], in_channels: int = 3, num_classes: int = 1000,
                 batch_norm: bool = False, width_divisor: int = 1, pool_size: int = 7,
                 dropout: float = 0.5) -> None:
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
                continue
            out = _scaled(int(item), width_divisor)
            layers.append(nn.Conv2d(channels, out, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            channels = out
        super().__init__(layers, channels, num_classes, width_divisor, pool_size, dropout)


def _init_weights(model: nn.Module) -> None:
    """He init for ReLU convs, small normal for linears: keeps deep nets off the plateau
    that PyTorch's default init leaves them on for a small data set."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)


# Architecture name -> constructor taking the checkpoint's keyword arguments.
_CONSTRUCTORS: dict[str, Callable[..., nn.Module]] = {
    "lenet": LeNet5,
    "alexnet": AlexNet,
    **{name: partial(VGG, config) for name, config in VGG_CONFIGS.items()},
    **{f"{name}_bn": partial(VGG, config, batch_norm=True) for name, config in VGG_CONFIGS.items()},
}
ARCHITECTURES: tuple[str, ...] = tuple(_CONSTRUCTORS)
INIT_SCHEME = "kaiming (lenet classic: pytorch default)"


def build_model(arch: str, **kwargs: int | float | str | bool) -> nn.Module:
    """Construct `arch` with constructor keyword arguments as stored in the checkpoint."""
    if arch not in _CONSTRUCTORS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of "
                         f"{', '.join(ARCHITECTURES)}")
    model = _CONSTRUCTORS[arch](**kwargs)
    if not (arch == "lenet" and kwargs.get("variant", "modern") == "classic"):
        _init_weights(model)  # the 1998 net keeps its sigmoid-friendly default init
    return model
