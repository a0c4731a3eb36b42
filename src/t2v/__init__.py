"""t2v: text-to-video that trains on a laptop CPU and scales to GPUs."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import t2v` (and the CLI's --help) does not import torch.
    if name == "TextToVideoPipeline":
        from t2v.pipeline import TextToVideoPipeline

        return TextToVideoPipeline
    raise AttributeError(name)
