"""Latent video generator: a diffusion transformer (Peebles & Xie 2023, "DiT") over latent
patches, conditioned on the flow time through adaLN-Zero modulation shared across blocks
(adaLN-single, Chen et al. 2023 "PixArt-alpha") and on the text through a cross-attention
layer in every block.

The network predicts a velocity; it knows nothing of flow matching or sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import nn

from t2v.models.layers import MLP, Attention, timestep_embedding
from t2v.models.layout import LayoutHead, box_coverage
from t2v.models.text_encoders import TextEncoding


@dataclass
class GeneratorConfig:
    latent_channels: int = 8
    latent_frames: int = 4
    latent_size: int = 8
    patch_t: int = 1
    patch_s: int = 2
    width: int = 256
    depth: int = 8
    heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = 384  # derived when built: the text encoder's output_dim
    cond_dropout: float = 0.1  # share of captions replaced by "" in training, for guidance
    # Learned embeddings, one per object slot, added to the text tokens of that slot's clause;
    # derived when built (MAX_SLOTS with text_encoder.split_objects, else 0 = none).
    text_slots: int = 4
    # Training only: weight of a loss that sends each latent token's cross-attention to the
    # text slot of the object that covers it. It runs only when the data source knows where
    # its objects are (Moving Shapes does) and the text is split into object clauses; 0 = off.
    attention_loss: float = 0.1
    # Add the pooled text vector to the time embedding that modulates every block (adaLN).
    # With several objects that one vector is a blend of their clauses, so False leaves
    # the text to the attention alone (as PixArt-alpha's adaLN-single does).
    pooled_text: bool = False
    # Set on a few-step student (`t2v train distill`): the classifier-free guidance scale
    # of the teacher velocities it learned. Such a generator also takes the step size of
    # its sampler (its output is the mean velocity over that step) and needs no second,
    # unconditional pass; None = an ordinary velocity model.
    distilled_guidance: float | None = None
    # Layout first (t2v.models.layout): the generator also reads where each object clause's
    # object is in every frame, and a head on each clause's pooled vector predicts its size
    # and travel, from which sampling places the boxes. Needs object clauses (text_slots)
    # and, to train, a data source that gives object boxes.
    layout: bool = True
    # Training only: share of kept captions whose layout is dropped all the same, so the
    # generator also draws from the text alone (a dropped caption drops its layout too).
    layout_dropout: float = 0.1

    # Model folders saved before joint attention was removed store the text attention.
    REMOVED: ClassVar[dict[str, Any]] = {"text_attention": "cross"}
    # Model folders saved before layouts were added read none.
    ADDED: ClassVar[dict[str, Any]] = {"layout": False}

    def validate(self) -> None:
        if self.latent_frames % self.patch_t or self.latent_size % self.patch_s:
            raise ValueError("the latent grid must divide by the patch size")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must divide by heads {self.heads}")
        if self.layout and not self.text_slots:
            raise ValueError("generator.layout needs text_encoder.split_objects")

    @property
    def grid(self) -> tuple[int, int, int]:
        return (
            self.latent_frames // self.patch_t,
            self.latent_size // self.patch_s,
            self.latent_size // self.patch_s,
        )


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """Self-attention, cross-attention to text, MLP; adaLN-Zero gates on the residuals."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        d = cfg.width
        self.ln1 = nn.LayerNorm(d, elementwise_affine=False)
        self.attn = Attention(d, cfg.heads)
        self.ln_x = nn.LayerNorm(d)
        self.cross = Attention(d, cfg.heads, context_dim=cfg.text_dim)
        self.ln2 = nn.LayerNorm(d, elementwise_affine=False)
        self.mlp = MLP(d, cfg.mlp_ratio)
        # This block's learned offset to the shared modulation (adaLN-single).
        self.mod_bias = nn.Parameter(torch.zeros(6, d))

    def forward(self, x, mod, text: TextEncoding, maps=None):
        """x: (B, N, D); mod: (B, 6, D) shared time modulation; text tokens (B, L, Dt);
        maps: a list that gets the cross-attention weights (B, N, L), if given."""
        sh1, sc1, g1, sh2, sc2, g2 = (mod + self.mod_bias).unbind(1)  # each (B, D)
        x = x + g1[:, None] * self.attn(_modulate(self.ln1(x), sh1, sc1))
        x = x + self.cross(self.ln_x(x), text.tokens, text.mask, weights=maps)
        return x + g2[:, None] * self.mlp(_modulate(self.ln2(x), sh2, sc2))


