"""Training throughput at the size of the default model (configs/moving-shapes.yaml) on the
CPU, the machine's matmul peak, and the share of that peak a training step reaches.

Each stage runs the real Trainer step (data, autocast, forward, backward, clipping, AdamW,
EMA) at the recipe's batch sizes; the generator stage encodes with a randomly initialised
autoencoder of the recipe's size, which costs the same as a trained one. FLOPs are counted
by torch.utils.flop_counter.FlopCounterMode over one whole step (forward + backward).

Run: .venv/bin/python bench/train.py   (about 3 minutes on 2 idle cores; --help for options)
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from t2v import config as cfg
from t2v.models.autoencoder import VideoAutoencoder
from t2v.train import STAGES, TrainConfig, Trainer

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "moving-shapes.yaml"
PRECISIONS = ("fp32", "bf16")


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else platform.processor() or "unknown CPU"
    return (
        f"{cpu}; {os.cpu_count()} cores; torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f} at start"
    )


def recipe(run_dir: str | Path, precision: str = "fp32", batch_size: int | None = None):
    """The default model's recipe on the CPU, writing into run_dir."""
    overrides = [f"run_dir={run_dir}", f"precision={precision}", "device=cpu"]
    if batch_size is not None:
        overrides += [f"stages.{stage}.batch_size={batch_size}" for stage in STAGES]
    return cfg.load(TrainConfig, RECIPE, overrides)


def trainer(stage: str, config: TrainConfig) -> Trainer:
    """A Trainer for the stage; the generator gets a random autoencoder of the recipe's size."""
    final = Path(config.run_dir) / "autoencoder" / "final"
    if stage == "generator" and not final.is_dir():
        torch.manual_seed(config.seed)
        ae = VideoAutoencoder(config.autoencoder)
        final.mkdir(parents=True)
        cfg.save_json(ae.config, final / "config.json")
        save_file(ae.state_dict(), str(final / "model.safetensors"))
    return Trainer(config, stage, progress=False)


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """GFLOP/s of back-to-back (n x n) @ (n x n) products."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: thread pool and kernel selection
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def step_flops(t: Trainer) -> int:
    """FLOPs of one training step (forward and backward), counted op by op."""
    with FlopCounterMode(display=False) as counter:
        t.train_step()
    return counter.get_total_flops()


def seconds_per_step(t: Trainer, precision: str, warmup: int, steps: int) -> tuple[float, float]:
    """Wall and CPU (all threads) seconds per step; CPU well under wall x threads means the
    machine was busy with other work."""
    t.config = replace(t.config, precision=precision)  # read by every train_step
    for _ in range(warmup):
        t.train_step()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        t.train_step()
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--batch-size", type=int, help="both stages (default: the recipe's)")
    args = parser.parse_args()
    print(f"Machine: {machine()}\n")
    peaks = {
        p: matmul_peak(dtype)
        for p, dtype in zip(PRECISIONS, (torch.float32, torch.bfloat16), strict=True)
    }
    print("| matmul 2048x2048 | GFLOP/s |\n|---|---|")
    for p in PRECISIONS:
        print(f"| {p} | {peaks[p]:.0f} |")
    print(
        "\n| stage | precision | batch | s/step | CPU s/step | samples/s | GFLOP/step | GFLOP/s "
        "| share of the matmul peak |\n|---|---|---|---|---|---|---|---|---|"
    )
    with tempfile.TemporaryDirectory() as run_dir:
        config = recipe(run_dir, batch_size=args.batch_size)
        for stage in STAGES:
            t = trainer(stage, config)
            flops = step_flops(t)  # also the first warm-up step
            for p in PRECISIONS:
                s, cpu = seconds_per_step(t, p, args.warmup, args.steps)
                rate = flops / s / 1e9
                print(
                    f"| {stage} | {p} | {t.s.batch_size} | {s:.2f} | {cpu:.2f} | "
                    f"{t.s.batch_size / s:.1f} | {flops / 1e9:.0f} | {rate:.0f} | "
                    f"{rate / peaks[p]:.0%} of {p} |",
                    flush=True,
                )
    print(
        "\nGFLOP/step counts forward and backward of the whole step (for the generator: "
        "the frozen autoencoder's encoding, the text encoder and the generator); the "
        "share compares its rate with the matmul peak of the same precision."
    )


if __name__ == "__main__":
    main()
