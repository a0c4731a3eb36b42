"""Training objectives: the autoencoder's reconstruction loss, flow matching for the
generator, the attention loss that sends each latent token to its object's words, and the
distillation of a few-step student from a trained generator.

An objective wraps the networks it trains and returns (loss, its logged terms); the trainer
knows nothing of what the loss is.
"""

from __future__ import annotations

import torch
from torch import nn

from t2v.flow import flow_loss, sample_t
from t2v.models.autoencoder import VideoAutoencoder
from t2v.models.generator import LatentGenerator


class AutoencoderObjective(nn.Module):
    def __init__(self, autoencoder: VideoAutoencoder):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, clips: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, dict]:
        return self.autoencoder.loss(clips)


class GeneratorObjective(nn.Module):
    """Flow matching on latents of the frozen autoencoder; the text encoder trains alongside
    when it is trainable. Captions are dropped to "" at cond_dropout for guidance."""

    def __init__(self, generator: LatentGenerator, text_encoder, autoencoder: VideoAutoencoder):
        super().__init__()
        self.generator, self.text_encoder = generator, text_encoder
        self._frozen = [autoencoder.requires_grad_(False).eval()]  # not a submodule: not trained

    def forward(
        self, clips: torch.Tensor, captions: list[str], boxes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict]:
        """boxes: where each object is (see shapes.object_boxes): given, and with a positive
        attention_loss, the attention loss is added."""
        g = self.generator.config
        with torch.no_grad():
            z = self._frozen[0].encode(clips).float()  # (B, C, T', H', W')
        keep = torch.rand(len(captions)) >= g.cond_dropout
        text = self.text_encoder([c if k else "" for c, k in zip(captions, keep, strict=True)])
        t = sample_t(len(z), device=z.device)
        maps = [] if boxes is not None and g.attention_loss > 0 else None
        loss = flow_loss(lambda x, tt: self.generator(x, tt, text, maps), z, t, torch.randn_like(z))
        if not maps:
            return loss, {}
        coverage = token_coverage(boxes.to(z.device), g.grid, clips.shape[-1])
        objects = boxes[:, :, 0, 0].isfinite().sum(1).to(z.device)  # (B,)
        slots = text.slots.masked_fill(~text.mask, 0).amax(1) + 1
        # Only clips whose caption was kept and split into one clause per object, and that
        # have several objects (with one, all the attention is on its slot anyway).
        use = keep.to(z.device) & (objects > 1) & (slots == objects)
        attention = slot_attention_loss(maps, text.slots, text.mask, coverage, use)
        return loss + g.attention_loss * attention, {
            "flow": loss.detach(),
            "attention": attention.detach(),
        }


