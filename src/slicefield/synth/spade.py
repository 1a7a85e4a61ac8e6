"""2D SPADE generator and multi-scale PatchGAN discriminator (Park et al. 2019, "Semantic Image Synthesis with
Spatially-Adaptive Normalization"; Wang et al. 2018, pix2pixHD), sized by a config.

Tensors: label maps are one-hot ``(B, C, H, W)`` float32 (C classes, background included); images are
``(B, 1, H, W)`` float32 in [-1, 1] (intensity normalised to [0, 1], then ``2 x - 1``). ``H`` and ``W`` must be
multiples of ``2 ** n_up`` for the generator (:func:`pad_to_multiple` does that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

#: Slope of the leaky ReLUs (SPADE and pix2pixHD use 0.2).
LEAKY_SLOPE = 0.2
#: Padding of the discriminator's 4x4 convs (pix2pixHD: ceil((4 - 1) / 2) = 2), so small slices still work.
D_PAD = 2


@dataclass(frozen=True)
class GeneratorConfig:
    """Size of the 2D SPADE generator."""

    channels: int = 32
    """Feature channels at the finest scale (doubling per coarser scale, at most 8x)."""
    n_up: int = 3
    """Upsamplings: the generator starts from the label map at 1 / 2**n_up of the slice size."""
    spade_hidden: int = 32
    """Hidden channels of each SPADE block's label-embedding conv."""


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Size of the multi-scale PatchGAN discriminator."""

    channels: int = 32
    """Channels of the first conv (doubling per layer, at most 8x)."""
    n_layers: int = 3
    """Strided conv layers per scale."""
    n_scales: int = 2
    """Discriminators, each on the input downsampled by 2 more than the previous one."""


class SPADE(nn.Module):
    """Spatially-adaptive normalisation: ``IN(x) * (1 + gamma(seg)) + beta(seg)`` with gamma, beta predicted by
    convs from the one-hot label map resized (nearest) to ``x``'s size. x: ``(B, channels, H, W)``."""

    def __init__(self, channels: int, label_nc: int, hidden: int):
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(label_nc, hidden, 3, padding=1), nn.ReLU())
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        seg = F.interpolate(seg, size=x.shape[-2:], mode="nearest")
        a = self.shared(seg)
        return self.norm(x) * (1 + self.gamma(a)) + self.beta(a)


class SPADEResBlock(nn.Module):
    """SPADE residual block: two (SPADE, leaky ReLU, 3x3 conv) layers, with a learned (SPADE, 1x1 conv)
    shortcut when the channel count changes."""

    def __init__(self, fin: int, fout: int, label_nc: int, hidden: int):
        super().__init__()
        mid = min(fin, fout)
        self.norm0 = SPADE(fin, label_nc, hidden)
        self.conv0 = nn.Conv2d(fin, mid, 3, padding=1)
        self.norm1 = SPADE(mid, label_nc, hidden)
        self.conv1 = nn.Conv2d(mid, fout, 3, padding=1)
        self.learned_shortcut = fin != fout
        if self.learned_shortcut:
            self.norm_s = SPADE(fin, label_nc, hidden)
            self.conv_s = nn.Conv2d(fin, fout, 1, bias=False)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv0(F.leaky_relu(self.norm0(x, seg), LEAKY_SLOPE))
        dx = self.conv1(F.leaky_relu(self.norm1(dx, seg), LEAKY_SLOPE))
        return shortcut + dx


