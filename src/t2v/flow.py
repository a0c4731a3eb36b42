"""Flow matching with straight paths (rectified flow): the training objective and the time grid.

Data x0 and noise x1 are joined by x_t = (1 - t) x0 + t x1, t in [0, 1]; the network learns the
velocity v = x1 - x0 (Lipman et al. 2023 "Flow Matching for Generative Modeling"; Liu et al.
2023 "Flow Straight and Fast"). Sampling integrates from t = 1 (noise) down to t = 0 (data).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def sample_t(n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    """Logit-normal training times (Esser et al. 2024, SD3 §3.1): more weight mid-path."""
    return torch.sigmoid(torch.randn(n, generator=generator)).to(device)


def flow_loss(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Mean squared velocity error; ``model(x_t, t)`` predicts x1 - x0. x0, noise: (B, ...)."""
    tt = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    x_t = (1 - tt) * x0 + tt * noise
    return (model(x_t, t).float() - (noise - x0).float()).square().mean()


def time_grid(steps: int, shift: float = 1.0, device="cpu") -> torch.Tensor:
    """steps + 1 times from 1 to 0. shift > 1 spends more steps near the noise end
    (the timestep shift of Esser et al. 2024): t' = shift t / (1 + (shift - 1) t)."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    t = torch.linspace(1.0, 0.0, steps + 1, device=device)
    return shift * t / (1 + (shift - 1) * t)
