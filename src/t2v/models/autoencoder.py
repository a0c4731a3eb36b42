"""Video autoencoder: (B, 3, T, H, W) clips <-> compact (B, C, T', H', W') latents.

A small VAE (Kingma & Welling 2014) built for CPU speed: the input is folded space-to-depth
(so no convolution runs at full resolution), residual blocks use (2+1)D factorised convs
(Tran et al. 2018), and one stride-2 convolution halves time and space again. For the default
16x64x64 clip the latent grid is 4x8x8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn


@dataclass
class AutoencoderConfig:
    frames: int = 16
    size: int = 64
    latent_channels: int = 8
    patch_t: int = 2  # space-to-depth factor in time at the input
    patch_s: int = 4  # ... and in space
    width: int = 64  # channels at the folded resolution
    latent_width: int = 128  # channels at the latent resolution
    blocks: int = 2  # residual blocks per resolution
    kl_weight: float = 1e-4
    fg_weight: float = 4.0  # extra loss weight on non-black pixels (objects are ~5% of a clip)
    # Latent normalisation z_norm = (z - shift) * scale, measured after training so the
    # generator sees unit-variance latents. Stored here, never written in code.
    scale: float = 1.0
    shift: float = 0.0

    def validate(self) -> None:
        t, s = self.patch_t * 2, self.patch_s * 2
        if self.frames % t or self.size % s:
            raise ValueError(
                f"frames must divide by {t} and size by {s} (got {self.frames}x{self.size})"
            )

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, T', H', W')"""
        t, s = self.frames // (self.patch_t * 2), self.size // (self.patch_s * 2)
        return (self.latent_channels, t, s, s)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)


class ResBlock(nn.Module):
    """Pre-activation residual block with a spatial (1,3,3) then a temporal (3,1,1) conv."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(
            _norm(c),
            nn.SiLU(),
            nn.Conv3d(c, c, (1, 3, 3), padding=(0, 1, 1)),
            _norm(c),
            nn.SiLU(),
            nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class VideoAutoencoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = c = config
        folded = 3 * c.patch_t * c.patch_s**2
        self.encoder = nn.Sequential(
            nn.Conv3d(folded, c.width, (1, 3, 3), padding=(0, 1, 1)),
            *[ResBlock(c.width) for _ in range(c.blocks)],
            nn.Conv3d(c.width, c.latent_width, 2, stride=2),
            *[ResBlock(c.latent_width) for _ in range(c.blocks)],
            _norm(c.latent_width),
            nn.SiLU(),
            nn.Conv3d(c.latent_width, 2 * c.latent_channels, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv3d(c.latent_channels, c.latent_width, 3, padding=1),
            *[ResBlock(c.latent_width) for _ in range(c.blocks)],
            nn.ConvTranspose3d(c.latent_width, c.width, 2, stride=2),
            *[ResBlock(c.width) for _ in range(c.blocks)],
            _norm(c.width),
            nn.SiLU(),
            nn.Conv3d(c.width, folded, (1, 3, 3), padding=(0, 1, 1)),
        )

    def _fold(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        return rearrange(
            x,
            "b c (t pt) (h ph) (w pw) -> b (c pt ph pw) t h w",
            pt=c.patch_t,
            ph=c.patch_s,
            pw=c.patch_s,
        )

    def _unfold(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        return rearrange(
            x,
            "b (c pt ph pw) t h w -> b c (t pt) (h ph) (w pw)",
            pt=c.patch_t,
            ph=c.patch_s,
            pw=c.patch_s,
        )

    def encode_dist(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 3, T, H, W) in [-1, 1] -> mean, logvar, each (B, C, T', H', W')."""
        mean, logvar = self.encoder(self._fold(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-20, 10)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised latents for the generator (the posterior mean)."""
        mean, _ = self.encode_dist(x)
        return (mean - self.config.shift) * self.config.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> clips (B, 3, T, H, W), roughly in [-1, 1]."""
        z = z / self.config.scale + self.config.shift
        return self._unfold(self.decoder(z))

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted L1 + L2 reconstruction plus a small KL to N(0, 1)."""
        mean, logvar = self.encode_dist(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        recon = self._unfold(self.decoder(z))
        # Objects cover ~5% of a clip; weight their pixels so the background does not dominate.
        weight = 1 + self.config.fg_weight * (x.amax(dim=1, keepdim=True) > -0.9).float()
        err = recon.float() - x
        rec = (weight * (err.abs() + err.square())).mean()
        kl = 0.5 * (mean.float().square() + logvar.float().exp() - 1 - logvar.float()).mean()
        loss = rec + self.config.kl_weight * kl
        return loss, {"recon": rec.item(), "kl": kl.item()}


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of clips in [-1, 1] (peak-to-peak 2)."""
    mse = (x.float().clamp(-1, 1) - y.float()).square().mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()
