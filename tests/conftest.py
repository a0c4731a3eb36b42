"""Shared fixtures: a tiny random-weight model folder that generates in milliseconds."""

from __future__ import annotations

import pytest

# Tiny components with the whole prompt encoded at once and pooled text in the modulation: the
# simplest wiring, which the tests of generation and serving were written against.
TINY_TRAIN = {
    "autoencoder": {"latent_channels": 4, "width": 8, "latent_width": 16, "blocks": 1},
    "text_encoder": {
        "kind": "transformer",
        "width": 16,
        "depth": 1,
        "heads": 2,
        "split_objects": False,
    },
    "generator": {"width": 16, "depth": 1, "heads": 2, "pooled_text": True},
    "pipeline": {"steps": 4, "guidance": 2.0},
    "data": {"tokenizer_captions": 500},
}


def build_tiny_pipeline(seed: int = 0):
    import torch

    from t2v import shapes
    from t2v.config import from_dict
    from t2v.models.autoencoder import AutoencoderConfig
    from t2v.models.build import build_pipeline
    from t2v.models.generator import GeneratorConfig
    from t2v.models.text_encoders import TextEncoderConfig
    from t2v.pipeline import PipelineConfig, TextToVideoPipeline
    from t2v.text import Tokenizer

    torch.manual_seed(seed)
    tok = Tokenizer.train(shapes.caption_corpus(count=500))
    te, ae, gen = build_pipeline(
        from_dict(TextEncoderConfig, TINY_TRAIN["text_encoder"]),
        from_dict(AutoencoderConfig, TINY_TRAIN["autoencoder"]),
        from_dict(GeneratorConfig, TINY_TRAIN["generator"]),
        tok,
    )
    # adaLN-Zero starts at exactly zero output; nudge it so tests see prompt-dependent clips.
    with torch.no_grad():
        for p in gen.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return TextToVideoPipeline(te, ae, gen, from_dict(PipelineConfig, TINY_TRAIN["pipeline"]))


def build_tiny_layout_pipeline(seed: int = 0):
    """The tiny pipeline with object clauses and a generator that reads layouts."""
    import torch

    from t2v.config import from_dict
    from t2v.models.build import build_pipeline
    from t2v.models.generator import GeneratorConfig
    from t2v.models.text_encoders import TextEncoderConfig
    from t2v.pipeline import PipelineConfig, TextToVideoPipeline

    tiny = build_tiny_pipeline(seed)
    te_cfg = from_dict(TextEncoderConfig, TINY_TRAIN["text_encoder"] | {"split_objects": True})
    gen_cfg = from_dict(GeneratorConfig, TINY_TRAIN["generator"] | {"layout": True})
    torch.manual_seed(seed)
    te, ae, gen = build_pipeline(te_cfg, tiny.autoencoder, gen_cfg, tiny.text_encoder.tokenizer)
    with torch.no_grad():  # as build_tiny_pipeline: nudge the zero-initialised layers
        for p in gen.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return TextToVideoPipeline(te, ae, gen, from_dict(PipelineConfig, TINY_TRAIN["pipeline"]))


def kill_after_checkpoint(monkeypatch, step: int) -> None:
    """Make a training run stop (KeyboardInterrupt) right after it saves checkpoint ``step``,
    as a kill would; ``monkeypatch.undo()`` lets the next run go on."""
    from t2v.checkpoints import Checkpointer

    save = Checkpointer.save

    def killed(self, at, *args):
        saved = save(self, at, *args)
        if at == step:
            raise KeyboardInterrupt
        return saved

    monkeypatch.setattr(Checkpointer, "save", killed)


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


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory):
    """Tiny random-weight diffusers folders: {"wan": Path, "ltx": Path, "cogvideox": Path}
    (built by tests/tiny_diffusers.py in about 5 s; each generates in under a second)."""
    from tiny_diffusers import build_all

    return build_all(tmp_path_factory.mktemp("tiny-diffusers"))