class SpadeGenerator(nn.Module):
    """One-hot labels ``(B, C, H, W)`` -> image ``(B, 1, H, W)`` in [-1, 1] (tanh).

    As SPADE without its encoder: a 3x3 conv of the label map downsampled to ``H / 2**n_up``, a SPADE res-block,
    then ``n_up`` times (upsample x2, SPADE res-block), a leaky ReLU, a 3x3 conv to one channel and tanh.
    Deterministic (no noise input): one label map, one image.
    """

    def __init__(self, config: GeneratorConfig, label_nc: int):
        super().__init__()
        self.config = config
        self.label_nc = label_nc
        ch = [config.channels * min(2 ** (config.n_up - i), 8) for i in range(config.n_up + 1)]
        self.head_conv = nn.Conv2d(label_nc, ch[0], 3, padding=1)
        self.head = SPADEResBlock(ch[0], ch[0], label_nc, config.spade_hidden)
        self.ups = nn.ModuleList(
            SPADEResBlock(ch[i], ch[i + 1], label_nc, config.spade_hidden) for i in range(config.n_up)
        )
        self.out = nn.Conv2d(ch[-1], 1, 3, padding=1)

    @property
    def multiple(self) -> int:
        """Slice sides must be multiples of this."""
        return 2**self.config.n_up

    def forward(self, seg: torch.Tensor) -> torch.Tensor:
        h, w = seg.shape[-2:]
        if h % self.multiple or w % self.multiple:
            raise ValueError(f"slice size {h}x{w} is not a multiple of {self.multiple}; pad it (pad_to_multiple)")
        x = self.head_conv(F.interpolate(seg, size=(h // self.multiple, w // self.multiple), mode="nearest"))
        x = self.head(x, seg)
        for block in self.ups:
            x = block(F.interpolate(x, scale_factor=2, mode="nearest"), seg)
        return torch.tanh(self.out(F.leaky_relu(x, LEAKY_SLOPE)))


class PatchDiscriminator(nn.Module):
    """pix2pixHD's N-layer PatchGAN on ``concat(one-hot labels, image)``, spectral norm + instance norm.
    Returns the list of every layer's output; the last is the ``(B, 1, h, w)`` patch score map."""

    def __init__(self, config: DiscriminatorConfig, in_channels: int):
        super().__init__()
        nf = config.channels
        layers: list[nn.Module] = [
            nn.Sequential(spectral_norm(nn.Conv2d(in_channels, nf, 4, 2, D_PAD)), nn.LeakyReLU(LEAKY_SLOPE))
        ]
        for n in range(1, config.n_layers + 1):
            prev, nf = nf, min(nf * 2, config.channels * 8)
            stride = 2 if n < config.n_layers else 1
            layers.append(
                nn.Sequential(
                    spectral_norm(nn.Conv2d(prev, nf, 4, stride, D_PAD)),
                    nn.InstanceNorm2d(nf),
                    nn.LeakyReLU(LEAKY_SLOPE),
                )
            )
        layers.append(nn.Conv2d(nf, 1, 4, 1, D_PAD))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


class MultiScaleDiscriminator(nn.Module):
    """``n_scales`` PatchGANs; scale k sees the input average-pooled k times by 2. Returns one feature list per
    scale."""

    def __init__(self, config: DiscriminatorConfig, label_nc: int):
        super().__init__()
        self.config = config
        self.scales = nn.ModuleList(PatchDiscriminator(config, label_nc + 1) for _ in range(config.n_scales))

    def forward(self, seg: torch.Tensor, image: torch.Tensor) -> list[list[torch.Tensor]]:
        x = torch.cat([seg, image], dim=1)
        out = []
        for d in self.scales:
            out.append(d(x))
            x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
        return out


def hinge_d_loss(real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]]) -> torch.Tensor:
    """Discriminator hinge loss ``mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))``, averaged over scales."""
    loss = sum(F.relu(1 - r[-1]).mean() + F.relu(1 + f[-1]).mean() for r, f in zip(real, fake, strict=True))
    return loss / len(real)


def hinge_g_loss(fake: list[list[torch.Tensor]]) -> torch.Tensor:
    """Generator hinge loss ``-mean(D(fake))``, averaged over scales."""
    return -sum(f[-1].mean() for f in fake) / len(fake)


def feature_matching_loss(real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]]) -> torch.Tensor:
    """pix2pixHD feature matching: L1 between the discriminator's intermediate features of real (detached) and
    fake, summed over layers, averaged over scales."""
    total = 0.0
    for r, f in zip(real, fake, strict=True):
        for rf, ff in zip(r[:-1], f[:-1], strict=True):
            total = total + F.l1_loss(ff, rf.detach())
    return total / len(real)


def one_hot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Integer labels ``(B, H, W)`` (any integer-valued dtype) -> one-hot ``(B, n_classes, H, W)`` float32."""
    idx = labels.round().long().clamp(0, n_classes - 1)
    return F.one_hot(idx, n_classes).permute(0, 3, 1, 2).float()


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad the last two axes (at the end) up to multiples of ``multiple``; returns the tensor and the
    original ``(H, W)`` to crop back to. Zero in a one-hot channel-0 map would be "no class": pad labels
    before one-hot encoding (label 0 = background)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pw, 0, ph)), (h, w)
