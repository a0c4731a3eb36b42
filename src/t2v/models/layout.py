"""Layout first: where each object of a prompt is, frame by frame, before any pixel is drawn.

A layout is one box per object clause and frame, (x0, y0, x1, y1) in fractions of the frame,
NaN where a slot holds no object. The generator reads it as how much of each latent cell each
object covers (GLIGEN, Li et al. 2023, reads boxes as grounding tokens; here they are an
extra input beside the latents). At sampling time the layout comes from a small head on each
clause's pooled text vector, which predicts the object's size and its travel over the clip,
and a placement that keeps every box in the frame and apart from the others (the layout
stage of LLM-grounded video diffusion, Lian et al. 2024, with a learned head for the LLM).

Motion is a straight line at constant speed: start box plus travel times the frame's share
of the clip.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from t2v.models.text_encoders import TextEncoding

GAP = 1 / 32  # the smallest gap kept between two objects' boxes, in fractions of the frame
MIN_SIDE = 1 / 32  # a predicted side is kept within [MIN_SIDE, MAX_SIDE]
MAX_SIDE = 0.9
ATTEMPTS = 200  # draws of all start positions before the least crowded one is kept


def box_coverage(boxes: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """How much of each cell of a (t, h, w) grid each box covers, averaged over the cell's
    frames: boxes (B, K, F, 4) in fractions of the frame, F a multiple of t ->
    (B, K, t, h, w) in [0, 1]; NaN boxes cover nothing."""
    gt, gh, gw = grid
    b, k, frames, _ = boxes.shape
    if frames % gt:
        raise ValueError(f"{frames} frames do not divide into {gt} latent frames")
    x0, y0, x1, y1 = boxes.float().unbind(-1)  # each (B, K, F)

    def overlap(lo, hi, cells):  # (B, K, F, cells): share of each cell's span inside [lo, hi]
        edge = torch.arange(cells, device=boxes.device) / cells
        inside = torch.minimum(hi[..., None], edge + 1 / cells) - torch.maximum(lo[..., None], edge)
        return (inside.clamp(min=0) * cells).nan_to_num(0.0)

    cover = overlap(y0, y1, gh)[..., :, None] * overlap(x0, x1, gw)[..., None, :]
    return cover.view(b, k, gt, frames // gt, gh, gw).mean(3)


def clause_vectors(text: TextEncoding, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each object clause's leading token (its pooled vector, see TextEncoder.forward):
    (B, slots, D), and which slots hold a clause (B, slots) bool."""
    if text.slots is None:
        raise ValueError("a layout needs the prompt split into object clauses")
    b = text.tokens.shape[0]
    vectors = text.tokens.new_zeros(b, slots, text.tokens.shape[-1])
    present = torch.zeros(b, slots, dtype=torch.bool, device=text.tokens.device)
    for k in range(slots):
        on = (text.slots == k) & text.mask  # (B, L)
        first = on.float().argmax(1)  # the slot's first token
        present[:, k] = on.any(1)
        vectors[:, k] = text.tokens[torch.arange(b), first]
    return vectors, present


class LayoutHead(nn.Module):
    """Clause vector -> (side, travel x, travel y) of its object, in fractions of the frame."""

    def __init__(self, text_dim: int, width: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(text_dim),
            nn.Linear(text_dim, width),
            nn.GELU(),
            nn.Linear(width, width),
            nn.GELU(),
            nn.Linear(width, 3),
        )

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.net(vectors)


def motion_of(boxes: torch.Tensor) -> torch.Tensor:
    """The head's targets from boxes (B, K, F, 4): (B, K, 3) side, travel x, travel y."""
    side = boxes[:, :, 0, 2] - boxes[:, :, 0, 0]
    travel = boxes[:, :, -1, :2] - boxes[:, :, 0, :2]
    return torch.cat([side[..., None], travel], -1)


def _gap(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest gap between two box tracks (F, 4) over their frames; negative = overlap."""
    gx = np.maximum(b[:, 0] - a[:, 2], a[:, 0] - b[:, 2])
    gy = np.maximum(b[:, 1] - a[:, 3], a[:, 1] - b[:, 3])
    return float(np.maximum(gx, gy).min())


def place(motion: np.ndarray, frames: int, rng: np.random.Generator) -> np.ndarray:
    """Box tracks (K, frames, 4) for K objects' (side, travel x, travel y): each start drawn
    uniformly among those that keep its box in the frame for the whole clip, all redrawn
    together until every two tracks keep GAP apart (else the least crowded draw is kept)."""
    share = np.linspace(0.0, 1.0, frames)[:, None]
    objects = []
    for side, dx, dy in np.asarray(motion, np.float64).reshape(-1, 3):
        side = float(np.clip(side, MIN_SIDE, MAX_SIDE))
        dx, dy = (float(np.clip(d, side - 1, 1 - side)) for d in (dx, dy))
        objects.append((side, dx, dy))
    best, best_gap = np.zeros((0, frames, 4)), -np.inf
    for _ in range(ATTEMPTS):
        tracks = []
        for side, dx, dy in objects:
            x0 = rng.uniform(max(0.0, -dx), 1 - side - max(0.0, dx))
            y0 = rng.uniform(max(0.0, -dy), 1 - side - max(0.0, dy))
            start = np.array([x0, y0, x0 + side, y0 + side])
            tracks.append(start + share * np.array([dx, dy, dx, dy]))
        pairs = [(a, b) for i, a in enumerate(tracks) for b in tracks[i + 1 :]]
        gap = min((_gap(a, b) for a, b in pairs), default=np.inf)
        if gap > best_gap:
            best, best_gap = np.stack(tracks) if tracks else best, gap
        if gap >= GAP:
            break
    return best


@torch.no_grad()
def predict_layout(
    head: LayoutHead, text: TextEncoding, slots: int, seeds: list[int], frames: int
) -> torch.Tensor:
    """A layout for the first len(seeds) prompts of ``text``, one object per clause, placed
    by a generator of each seed; the rest of the batch (a guidance batch's unconditional
    half) gets none. -> (B, slots, frames, 4), NaN where there is no object."""
    vectors, present = clause_vectors(text, slots)
    motion = head(vectors.float()).float().cpu().numpy()
    boxes = np.full((len(vectors), slots, frames, 4), np.nan, np.float32)
    for i, seed in enumerate(seeds):
        ks = np.flatnonzero(present[i].cpu().numpy())
        boxes[i, ks] = place(motion[i, ks], frames, np.random.default_rng([seed, 0x1A7]))
    return torch.from_numpy(boxes).to(text.tokens.device)
