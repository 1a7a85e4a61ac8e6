"""Networks of the generative radiance field (GRAF / MedNeRF line): a conditional field, a slice encoder, a patch
discriminator; and the differentiable renderer that turns the field into pixel values along camera rays.

Frames: the field lives in the model's **canonical cube** (world mm RAS, centred on the origin, side
``cube_mm``; see :mod:`slicefield.nerf.train` for how a subject is put there). The networks see positions
normalised to ``[-1, 1]^3`` (``x / (cube_mm / 2)``); rays, steps and chords are in mm.

Rendering modes (per ray, samples at midpoints ``x_k`` of segments of length ``w_k`` mm, ``L = cube_mm``):

- ``drr``: ``sum_k mu(x_k) w_k / L``, a line integral in units of the cube side (what ``slicefield render --mode drr``
  measures, up to the per-subject view scale);
- ``emission``: emission-absorption, density ``sigma`` (per cube side) and value ``c``:
  ``sum_k T_k (1 - exp(-sigma_k w_k / L)) c_k``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

RenderMode = Literal["drr", "emission"]


@dataclass(frozen=True)
class NerfConfig:
    """Sizes and training schedule of the generative radiance field (presets in :data:`PRESETS`)."""

    image_size: int = 32
    """Views are rendered and learned at this many pixels square."""
    volume_size: int = 32
    """Voxels per side of the canonical cube each subject is resampled to."""
    encoder_size: int = 16
    """Voxels per side of the volume the slice encoder reads."""
    patch: int = 16
    """K: the generator renders and the discriminator judges K x K patches."""
    min_scale: float = 0.5
    """Smallest patch scale s (fraction of the image side the patch spans); s ~ U(min_scale, 1)."""
    width: int = 64
    """Hidden units of the field MLP."""
    depth: int = 4
    """Hidden layers of the field MLP."""
    frequencies: int = 6
    """Positional encoding: sin/cos at 2^0 .. 2^(L-1) pi per coordinate."""
    z_shape: int = 16
    """Shape latent size (drives the density)."""
    z_app: int = 8
    """Appearance latent size (drives the value)."""
    samples: int = 32
    """Samples per ray (stratified while training)."""
    mode: RenderMode = "drr"
    """How the field becomes a pixel (see the module docstring); must match the training views."""
    disc_channels: int = 32
    """Channels of the discriminator's first layer."""
    iterations: int = 300
    """Training iterations (one discriminator + one generator step each)."""
    batch: int = 4
    """Subjects (one patch each) per iteration."""
    lr_g: float = 2e-3
    """Adam learning rate of the field and the encoder (tiny: 2e-3 learnt 4x faster than GRAF's 5e-4 on 32 px
    views; paper keeps 5e-4)."""
    lr_d: float = 1e-4
    """Adam learning rate of the discriminator."""
    r1: float = 10.0
    """R1 penalty weight (gradient of D on real patches)."""
    adversarial: float = 0.05
    """Weight of the non-saturating adversarial loss in the generator's objective."""
    reconstruction: float = 1.0
    """Weight of the MSE between rendered and real patches of the same view (the conditioning signal)."""
    n_views: int = 72
    """Views per subject on the orbit."""
    step_deg: float = 5.0
    """Degrees between views."""
    train_every: int = 5
    """Train on every k-th view; the rest are held out."""
    seed: int = 0
    """Seed of the initialisation and of every random draw of the training."""

    def __post_init__(self) -> None:
        if self.mode not in ("drr", "emission"):
            raise ValueError(f"mode must be drr or emission, got {self.mode!r}")
        if not 0 < self.min_scale <= 1:
            raise ValueError("min_scale must be in (0, 1]")
        if self.patch > self.image_size:
            raise ValueError("patch must not exceed image_size")


#: ``tiny`` trains end-to-end on a CPU in minutes; ``paper`` is the seed's scale (100k iterations, batch 8, 128 px,
#: 1/5 of 72 views), for a GPU.
PRESETS: dict[str, NerfConfig] = {
    "tiny": NerfConfig(),
    "paper": NerfConfig(
        image_size=128,
        volume_size=128,
        encoder_size=32,
        patch=32,
        min_scale=0.25,
        width=256,
        depth=8,
        frequencies=10,
        z_shape=128,
        z_app=128,
        samples=64,
        disc_channels=64,
        iterations=100_000,
        batch=8,
        lr_g=5e-4,
        lr_d=1e-4,
    ),
}


def positional_encoding(x: torch.Tensor, frequencies: int) -> torch.Tensor:
    """``(..., 3)`` in [-1, 1] -> ``(..., 3 + 6 L)``: the input, then sin and cos at 2^k pi x, k < L."""
    scales = (2.0 ** torch.arange(frequencies, dtype=x.dtype, device=x.device)) * math.pi
    arg = (x[..., None, :] * scales[:, None]).flatten(-2)
    return torch.cat([x, torch.sin(arg), torch.cos(arg)], dim=-1)


