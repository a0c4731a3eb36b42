"""What t2v's diffusers backend adds to the time of a direct diffusers call.

For each tiny random-weight folder of tests/tiny_diffusers.py (Wan, LTX-Video, CogVideoX),
the same pipeline object is called two ways, alternately, with the same prompt, seed, steps
and size: directly (``pipe(..., output_type="np")`` and a conversion to uint8, what one
needs to write a file), and through t2v (`load_model(...).generate`, which adds request
checks, the step callback for progress and cancel, and its uint8 conversion). The table
gives the median and the fastest seconds of each (the fastest is the least disturbed by
other work on a shared machine) and the time t2v adds; the target is at most 5%. It also
checks that both give the same frames, and times t2v's own work around the call alone
(request checks and the per-step callback), which the machine's noise cannot hide.

Run: .venv/bin/python bench/diffusers_overhead.py   (about a minute on 2 idle cores)
On a GPU: ... --device cuda --precision bf16 [--offload model]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from t2v.backends import load_model  # noqa: E402
from t2v.model import GenerationRequest  # noqa: E402
from t2v.runtime import StepCounter  # noqa: E402
from tiny_diffusers import KINDS, build_tiny  # noqa: E402

PROMPT = "a dog running on the beach"
# (frames, height, width) per kind: large enough that a call takes a good fraction of a second.
SIZES = {"wan": (33, 128, 128), "ltx": (33, 128, 128), "cogvideox": (17, 96, 96)}


def direct(model, request: GenerationRequest) -> np.ndarray:
    """The plain diffusers call a user would write, with the same arguments t2v passes."""
    options = {"frame_rate": int(round(request.fps))} if model._frame_rate else {}
    if model._text_length:
        options["max_sequence_length"] = model._text_length
    frames = model.pipe(
        prompt=request.prompt,
        negative_prompt=None,
        height=request.height,
        width=request.width,
        num_frames=request.frames,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        output_type="np",
        **options,
    ).frames[0]  # (T, H, W, 3) float in [0, 1]
    return (frames * 255).round().clip(0, 255).astype(np.uint8)


def through_t2v(model, request: GenerationRequest) -> np.ndarray:
    return model.generate([request], progress=lambda done, total: None)[0].frames


def own_work_seconds(model, request: GenerationRequest, repeats: int = 200) -> float:
    """What t2v does around the pipeline's call, timed alone (free of the noise of the
    call itself): resolving the request and one progress/cancel check per step."""
    start = time.perf_counter()
    for _ in range(repeats):
        resolved = model.resolve(request)
        counter = StepCounter(resolved.steps, lambda done, total: None, lambda: False)
        for _ in range(resolved.steps):
            counter.step()
    return (time.perf_counter() - start) / repeats


def seconds(fn, *args) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed calls of each way")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per call")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device")
    parser.add_argument(
        "--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="weights dtype"
    )
    parser.add_argument(
        "--offload", default="none", choices=("none", "model", "sequential"), help="GPU only"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__} on {args.device} ({args.precision}, offload "
        f"{args.offload}), {args.threads} CPU thread(s), {args.steps} steps, "
        f"{args.repeats} alternating calls of each way after one warm-up each\n"
    )
    print(
        "| model | frames x H x W | direct s (median / min) | t2v s (median / min) "
        "| t2v adds (median / min) | t2v's own work | same frames |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in KINDS:
            folder = build_tiny(kind, Path(tmp) / kind)
            model = load_model(folder, args.device, args.precision, args.offload)
            frames, height, width = SIZES[kind]
            request = model.resolve(
                GenerationRequest(
                    PROMPT, frames=frames, height=height, width=width, steps=args.steps
                )
            )
            same = np.array_equal(direct(model, request), through_t2v(model, request))
            plain, wrapped = [], []
            for _ in range(args.repeats):
                plain.append(seconds(direct, model, request)[0])
                wrapped.append(seconds(through_t2v, model, request)[0])
            a, b = statistics.median(plain), statistics.median(wrapped)
            a_min, b_min = min(plain), min(wrapped)
            own = own_work_seconds(model, request)
            print(
                f"| {model.info.kind} | {frames} x {height} x {width} | {a:.3f} / {a_min:.3f} "
                f"| {b:.3f} / {b_min:.3f} | {100 * (b - a) / a:+.1f}% / "
                f"{100 * (b_min - a_min) / a_min:+.1f}% | {1e3 * own:.2f} ms "
                f"({100 * own / a_min:.2f}%) | {'yes' if same else 'NO'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
