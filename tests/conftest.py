"""Shared fixtures: a tiny random-weight model folder that generates in milliseconds."""

from __future__ import annotations

import pytest

TINY_TRAIN = {
    "autoencoder": {"latent_channels": 4, "width": 8, "latent_width": 16, "blocks": 1},
    "text_encoder": {"kind": "transformer", "width": 16, "depth": 1, "heads": 2},
    "generator": {"width": 16, "depth": 1, "heads": 2},
    "pipeline": {"steps": 4, "guidance": 2.0},
    "data": {"tokenizer_captions": 500},
}


def build_tiny_pipeline(seed: int = 0):
    import torch

    from t2v import shapes
    from t2v.config import from_dict
    from t2v.models.autoencoder import AutoencoderConfig, VideoAutoencoder
    from t2v.models.generator import GeneratorConfig, LatentGenerator
    from t2v.models.text_encoders import TextEncoderConfig, build_text_encoder
    from t2v.pipeline import PipelineConfig, TextToVideoPipeline
    from t2v.text import Tokenizer

    torch.manual_seed(seed)
    tok = Tokenizer.train(shapes.caption_corpus(count=500))
    te = build_text_encoder(from_dict(TextEncoderConfig, TINY_TRAIN["text_encoder"]), tok)
    ae = VideoAutoencoder(from_dict(AutoencoderConfig, TINY_TRAIN["autoencoder"]))
    c, t, h, _ = ae.config.latent_shape
    gen = LatentGenerator(
        from_dict(
            GeneratorConfig,
            {
                **TINY_TRAIN["generator"],
                "text_dim": te.config.output_dim,
                "latent_channels": c,
                "latent_frames": t,
                "latent_size": h,
            },
        )
    )
    # adaLN-Zero starts at exactly zero output; nudge it so tests see prompt-dependent clips.
    with torch.no_grad():
        for p in gen.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return TextToVideoPipeline(te, ae, gen, from_dict(PipelineConfig, TINY_TRAIN["pipeline"]))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny model folder (config JSON + safetensors per component)."""
    path = tmp_path_factory.mktemp("tiny-model")
    build_tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one thread: they gain nothing from more, and OpenMP
    threads that spin-wait on a busy shared machine make each step 10-100x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