class LatentGenerator(nn.Module):
    def __init__(self, config: GeneratorConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        d = c.width
        patch_dim = c.latent_channels * c.patch_t * c.patch_s**2
        gt, gh, gw = c.grid
        self.patch_in = nn.Linear(patch_dim, d)
        # Factorised learned positions: time + row + column.
        self.pos_t = nn.Parameter(torch.randn(gt, 1, 1, d) * 0.02)
        self.pos_h = nn.Parameter(torch.randn(1, gh, 1, d) * 0.02)
        self.pos_w = nn.Parameter(torch.randn(1, 1, gw, d) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        if c.pooled_text:
            self.text_pool = nn.Linear(c.text_dim, d)
        if c.distilled_guidance is not None:  # the step size, beside the time
            self.step_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
            nn.init.zeros_(self.step_mlp[-1].weight)  # a student starts as its teacher
            nn.init.zeros_(self.step_mlp[-1].bias)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        if c.text_slots:
            self.slot_embed = nn.Parameter(torch.randn(c.text_slots, c.text_dim) * 0.1)
        if c.layout:  # each slot's share of each latent cell, patched like the latents
            self.layout_in = nn.Linear(c.text_slots * c.patch_t * c.patch_s**2, d, bias=False)
            nn.init.zeros_(self.layout_in.weight)  # added to a trained model, it starts as it
            self.layout_head = LayoutHead(c.text_dim, d)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.ln_out = nn.LayerNorm(d, elementwise_affine=False)
        self.out_mod = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.patch_out = nn.Linear(d, patch_dim)
        # adaLN-Zero: every block starts as the identity and the output as zero.
        for layer in (self.modulation[-1], self.out_mod[-1], self.patch_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: TextEncoding,
        attention_maps: list[torch.Tensor] | None = None,
        step: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, C, T, H, W) latents at flow time t (B,) -> velocity of the same shape;
        with ``distilled_guidance`` set, the mean velocity over a step of size ``step`` (B,)
        from t towards 0 (the step is required then, and refused otherwise).
        attention_maps: a list that gets each block's cross-attention weights from the latent
        tokens (in (t, h, w) order) to the text tokens, averaged over heads: (B, N, L).
        A layout generator reads ``text.boxes`` when set (None = no layout, as a dropped one)."""
        c = self.config
        gt, gh, gw = c.grid
        tokens = rearrange(
            x,
            "b c (t pt) (h ph) (w pw) -> b t h w (c pt ph pw)",
            pt=c.patch_t,
            ph=c.patch_s,
            pw=c.patch_s,
        )
        h = self.patch_in(tokens) + self.pos_t + self.pos_h + self.pos_w  # (B, T, H, W, D)
        if c.layout and text.boxes is not None:
            h = h + self.layout_in(self._layout_tokens(text.boxes).to(h.dtype))
        h = h.flatten(1, 3)  # (B, N, D)
        if c.text_slots:  # mark each text token with its object's slot
            slots = text.mask.long() * 0 if text.slots is None else text.slots
            slot = self.slot_embed[slots.clamp(max=c.text_slots - 1)]
            text = text._replace(tokens=text.tokens + slot.to(text.tokens.dtype))
        cond = self.time_mlp(timestep_embedding(t, c.width).to(h.dtype))
        if (step is None) != (c.distilled_guidance is None):
            raise ValueError("a step size goes with a distilled generator, and only with one")
        if step is not None:
            cond = cond + self.step_mlp(timestep_embedding(step, c.width).to(h.dtype))
        if c.pooled_text:
            cond = cond + self.text_pool(text.pooled.to(h.dtype))  # (B, D)
        mod = self.modulation(cond).unflatten(1, (6, c.width))  # (B, 6, D)
        for block in self.blocks:
            h = block(h, mod, text, attention_maps)
        shift, scale = self.out_mod(cond).chunk(2, dim=1)
        out = self.patch_out(_modulate(self.ln_out(h), shift, scale))  # (B, N, patch_dim)
        return rearrange(
            out,
            "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)",
            t=gt,
            h=gh,
            w=gw,
            pt=c.patch_t,
            ph=c.patch_s,
            pw=c.patch_s,
        )

    def _layout_tokens(self, boxes: torch.Tensor) -> torch.Tensor:
        """Boxes (B, K, F, 4) -> how much each slot's object covers each latent cell, patched
        like the latents: (B, T', H', W', slots * patch)."""
        c = self.config
        cover = box_coverage(
            boxes[:, : c.text_slots], (c.latent_frames, c.latent_size, c.latent_size)
        )
        if cover.shape[1] < c.text_slots:  # fewer slots given: the rest hold no object
            pad = cover.new_zeros(cover.shape[0], c.text_slots - cover.shape[1], *cover.shape[2:])
            cover = torch.cat([cover, pad], 1)
        return rearrange(
            cover,
            "b k (t pt) (h ph) (w pw) -> b t h w (k pt ph pw)",
            pt=c.patch_t,
            ph=c.patch_s,
            pw=c.patch_s,
        )
