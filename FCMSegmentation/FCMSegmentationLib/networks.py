"""A compact U-Net (2-D or 3-D) whose output is softmax memberships over the classes.

The network is split into a *body* (encoder-decoder, ending in a per-voxel feature map) and a *head*
(two 1x1 convolutions). Interactive refinement caches the body's features once per image and fine-tunes
only the head, which makes a step cost milliseconds; full fine-tuning remains possible.

Shapes: input (N, C_in, *spatial) with every spatial size divisible by ``2 ** (len(channels) - 1)``
(see :meth:`UNet.size_multiple`); output (N, num_classes, *spatial), summing to 1 over classes.
"""
from typing import Any, Dict, Sequence

import torch
from torch import nn


def _conv(spatial_dims: int):
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


NORMS = ("batch", "instance")


def _norm(spatial_dims: int, kind: str, channels: int) -> nn.Module:
    """Batch norm (default: in eval mode the output does not depend on the patch size, so training
    crops and inference patches agree) or instance norm (per-patch statistics)."""
    if kind == "batch":
        return (nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d)(channels)
    return (nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d)(channels, affine=True)


class ConvBlock(nn.Sequential):
    """Two (3x3[x3] conv -> norm -> leaky ReLU) layers."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str = "batch"):
        conv = _conv(spatial_dims)
        super().__init__(
            conv(in_channels, out_channels, 3, padding=1, bias=False),
            _norm(spatial_dims, norm, out_channels),
            nn.LeakyReLU(0.01, inplace=True),
            conv(out_channels, out_channels, 3, padding=1, bias=False),
            _norm(spatial_dims, norm, out_channels),
            nn.LeakyReLU(0.01, inplace=True),
        )


class UNet(nn.Module):
    """U-Net with skip connections; ``channels`` lists the widths from full resolution to the bottleneck."""

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 3,
        num_classes: int = 3,
        channels: Sequence[int] = (16, 32, 64, 128),
        head_channels: int = 16,
        norm: str = "batch",
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError("spatial_dims must be 2 or 3")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}")
        if len(channels) < 2:
            raise ValueError("channels needs at least two levels")
        self.config: Dict[str, Any] = {
            "spatial_dims": spatial_dims,
            "in_channels": in_channels,
            "num_classes": num_classes,
            "channels": list(channels),
            "head_channels": head_channels,
            "norm": norm,
        }
        conv = _conv(spatial_dims)
        up = nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
        pool = nn.MaxPool3d if spatial_dims == 3 else nn.MaxPool2d
        self.pool = pool(2)
        widths = list(channels)
        self.down = nn.ModuleList()
        previous = in_channels
        for width in widths:
            self.down.append(ConvBlock(spatial_dims, previous, width, norm))
            previous = width
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for deeper, width in zip(widths[::-1][:-1], widths[::-1][1:]):
            self.up.append(up(deeper, width, 2, stride=2))
            self.merge.append(ConvBlock(spatial_dims, 2 * width, width, norm))
        self.head = nn.Sequential(
            conv(widths[0], head_channels, 1),
            nn.LeakyReLU(0.01, inplace=True),
            conv(head_channels, num_classes, 1),
        )

    @property
    def size_multiple(self) -> int:
        """Spatial sizes must be multiples of this."""
        return 2 ** (len(self.down) - 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-voxel features (N, channels[0], *spatial) from the encoder-decoder body."""
        skips = []
        for index, block in enumerate(self.down):
            x = block(x if index == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax memberships (N, num_classes, *spatial), computed in float32 for AMP safety."""
        return torch.softmax(self.logits(x).float(), dim=1)


def pointwise_head_logits(head: nn.Sequential, features: torch.Tensor) -> torch.Tensor:
    """The head's logits for voxel features given as a matrix: (F, n) -> (K, n).

    Numerically the same as ``head(x)`` on a feature map, but as two matrix products, which on CPU is
    several times faster than 1x1 convolutions (forward and backward): the refinement hot path.
    """
    first, last = head[0], head[-1]
    hidden = torch.nn.functional.leaky_relu(
        first.weight.flatten(1) @ features + first.bias[:, None], 0.01)
    return last.weight.flatten(1) @ hidden + last.bias[:, None]


def build_network(config: Dict[str, Any]) -> UNet:
    """A :class:`UNet` from a model card's ``architecture`` dict."""
    return UNet(**config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