class DistillObjective(nn.Module):
    """A few-step student with its teacher's guidance inside (Meng et al. 2023, "On
    Distillation of Guided Diffusion Models"): for a step of size h = 1/n from a time on the
    n-step grid, the student's mean velocity must match where the teacher's guided Euler
    steps over that span lead (counts of at least ``config.steps``), or where two of the
    student's own steps of h/2 lead (smaller counts: shortcut models, Frans et al. 2025).
    Each batch trains one count, drawn by ``config.shares``. Batches of the default count
    (``config.steps``) start where its sampler will: on the teacher's guided path from noise
    (``config.path_starts``; one path gives a start and a target for each of its steps).
    The other counts start from noised training latents, as progressive distillation does
    (Salimans & Ho 2022)."""

    def __init__(
        self,
        student: LatentGenerator,
        teacher: LatentGenerator,
        text_encoder,
        autoencoder: VideoAutoencoder,
        config,  # t2v.train_config.DistillConfig
        teacher_steps: int,
    ):
        super().__init__()
        self.generator, self.text_encoder, self.config = student, text_encoder, config
        # Frozen, so not submodules: neither trained nor averaged nor checkpointed.
        self._frozen = [autoencoder.requires_grad_(False).eval(), teacher.requires_grad_(False)]
        self.teacher_steps = teacher_steps
        self.guidance = student.config.distilled_guidance

    def forward(self, clips: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, dict]:
        c = self.config
        n = c.step_counts[int(torch.multinomial(torch.tensor(c.shares), 1))]
        if n == c.steps and c.path_starts and len(captions) >= n:
            return self._on_path(clips, captions, n)
        with torch.no_grad():
            z = self._frozen[0].encode(clips).float()
        b = len(z)
        t = torch.randint(1, n + 1, (b,)).float().to(z.device) / n  # a time of the n-grid
        h = torch.full_like(t, 1.0 / n)
        tt = t.view(-1, 1, 1, 1, 1)
        x = (1 - tt) * z + tt * torch.randn_like(z)
        text = self.text_encoder(captions)
        with torch.no_grad():
            if n >= c.steps:
                substeps = max(1, round(self.teacher_steps / n))
                both = self.text_encoder(list(captions) + [""] * len(captions))
                target = self._teacher_path(x, t, h, substeps, both)
            else:
                target = self._two_half_steps(x, t, h, text)
        loss = (self.generator(x, t, text, step=h).float() - target).square().mean()
        return loss, {f"steps_{n}": loss.detach()}

    def _on_path(self, clips, captions: list[str], n: int) -> tuple[torch.Tensor, dict]:
        """A batch of start points on the teacher's guided paths from noise: len // n paths,
        each cut into n steps, whose mean velocities are the targets."""
        prompts = list(captions[: len(captions) // n])
        noise = torch.randn(len(prompts), *self._frozen[0].config.latent_shape)
        x, times, target = self.path_points(noise.to(clips.device), prompts, n)
        text = self.text_encoder(prompts * n)
        u = self.generator(x, times, text, step=torch.full_like(times, 1.0 / n)).float()
        loss = (u - target).square().mean()
        return loss, {f"steps_{n}": loss.detach()}

    @torch.no_grad()
    def path_points(self, noise: torch.Tensor, prompts: list[str], n: int):
        """The teacher's guided paths from ``noise`` (k, ...) for ``prompts`` cut into n steps:
        each step's start and time, and its mean velocity, step-major: (n * k, ...)."""
        k = len(prompts)
        t = torch.ones(k, device=noise.device)
        h = torch.full_like(t, 1.0 / n)
        substeps = max(1, round(self.teacher_steps / n))
        both = self.text_encoder(prompts + [""] * k)
        x, starts, targets = noise, [], []
        for i in range(n):
            u = self._teacher_path(x, t - i * h, h, substeps, both)
            starts.append(x)
            targets.append(u)
            x = x - h.view(-1, 1, 1, 1, 1) * u
        times = torch.cat([t - i * h for i in range(n)])
        return torch.cat(starts), times, torch.cat(targets)

    def _teacher_path(self, x, t, h, substeps: int, both) -> torch.Tensor:
        """The mean velocity of ``substeps`` guided Euler steps of the teacher over h;
        ``both``: the text of the captions, then of as many empty prompts."""
        teacher, g = self._frozen[1], self.guidance
        dt = (h / substeps).view(-1, 1, 1, 1, 1)
        y = x
        for j in range(substeps):
            tj = t - j * h / substeps
            v_cond, v_neg = teacher(torch.cat([y, y]), torch.cat([tj, tj]), both).float().chunk(2)
            y = y - dt * (v_neg + g * (v_cond - v_neg))
        return (x - y) / h.view(-1, 1, 1, 1, 1)

    def _two_half_steps(self, x, t, h, text) -> torch.Tensor:
        """The mean velocity of two of the student's own steps of h / 2."""
        half = h / 2
        u1 = self.generator(x, t, text, step=half).float()
        y = x - half.view(-1, 1, 1, 1, 1) * u1
        u2 = self.generator(y, t - half, text, step=half).float()
        return (u1 + u2) / 2


def token_coverage(boxes: torch.Tensor, grid: tuple[int, int, int], size: int) -> torch.Tensor:
    """How much of each latent token each object covers, averaged over the token's frames:
    boxes (B, K, T, 4) in pixels of a size x size clip -> (B, K, N), N = latent tokens in
    (t, h, w) order; absent objects (NaN boxes) cover nothing."""
    gt, gh, gw = grid
    b, k, frames, _ = boxes.shape
    x0, y0, x1, y1 = boxes.float().unbind(-1)  # each (B, K, T)

    def overlap(lo, hi, cells):  # (B, K, T, cells): share of each cell's span inside [lo, hi]
        width = size / cells
        edge = torch.arange(cells, device=boxes.device) * width
        inside = torch.minimum(hi[..., None], edge + width) - torch.maximum(lo[..., None], edge)
        return (inside.clamp(min=0) / width).nan_to_num(0.0)

    cover = overlap(y0, y1, gh)[..., :, None] * overlap(x0, x1, gw)[..., None, :]
    cover = cover.view(b, k, gt, frames // gt, gh, gw).mean(3)  # (B, K, gt, gh, gw)
    return cover.flatten(2)


def slot_attention_loss(
    maps: list[torch.Tensor],
    slots: torch.Tensor,
    mask: torch.Tensor,
    coverage: torch.Tensor,
    use: torch.Tensor,
) -> torch.Tensor:
    """Cross-entropy between where the objects are and where the latent tokens look: for each
    token an object covers, the attention it pays to each object's text slot should follow
    the objects' shares of it (after Wang et al. 2024, "TokenCompose", which supervises
    cross-attention with segmentation masks). Tokens no object covers are free. Weighted by
    coverage, averaged over the blocks' maps (B, N, L); slots/mask (B, L); coverage
    (B, K, N); use (B,) which clips count."""
    k = coverage.shape[1]
    onehot = nn.functional.one_hot(slots.clamp(max=k - 1), k).float() * mask[..., None]
    total = coverage.sum(1)  # (B, N)
    target = (coverage / total.clamp(min=1e-6)[:, None]).transpose(1, 2)  # (B, N, K)
    weight = total.clamp(max=1.0) * use[:, None]
    norm = weight.sum().clamp(min=1e-6)
    losses = []
    for a in maps:
        on_slot = a.float() @ onehot  # (B, N, K): attention mass on each object's words
        ce = -(target * on_slot.clamp(min=1e-6).log()).sum(-1)  # (B, N)
        losses.append((ce * weight).sum() / norm)
    return torch.stack(losses).mean()
