"""Samplers for the probability-flow ODE dx/dt = v(x, t, cond), integrated from t = 1 to 0.

All share one signature, ``sample_x(model, x, ts, cond, callback=None)``, and keep no state:
two requests can sample at the same time. ``model(x, t, cond)`` returns the velocity, with t a
(B,) tensor; ``callback(step, total)`` is called after each step. The few-step sampler of a
distilled generator also passes the step: ``model(x, t, cond, step)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Model = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]
Callback = Callable[[int, int], None] | None


def _t(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.expand(x.shape[0])


@torch.no_grad()
def sample_euler(
    model: Model, x: torch.Tensor, ts: torch.Tensor, cond, callback: Callback = None
) -> torch.Tensor:
    """Euler's method on the flow ODE (Karras et al. 2022, Alg. 1 with Euler steps)."""
    total = len(ts) - 1
    for i in range(total):
        x = x + (ts[i + 1] - ts[i]) * model(x, _t(ts[i], x), cond)
        if callback is not None:
            callback(i + 1, total)
    return x


@torch.no_grad()
def sample_heun(
    model: Model, x: torch.Tensor, ts: torch.Tensor, cond, callback: Callback = None
) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); the last step is Euler."""
    total = len(ts) - 1
    for i in range(total):
        dt = ts[i + 1] - ts[i]
        v = model(x, _t(ts[i], x), cond)
        x_next = x + dt * v
        if i < total - 1:
            v_next = model(x_next, _t(ts[i + 1], x), cond)
            x_next = x + dt * (v + v_next) / 2
        x = x_next
        if callback is not None:
            callback(i + 1, total)
    return x


@torch.no_grad()
def sample_shortcut(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    ts: torch.Tensor,
    cond,
    callback: Callback = None,
) -> torch.Tensor:
    """Steps of a model that predicts the mean velocity over the step it is told (a shortcut
    model, Frans et al. 2025): x_next = x - d u(x, t, d), d = t - t_next. With d towards 0 it
    is Euler's method; a distilled student takes its teacher's path in a few long steps."""
    total = len(ts) - 1
    for i in range(total):
        d = ts[i] - ts[i + 1]
        x = x - d * model(x, _t(ts[i], x), cond, _t(d, x))
        if callback is not None:
            callback(i + 1, total)
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "shortcut": sample_shortcut}
# Samplers of a velocity model; "shortcut" goes with a distilled generator and only with one.
VELOCITY_SAMPLERS = ("euler", "heun")
