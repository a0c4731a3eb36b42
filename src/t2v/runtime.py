"""What every model backend needs from the machine: a device, a precision, a step counter
that reports progress and honours cancellation, refusal of pickle files, atomic writes.

Torch is imported inside the functions that need it, so that the CLI can import this
module (through t2v.config) and print its help without loading torch.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from t2v.model import Cancelled, GenerationFailed, IsCancelled, ModelError, Progress

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
OFFLOADS = ("none", "model", "sequential")


def add_run_options(parser) -> None:
    """``--device``, ``--precision`` and ``--offload``: how a model runs, stated once for every
    command that loads one (generate, eval, serve, worker)."""
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where the model runs; auto: a CUDA GPU when there is one",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="the model's arithmetic: bf16 and fp16 are faster on a GPU and use less memory",
    )
    parser.add_argument(
        "--offload",
        choices=OFFLOADS,
        default="none",
        help="GPU only: keep a large model's weights on the CPU until each part runs (model),"
        " or each layer (sequential: least memory, slowest)",
    )


PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")


def resolve_device(device: str = "auto"):
    """``auto`` is CUDA when there is a usable GPU, else the CPU."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in DEVICES:
        raise ModelError(f"Unknown device {device!r}; use auto, cpu or cuda.")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for, but this machine has no usable CUDA GPU.")
    return torch.device(device)


def dtype(precision: str):
    """The torch dtype of a precision name."""
    import torch

    if precision not in PRECISIONS:
        raise ModelError(f"Unknown precision {precision!r}; use fp32, bf16 or fp16.")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device, precision: str):
    """Autocast to bf16 or fp16 on the device, or nothing for fp32."""
    import torch

    kind = dtype(precision)
    if kind == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=kind)


def check_offload(offload: str, device) -> str:
    """Offloading moves weights between the GPU and the CPU, so it means nothing on a CPU."""
    if offload not in OFFLOADS:
        raise ModelError(f"Unknown offload {offload!r}; use none, model or sequential.")
    if offload != "none" and device.type != "cuda":
        raise ModelError(
            f"--offload {offload} moves weights between a GPU and the CPU, so it needs "
            "--device cuda; leave it at none on a CPU."
        )
    return offload


def folder_files(path: Path) -> list[Path]:
    """Every file under ``path``, following symbolic links to folders (a linked subfolder is
    loaded like any other, so it is checked like any other); each real folder once."""
    seen: set[str] = set()
    files: list[Path] = []
    for root, dirs, names in os.walk(path, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link cycle, or the same folder linked twice
            dirs[:] = []
            continue
        seen.add(real)
        files += [Path(root) / n for n in names]
    return sorted(files)


def refuse_pickles(path: Path) -> None:
    """Refuse a folder holding any pickle-format file, before anything in it is read:
    unpickling runs arbitrary code."""
    for f in folder_files(path):
        if f.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelError(
                f"Refusing to load {path}: it contains {f.name}, a pickle-format "
                "file; t2v only loads safetensors weights and JSON configs."
            )


class StepCounter:
    """Called after each denoising step of a run over ``total`` steps: reports progress and
    raises `Cancelled` once ``cancelled()`` is true, so a cancel lands within one step."""

    def __init__(self, total: int, progress: Progress | None, cancelled: IsCancelled | None):
        self.done, self.total = 0, total
        self.progress, self.cancelled = progress, cancelled
        self.check()

    def check(self) -> None:
        if self.cancelled is not None and self.cancelled():
            raise Cancelled()

    def step(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)
        self.check()


@contextlib.contextmanager
def out_of_memory_fails() -> Iterator[None]:
    """Turn the device running out of memory into `GenerationFailed` with the reason, so the
    CLI prints one sentence and the server fails the job and stays up."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise GenerationFailed(
            "The GPU ran out of memory; ask for fewer frames or a smaller size, use "
            "--precision bf16, or --offload model."
        ) from None


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; model files are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