class ConditionalField(nn.Module):
    """Field of the canonical cube conditioned on a shape latent (density) and an appearance latent (value)."""

    def __init__(self, config: NerfConfig) -> None:
        super().__init__()
        self.config = config
        d_in = 3 + 6 * config.frequencies + config.z_shape
        layers: list[nn.Module] = []
        for k in range(config.depth):
            layers += [nn.Linear(d_in if k == 0 else config.width, config.width), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.density = nn.Linear(config.width, 1)
        self.value = nn.Sequential(nn.Linear(config.width + config.z_app, config.width // 2), nn.ReLU())
        self.value_out = nn.Linear(config.width // 2, 1)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: ``(B, N, 3)`` normalised positions; z: ``(B, z_shape + z_app)``. Returns density and value
        ``(B, N)``, both >= 0 (softplus)."""
        zs, za = z[:, : self.config.z_shape], z[:, self.config.z_shape :]
        n = x.shape[1]
        h = self.trunk(torch.cat([positional_encoding(x, self.config.frequencies), zs[:, None].expand(-1, n, -1)], -1))
        density = nn.functional.softplus(self.density(h)[..., 0])
        value = nn.functional.softplus(self.value_out(self.value(torch.cat([h, za[:, None].expand(-1, n, -1)], -1))))
        return density, value[..., 0]


class SliceEncoder(nn.Module):
    """Latent code of a subject from its volume: a 3D CNN, its feature maps flattened per slice (along the first
    voxel axis), squeeze-and-excitation over the slice features, pooled over slices -> ``z_shape + z_app``."""

    def __init__(self, config: NerfConfig) -> None:
        super().__init__()
        c = 8
        self.cnn = nn.Sequential(
            nn.Conv3d(1, c, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv3d(c, 2 * c, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        )
        side = math.ceil(math.ceil(config.encoder_size / 2) / 2)
        feat = 64
        self.per_slice = nn.Linear(2 * c * side * side, feat)
        self.squeeze = nn.Sequential(nn.Linear(feat, feat // 4), nn.ReLU(), nn.Linear(feat // 4, feat), nn.Sigmoid())
        self.out = nn.Linear(feat, config.z_shape + config.z_app)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """volume: ``(B, 1, E, E, E)`` -> ``(B, z_shape + z_app)``."""
        f = self.cnn(volume)  # (B, C, D, H, W)
        slices = f.permute(0, 2, 1, 3, 4).flatten(2)  # (B, D, C*H*W): one row per slice
        s = torch.relu(self.per_slice(slices))  # (B, D, F)
        s = s * self.squeeze(s.mean(dim=1))[:, None]  # channel excitation from the squeezed slice features
        return self.out(s.mean(dim=1))


class PatchDiscriminator(nn.Module):
    """Convolutional discriminator of K x K patches with spectral normalisation; one logit per patch."""

    def __init__(self, config: NerfConfig) -> None:
        super().__init__()
        c = config.disc_channels
        layers: list[nn.Module] = []
        ch_in, size = 1, config.patch
        ch = c
        while size > 4:
            layers += [spectral_norm(nn.Conv2d(ch_in, ch, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            ch_in, ch, size = ch, min(2 * ch, 8 * c), size // 2
        layers += [spectral_norm(nn.Conv2d(ch_in, 1, size))]
        self.net = nn.Sequential(*layers)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """``(B, K, K)`` -> ``(B,)`` logits."""
        return self.net(patches[:, None]).flatten(1).mean(dim=1)


def composite(density: torch.Tensor, value: torch.Tensor, seg: torch.Tensor, mode: RenderMode) -> torch.Tensor:
    """Pixel values from samples along rays: density, value ``(..., S)``; seg: segment lengths in cube sides
    ``(..., S)`` (0 outside the cube). See the module docstring."""
    if mode == "drr":
        return (density * value * seg).sum(dim=-1)
    alpha = 1.0 - torch.exp(-density * seg)
    before = torch.cumsum(density * seg, dim=-1) - density * seg
    return (torch.exp(-before) * alpha * value).sum(dim=-1)


def ray_samples(
    origins: torch.Tensor, directions: torch.Tensor, *, half_mm: float, samples: int, jitter: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints of ``samples`` equal segments of each ray's chord through the cube ``[-half, half]^3`` (world mm).

    origins, directions: ``(..., 3)`` world mm and unit vectors. jitter: ``(..., S)`` in [0, 1) to move each sample
    within its segment (stratified sampling), None for midpoints. Returns positions normalised to [-1, 1]
    ``(..., S, 3)`` and segment lengths in cube sides ``(..., S)`` (0 for rays that miss the cube).
    """
    with torch.no_grad():
        safe = torch.where(directions.abs() < 1e-9, torch.full_like(directions, 1e-9), directions)
        t1 = (-half_mm - origins) / safe
        t2 = (half_mm - origins) / safe
        near = torch.minimum(t1, t2).amax(dim=-1)
        far = torch.maximum(t1, t2).amin(dim=-1)
        hit = far > near
        near = torch.where(hit, near, torch.zeros_like(near))
        far = torch.where(hit, far, torch.zeros_like(far))
    frac = torch.arange(samples, dtype=origins.dtype, device=origins.device)
    frac = (frac + (0.5 if jitter is None else jitter)) / samples
    t = near[..., None] + (far - near)[..., None] * frac
    points = (origins[..., None, :] + t[..., None] * directions[..., None, :]) / half_mm
    seg = ((far - near) / samples / (2 * half_mm))[..., None].expand_as(t)
    return points.clamp(-1.0, 1.0), seg
