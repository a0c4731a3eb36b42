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
from t2v.models.layout import box_coverage, clause_vectors, motion_of, predict_layout


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
        """boxes: where each object is, in pixels (see shapes.object_boxes). Given, a
        positive attention_loss adds the attention loss, and a layout generator reads them
        (unless dropped) and trains its layout head on them."""
        g = self.generator.config
        with torch.no_grad():
            z = self._frozen[0].encode(clips).float()  # (B, C, T', H', W')
        keep = torch.rand(len(captions)) >= g.cond_dropout
        text = self.text_encoder([c if k else "" for c, k in zip(captions, keep, strict=True)])
        terms: dict[str, torch.Tensor] = {}
        extra = z.new_zeros(())
        if boxes is not None:
            boxes = boxes.to(z.device).float() / clips.shape[-1]  # fractions of the frame
            objects = boxes[:, :, 0, 0].isfinite().sum(1)  # (B,)
            slots = text.slots.masked_fill(~text.mask, 0).amax(1) + 1
            # Clips whose caption was kept and split into one clause per object.
            matched = keep.to(z.device) & (slots == objects)
        if g.layout and boxes is not None:
            drop = ~keep | (torch.rand(len(captions)) < g.layout_dropout)
            given = boxes.masked_fill(drop.to(z.device)[:, None, None, None], float("nan"))
            text = text._replace(boxes=given)
            layout = self._layout_loss(text, boxes, matched)
            extra, terms["layout"] = extra + layout, layout.detach()
        t = sample_t(len(z), device=z.device)
        maps = [] if boxes is not None and g.attention_loss > 0 else None
        loss = flow_loss(lambda x, tt: self.generator(x, tt, text, maps), z, t, torch.randn_like(z))
        if maps:
            cover = box_coverage(boxes, g.grid).flatten(2)  # (B, K, N)
            # With one object, all the attention is on its slot anyway.
            attention = slot_attention_loss(
                maps, text.slots, text.mask, cover, matched & (objects > 1)
            )
            extra = extra + g.attention_loss * attention
            terms["attention"] = attention.detach()
        if not terms:
            return loss, {}
        return loss + extra, {"flow": loss.detach(), **terms}

    def _layout_loss(self, text, boxes: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
        """Squared error of the layout head's size and travel for each object of the clips
        in ``use``."""
        k = boxes.shape[1]
        vectors, _ = clause_vectors(text, k)
        pred = self.generator.layout_head(vectors).float()  # (B, K, 3)
        target = motion_of(boxes)
        weight = (target[..., 0].isfinite() & use[:, None]).float()[..., None]
        err = (pred - target.nan_to_num(0.0)).square() * weight
        return err.sum() / (3 * weight.sum()).clamp(min=1.0)


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

    def forward(
        self, clips: torch.Tensor, captions: list[str], boxes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict]:
        """boxes: where each clip's objects are, in pixels; a layout student and its teacher
        read them on the noised training latents (paths from noise get predicted layouts)."""
        c = self.config
        n = c.step_counts[int(torch.multinomial(torch.tensor(c.shares), 1))]
        if n == c.steps and c.path_starts and len(captions) >= n:
            return self._on_path(clips, captions, n)
        with torch.no_grad():
            z = self._frozen[0].encode(clips).float()
        if self.generator.config.layout:
            boxes = None if boxes is None else boxes.to(z.device).float() / clips.shape[-1]
            boxes = self.layout(captions) if boxes is None else boxes
        b = len(z)
        t = torch.randint(1, n + 1, (b,)).float().to(z.device) / n  # a time of the n-grid
        h = torch.full_like(t, 1.0 / n)
        tt = t.view(-1, 1, 1, 1, 1)
        x = (1 - tt) * z + tt * torch.randn_like(z)
        text = with_boxes(self.text_encoder(captions), boxes)
        with torch.no_grad():
            if n >= c.steps:
                substeps = max(1, round(self.teacher_steps / n))
                both = with_boxes(self.text_encoder(list(captions) + [""] * len(captions)), boxes)
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
        boxes = self.layout(prompts) if self.generator.config.layout else None
        x, times, target = self.path_points(noise.to(clips.device), prompts, n, boxes)
        text = with_boxes(
            self.text_encoder(prompts * n), None if boxes is None else boxes.repeat(n, 1, 1, 1)
        )
        u = self.generator(x, times, text, step=torch.full_like(times, 1.0 / n)).float()
        loss = (u - target).square().mean()
        return loss, {f"steps_{n}": loss.detach()}

    @torch.no_grad()
    def path_points(
        self, noise: torch.Tensor, prompts: list[str], n: int, boxes: torch.Tensor | None = None
    ):
        """The teacher's guided paths from ``noise`` (k, ...) for ``prompts`` (with a layout
        teacher, laid out by ``boxes``) cut into n steps: each step's start and time, and
        its mean velocity, step-major: (n * k, ...)."""
        k = len(prompts)
        t = torch.ones(k, device=noise.device)
        h = torch.full_like(t, 1.0 / n)
        substeps = max(1, round(self.teacher_steps / n))
        both = with_boxes(self.text_encoder(prompts + [""] * k), boxes)
        x, starts, targets = noise, [], []
        for i in range(n):
            u = self._teacher_path(x, t - i * h, h, substeps, both)
            starts.append(x)
            targets.append(u)
            x = x - h.view(-1, 1, 1, 1, 1) * u
        times = torch.cat([t - i * h for i in range(n)])
        return torch.cat(starts), times, torch.cat(targets)

    @torch.no_grad()
    def layout(self, prompts: list[str]) -> torch.Tensor:
        """Layouts as sampling draws them, by the teacher's layout head, each placed by a
        seed of the run's random stream: (len(prompts), slots, frames, 4)."""
        teacher = self._frozen[1]
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        text = self.text_encoder(prompts)
        frames = self._frozen[0].config.frames
        return predict_layout(teacher.layout_head, text, teacher.config.text_slots, seeds, frames)

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


def with_boxes(text, boxes: torch.Tensor | None):
    """``text`` whose first len(boxes) rows are laid out by ``boxes`` and the rest (a guidance
    batch's empty prompts) by none; unchanged without boxes."""
    if boxes is None:
        return text
    full = boxes.new_full((len(text.tokens), *boxes.shape[1:]), float("nan"))
    full[: len(boxes)] = boxes
    return text._replace(boxes=full)


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
