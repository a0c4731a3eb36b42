"""Text-encoder comparison on one budget: the from-scratch Transformer, the GRU and frozen
MiniLM, each training the recipe's generator
(configs/moving-shapes.yaml) for the same steps, batch, schedule and data over the same
trained autoencoder; then `t2v eval` on the same eval clips. Only the text encoder differs.

Runs go two at a time with one thread each (on 2 cores that trains faster in all than one
run on two threads), so the times are per run at one thread.

Run:     .venv/bin/python bench/text_encoders.py   (or `make bench-encoders`)
         (about 45 minutes on 2 idle cores at the defaults; over the bundled model's
         autoencoder unless --autoencoder names another)
Table of finished runs only: .venv/bin/python bench/text_encoders.py --collect
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENCODERS = {  # name -> overrides of the recipe
    "transformer": ["text_encoder.kind=transformer"],
    "gru": ["text_encoder.kind=gru"],
    "minilm": ["text_encoder.kind=pretrained"],
}
GROUPS = ("single_seen", "single_heldout", "two_object", "paraphrase")


def launch(name: str, args: argparse.Namespace) -> subprocess.Popen:
    """Train one encoder's generator and evaluate it; returns the running shell."""
    run = args.out / name
    (run / "autoencoder").mkdir(parents=True, exist_ok=True)
    link = run / "autoencoder" / "final"
    if not link.exists():
        link.symlink_to(args.autoencoder.resolve())
    t2v = str(Path(sys.executable).with_name("t2v"))
    sets = [
        f"stages.generator.steps={args.steps}",
        f"stages.generator.warmup={args.steps // 10}",
        "stages.generator.sample_every=1000000",
        *ENCODERS[name],
    ]
    train = [t2v, "train", "generator", "--config", str(args.config), "--run-dir", str(run)]
    train += ["--no-progress"] + [a for s in sets for a in ("--set", s)]
    evaluate = [t2v, "eval", "--model", str(run / "model"), "--count", str(args.count)]
    evaluate += ["--out", str(run / "eval")]
    script = (
        f"start=$(date +%s); {subprocess.list2cmdline(train)} > {run}/train.log 2>&1 && "
        f'echo "train_seconds $(( $(date +%s) - start ))" > {run}/time.txt && '
        f"{subprocess.list2cmdline(evaluate)} > {run}/eval.txt 2>&1"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(["bash", "-c", script], env=env, cwd=ROOT)


def row(run: Path) -> str | None:
    report, timing = run / "eval" / "report.json", run / "time.txt"
    if not report.is_file() or not timing.is_file():
        return None
    r = json.loads(report.read_text())
    seconds = int(timing.read_text().split()[1])
    params = 0
    te_dir = run / "model" / "text_encoder"
    if (te_dir / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(te_dir / "model.safetensors"), "pt") as f:
            params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    attrs = [f"{100 * r['overall'][a]:.1f}%" for a in ("color", "shape", "size", "direction")]
    groups = [f"{100 * r['groups'][g]['all']:.1f}%" for g in GROUPS]
    fd = f"{r['frechet_distance']:.3f}"
    return " | ".join(
        [run.name, f"{params / 1e6:.2f}M", f"{seconds / 60:.1f}", *attrs, *groups, fd]
    )


def table(out: Path) -> None:
    print(
        "| text encoder | trained text params | train min | colour | shape | size | direction "
        "| all: seen | all: held-out | all: two-object | all: paraphrase | Fréchet |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in ENCODERS:
        line = row(out / name)
        print(f"| {line} |" if line else f"| {name} | (not run) |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "moving-shapes.yaml")
    p.add_argument(
        "--autoencoder",
        type=Path,
        default=ROOT / "src" / "t2v" / "default_model" / "autoencoder",
        help="a trained autoencoder's folder (default: the bundled model's, which is the "
        "recipe's runs/moving-shapes/autoencoder/final)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "text-encoders")
    p.add_argument("--steps", type=int, default=1000, help="generator steps per encoder")
    p.add_argument("--count", type=int, default=120, help="eval clips per encoder")
    p.add_argument("--collect", action="store_true", help="only print the table of done runs")
    args = p.parse_args()
    if not args.collect:
        if args.autoencoder is None or not (args.autoencoder / "model.safetensors").is_file():
            p.error("--autoencoder must name a trained autoencoder's folder")
        names = list(ENCODERS)
        start = time.time()
        for i in range(0, len(names), 2):
            running = [launch(n, args) for n in names[i : i + 2]]
            if any(proc.wait() for proc in running):
                sys.exit(f"a run failed; see the logs under {args.out}")
        print(f"all runs: {(time.time() - start) / 60:.1f} min")
    print(f"Eval: {args.count} clips per encoder (attributes over all groups); runs in {args.out}")
    table(args.out)


if __name__ == "__main__":
    main()
