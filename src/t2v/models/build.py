"""Build the three networks of a text-to-video model from their configs.

Some settings of one component follow from another: the generator attends to the text
encoder's output width, marks as many slots as the text encoder splits prompts into, and works
on the autoencoder's latent grid. They are derived here, once, with ``dataclasses.replace``,
so the caller's configs are never changed; each built component holds its derived config.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

from t2v.models.autoencoder import AutoencoderConfig, VideoAutoencoder
from t2v.models.generator import GeneratorConfig, LatentGenerator
from t2v.models.text_encoders import (
    MAX_SLOTS,
    TextEncoder,
    TextEncoderConfig,
    build_text_encoder,
)
from t2v.text import Tokenizer


class Components(NamedTuple):
    """The networks, each with its derived config as ``.config``."""

    text_encoder: TextEncoder
    autoencoder: VideoAutoencoder
    generator: LatentGenerator


def generator_config(
    generator: GeneratorConfig, text: TextEncoderConfig, autoencoder: AutoencoderConfig
) -> GeneratorConfig:
    """``generator`` fitted to a built text encoder's config and the autoencoder's latents."""
    channels, frames, size, _ = autoencoder.latent_shape
    return replace(
        generator,
        text_dim=text.output_dim,
        text_slots=MAX_SLOTS if text.split_objects else 0,
        layout=generator.layout and text.split_objects,  # one box per object clause
        latent_channels=channels,
        latent_frames=frames,
        latent_size=size,
    )


def build_pipeline(
    text_encoder: TextEncoderConfig,
    autoencoder: AutoencoderConfig | VideoAutoencoder,
    generator: GeneratorConfig,
    tokenizer: Tokenizer | None,
) -> Components:
    """Fresh networks (or, for the autoencoder, a trained one passed in) wired together."""
    te = build_text_encoder(text_encoder, tokenizer)
    ae = autoencoder if isinstance(autoencoder, VideoAutoencoder) else VideoAutoencoder(autoencoder)
    gen = LatentGenerator(generator_config(generator, te.config, ae.config))
    return Components(te, ae, gen)
