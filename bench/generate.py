"""Generation latency and memory on the CPU: batch 1 and 16, fp32 and bf16, split into text
encoding / sampling / decoding; a steps x guidance trade-off (steps alone for a distilled
model, whose guidance is fixed); and one cold `t2v generate`.

The model is --model, else the bundled default model when it is installed, else a randomly
initialised model of the recipe's sizes (configs/moving-shapes.yaml), which costs the same
to run as a trained one. Peak memory is the whole process's resident-set high-water mark
(VmHWM in /proc/self/status, the figure getrusage reports as ru_maxrss, so it includes
torch itself), reset before each case by writing 5 to /proc/self/clear_refs.

Run: .venv/bin/python bench/generate.py   (about 3 minutes on 2 idle cores; --help for options)
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from t2v import shapes
from t2v.pipeline import DEFAULT_MODEL_DIR, TextToVideoPipeline
from train import machine, recipe, trainer  # bench/train.py

PROMPT = "a large red circle moving right"
BATCHES, PRECISIONS = (1, 16), ("fp32", "bf16")
STEPS, GUIDANCES = (4, 8, 12, 20, 30), (1.0, 2.0, 4.0, 6.0)
STUDENT_STEPS = (1, 2, 4, 8, 16)  # a distilled model's guidance is inside it


def load(model: Path | None, scratch: Path) -> tuple[TextToVideoPipeline, Path, str]:
    """The pipeline, a folder holding it (for the CLI), and a line saying which model it is."""
    if model is None and (DEFAULT_MODEL_DIR / "pipeline.json").is_file():
        model = DEFAULT_MODEL_DIR
    if model is not None:
        pipe = TextToVideoPipeline.from_pretrained(model, device="cpu")
        return pipe, model, f"the folder {model}"
    pipe = trainer("generator", recipe(scratch / "run")).pipeline
    folder = pipe.save_pretrained(scratch / "model")
    return pipe, folder, "a randomly initialised model of the recipe's sizes (no default model)"


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) / 1024


# Every timed call gets prompts it has not seen, so a frozen encoder's cache cannot hide the
# cost of text encoding: distinct captions of the Moving Shapes training stream.
FRESH_PROMPTS = iter(dict.fromkeys(shapes.train_spec(7, i).caption for i in range(20_000)))


class StepClock:
    """Times the pipeline's numbered steps from outside: text encoding (the text encoder's
    forward) and decoding (the autoencoder's decode) are wrapped, sampling is the rest."""

    def __init__(self, pipe: TextToVideoPipeline):
        self.seconds = {"text": 0.0, "decoding": 0.0}
        pipe.text_encoder.forward = self._timed("text", pipe.text_encoder.forward)
        pipe.autoencoder.decode = self._timed("decoding", pipe.autoencoder.decode)

    def _timed(self, part: str, fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start

        return run

    def split(self, fn, *args, **kwargs) -> tuple[float, dict[str, float]]:
        """Wall seconds of ``fn(...)`` and their split into text / sampling / decoding."""
        self.seconds = {"text": 0.0, "decoding": 0.0}
        start = time.perf_counter()
        fn(*args, **kwargs)
        wall = time.perf_counter() - start
        return wall, self.seconds | {"sampling": wall - sum(self.seconds.values())}


def timed(
    pipe: TextToVideoPipeline, batch: int, repeats: int, **options
) -> tuple[float, dict[str, float]]:
    """Median wall seconds of pipe.generate over `batch` clips, and of its split (with "cpu":
    CPU seconds of all threads; well under wall x threads means the machine was busy)."""
    clock = CLOCKS.get(id(pipe)) or CLOCKS.setdefault(id(pipe), StepClock(pipe))
    runs = []
    for _ in range(repeats):
        prompts = [next(FRESH_PROMPTS) for _ in range(batch)]
        cpu = time.process_time()
        wall, parts = clock.split(pipe.generate, prompts, list(range(batch)), **options)
        runs.append((wall, parts | {"cpu": time.process_time() - cpu}))
    parts = {k: statistics.median(t[k] for _, t in runs) for k in runs[0][1]}
    return statistics.median(w for w, _ in runs), parts


CLOCKS: dict[int, StepClock] = {}  # one per pipeline, so its methods are wrapped once


def latency_table(pipe: TextToVideoPipeline, repeats: int) -> None:
    print(
        "| precision | batch | s/batch | CPU s/batch | s/clip | text | sampling | decoding "
        "| peak RSS MiB |\n|---|---|---|---|---|---|---|---|---|"
    )
    for precision in PRECISIONS:
        pipe.precision = precision
        for batch in BATCHES:
            reset_peak_rss()
            timed(pipe, batch, 1)  # warm-up
            wall, parts = timed(pipe, batch, repeats)
            print(
                f"| {precision} | {batch} | {wall:.2f} | {parts['cpu']:.2f} | {wall / batch:.3f} | "
                f"{parts['text']:.3f} | {parts['sampling']:.2f} | {parts['decoding']:.2f} | "
                f"{peak_rss_mib():.0f} |",
                flush=True,
            )
    pipe.precision = "fp32"


def tradeoff_table(pipe: TextToVideoPipeline, repeats: int) -> None:
    if pipe.generator.config.distilled_guidance is not None:
        print("\nSeconds per clip at batch 1, fp32, by sampling steps (guidance inside):\n")
        print("| steps | s/clip |\n|---|---|")
        for steps in (s for s in STUDENT_STEPS if s <= pipe.knobs.steps.hi):
            print(f"| {steps} | {timed(pipe, 1, repeats, steps=steps)[0]:.3f} |", flush=True)
        return
    print(
        "\nSeconds per clip at batch 1, fp32, by sampling steps (rows) and guidance "
        "(columns; 1 skips the unconditional pass):\n"
    )
    print("| steps | " + " | ".join(f"g={g:g}" for g in GUIDANCES) + " |")
    print("|---|" + "---|" * len(GUIDANCES))
    for steps in STEPS:
        cells = [f"{timed(pipe, 1, repeats, steps=steps, guidance=g)[0]:.2f}" for g in GUIDANCES]
        print(f"| {steps} | " + " | ".join(cells) + " |", flush=True)


def cold_cli_seconds(folder: Path, scratch: Path, runs: int = 5) -> float:
    """Median wall time of ``runs`` fresh `t2v generate` processes: imports, loading,
    sampling, encoding. A median, because one run on a busy machine can take twice as long."""
    return statistics.median(_cold_cli_once(folder, scratch) for _ in range(runs))


def _cold_cli_once(folder: Path, scratch: Path) -> float:
    command = [
        sys.executable,
        "-m",
        "t2v.cli",
        "generate",
        PROMPT,
        "--model",
        str(folder),
        "-o",
        str(scratch / "cold.mp4"),
        "--device",
        "cpu",
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model folder (default: see above)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case")
    parser.add_argument("--cold-only", action="store_true", help="only the cold `t2v generate`")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        pipe, folder, which = load(args.model, scratch)
        print(
            f"Machine: {machine()}\nModel: {which}; {pipe.config.steps} steps, guidance "
            f"{pipe.config.guidance:g}, {pipe.config.sampler} sampler by default\n"
        )
        if not args.cold_only:
            latency_table(pipe, args.repeats)
            tradeoff_table(pipe, args.repeats)
        seconds = cold_cli_seconds(folder, scratch)
        print(
            f"\nCold `t2v generate` process (default steps, fp32, writes an MP4), median of 5: "
            f"{seconds:.1f} s; load average {os.getloadavg()[0]:.1f} after"
        )


if __name__ == "__main__":
    main()
