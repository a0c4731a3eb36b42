"""The `t2v` command: data, train, export, generate, eval, serve, keys.

Heavy imports (torch, av) happen inside the handlers so that `t2v --help` is instant.
Knob names match the Python API and the web API: prompt, negative_prompt, seed, steps,
guidance, frames, width, height, fps, format; their defaults and limits are the model's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from t2v.errors import UserError
from t2v.runtime import add_run_options  # no torch: --help stays instant

FORMAT_CHOICES = ("mp4", "webm", "gif", "png")


# What --model takes besides a folder (t2v.pipeline_config.BUNDLED).
BUNDLED_HELP = (
    "a bundled model's id: t2v-moving-shapes (the default, 4 steps) or "
    "t2v-moving-shapes-teacher (the 20-step model it was distilled from)"
)
KNOB = "{knob}"  # in a help text: the option's default and limits in the bundled model


def _knob_help(name: str) -> str:
    """What --help says of a knob: the bundled model's default and limits, from its Knobs."""
    from t2v.backends import read_knobs
    from t2v.model import IntRange

    r = getattr(read_knobs(None), name)
    if isinstance(r, IntRange) and r.fixed:
        return f"default: the model's; the bundled model takes only {r.default}"
    rule = f", of the form {r.multiple}k+{r.offset}" if getattr(r, "multiple", 1) > 1 else ""
    return (
        f"default: the model's; the bundled model's is {r.default:g}, "
        f"from {r.lo:g} to {r.hi:g}{rule}"
    )


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Adds "(default: X)" to an option's help, unless the help already names its default or
    the default is only "not given" (None, False, an empty list); fills in KNOB."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if KNOB in text:
            text = text.replace(KNOB, _knob_help(action.dest))
        unset = default is None or default is False or default == [] or default == "==SUPPRESS=="
        if "default" in text or unset:
            return text
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text
        return text + " (default: %(default)s)"


def _parser(sub, name: str, help: str, description: str | None = None):
    return sub.add_parser(
        name, help=help, description=description or help, formatter_class=_Formatter
    )


# --- data ----------------------------------------------------------------------------------


def _add_data(sub) -> None:
    data = _parser(sub, "data", "Make, prepare and verify training data.")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    p = _parser(
        dsub, "shapes", "Render Moving Shapes clips to DIR/0000.mp4, ... and DIR/index.jsonl."
    )
    p.add_argument("--count", type=int, required=True, help="number of clips")
    p.add_argument(
        "--split",
        choices=("train", "eval"),
        default="train",
        help="train: the endless stream without held-out pairs; eval: the fixed list",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    p.add_argument(
        "--out", type=Path, required=True, help="output folder: new, empty, or one t2v wrote"
    )
    p.set_defaults(func=_data_shapes)

    p = _parser(dsub, "prepare", "Decode, sample, resize and crop videos into verified shards.")
    p.add_argument(
        "--videos",
        type=Path,
        help="folder of videos (with sidecar .txt captions unless --captions is given)",
    )
    p.add_argument(
        "--captions",
        type=Path,
        help="CSV or JSONL file of video path and caption "
        "columns (WebVid-style videoid,name works)",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="output folder for the shards and manifest.json"
    )
    p.add_argument("--frames", type=int, help="frames per clip (default: the bundled model's)")
    p.add_argument(
        "--size", type=int, help="clip height and width in pixels (default: the bundled model's)"
    )
    p.add_argument(
        "--fps", type=float, help="frames per second to sample at (default: the bundled model's)"
    )
    p.add_argument(
        "--clip-stride",
        type=float,
        metavar="SECONDS",
        help="seconds from one clip's start to the next in a video (default: a clip's length)",
    )
    p.add_argument(
        "--max-clips-per-video",
        type=int,
        metavar="N",
        help="most clips cut from one video, spread evenly over it",
    )
    p.add_argument(
        "--scene-cuts",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="find the cuts between shots (PySceneDetect) so that no clip spans one",
    )
    p.add_argument("--path-column", help="column holding the video path (default: detected)")
    p.add_argument("--caption-column", help="column holding the caption (default: detected)")
    p.add_argument("--shard-max-mb", type=float, default=256.0, help="largest shard size")
    p.add_argument(
        "--max-failure-fraction",
        type=float,
        default=0.1,
        help="stop with an error when more than this share of inputs fails",
    )
    p.add_argument("--workers", type=int, default=2, help="decoding processes")
    p.set_defaults(func=_data_prepare)

    p = _parser(dsub, "verify", "Re-hash every shard and check the sample counts.")
    p.add_argument("shards", type=Path, help="shard folder written by `t2v data prepare`")
    p.set_defaults(func=_data_verify)


def _data_shapes(a) -> None:
    from t2v.shapes import write_dataset

    if a.count < 1:
        raise UserError("--count must be at least 1.")
    print(write_dataset(a.out, a.count, a.split, a.seed))


def _data_prepare(a) -> None:
    from t2v.data import prepare

    if a.videos is None and a.captions is None:
        raise UserError("Give --videos DIR, --captions FILE, or both.")
    settings = {
        "frames": a.frames,
        "size": a.size,
        "fps": a.fps,
        "clip_stride": a.clip_stride,
        "max_clips_per_video": a.max_clips_per_video,
        "scene_cuts": a.scene_cuts,
        "path_column": a.path_column,
        "caption_column": a.caption_column,
        "shard_max_mb": a.shard_max_mb,
        "max_failure_fraction": a.max_failure_fraction,
    }
    # Options left out take PrepareConfig's defaults, their one home.
    settings = {k: v for k, v in settings.items() if v is not None}
    manifest = prepare(a.videos, a.out, a.captions, workers=a.workers, **settings)
    print(
        f"{manifest['samples']} clips in {len(manifest['shards'])} shards, "
        f"{len(manifest['skipped'])} inputs skipped: {a.out / 'manifest.json'}"
    )


def _data_verify(a) -> None:
    from t2v.data import verify

    result = verify(a.shards)
    print(f"ok: {result['samples']} clips in {len(result['shards'])} shards")


# --- train ---------------------------------------------------------------------------------


def _add_train(sub) -> None:
    p = _parser(
        sub,
        "train",
        "Train the autoencoder, the generator or the distill stage.",
        "Train one stage of a model. Run `autoencoder` first, then `generator`; the "
        "generator stage also trains the text encoder (a frozen pretrained one stays as it "
        "is) and writes the model folder RUN_DIR/model. `distill` then trains a few-step "
        "student of that model (or of --init-from) with its guidance inside, and writes "
        "RUN_DIR/student. Works unchanged under `torchrun`.",
    )
    p.add_argument("stage", choices=("autoencoder", "generator", "distill"), help="what to train")
    p.add_argument(
        "--config",
        type=Path,
        help="YAML or TOML recipe (see configs/); without it, built-in defaults",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. stages.generator.lr=3e-4 (repeatable)",
    )
    p.add_argument("--precision", choices=("fp32", "bf16"), help="overrides the config")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="overrides the config")
    p.add_argument("--run-dir", help="overrides the config's run_dir")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in the run directory",
    )
    p.add_argument(
        "--init-from",
        metavar="MODEL_DIR",
        help="start from a trained model folder (transfer learning; for distill, the teacher)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_train)


def _train(a) -> None:
    from t2v import config as cfg
    from t2v.train import TrainConfig, train

    overrides = list(a.overrides)
    for key in ("precision", "device", "run_dir"):
        if getattr(a, key) is not None:
            overrides.append(f"{key}={getattr(a, key)}")
    config = cfg.load(TrainConfig, a.config, overrides)
    print(
        train(a.stage, config, resume=a.resume, init_from=a.init_from, progress=not a.no_progress)
    )


def _add_export(sub) -> None:
    p = _parser(
        sub,
        "export",
        "Write a generator or distill checkpoint as a model folder.",
        "Write the EMA weights of a generator (or, with --stage distill, a student) "
        "checkpoint in RUN_DIR as a model folder, like the one that the stage writes at its "
        "end; then `t2v eval --model` or `t2v generate --model` can use any checkpoint the "
        "run kept.",
    )
    p.add_argument(
        "run_dir", metavar="RUN_DIR", type=Path, help="the run directory given to `t2v train`"
    )
    p.add_argument(
        "--step", type=int, default=None, help="the checkpoint's step (default: the latest)"
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="the model folder to write")
    p.add_argument(
        "--stage",
        choices=("generator", "distill"),
        default="generator",
        help="whose checkpoint: the generator's, or the distilled student's",
    )
    p.set_defaults(func=_export)


def _export(a) -> None:
    from t2v.train import export_checkpoint

    print(export_checkpoint(a.run_dir, a.output, a.step, a.stage))


# --- generate ------------------------------------------------------------------------------


def _add_generate(sub) -> None:

    p = _parser(sub, "generate", "Generate a video from a prompt (or a file of prompts).")
    p.add_argument("prompt", nargs="?", help="what the video should show")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        help="output file, or folder for png (default out/<slug>.<format>); its extension sets"
        " the format unless --format is given. An existing video file is replaced, like"
        " ffmpeg -y; anything else that exists is kept and refused, except a folder t2v wrote",
    )
    p.add_argument("--prompts-file", type=Path, help="batch mode: one prompt per line")
    p.add_argument(
        "--out-dir",
        type=Path,
        help="batch mode: writes DIR/0000.mp4, ... and DIR/index.jsonl; DIR must be new, empty"
        " or an earlier batch folder (which is replaced whole)",
    )
    p.add_argument("--negative-prompt", default=None, help="what the video should not show")
    p.add_argument(
        "--seed", type=int, default=0, help="random seed (batch mode: line i uses seed + i)"
    )
    # The knobs' defaults and limits are the model's (t2v.model.Knobs); KNOB in a help text
    # becomes the bundled model's, read from its JSON files only when help is shown.
    p.add_argument("--steps", type=int, default=None, help=f"sampling steps ({KNOB})")
    p.add_argument(
        "--guidance", type=float, default=None, help=f"classifier-free guidance scale ({KNOB})"
    )
    p.add_argument("--frames", type=int, default=None, help=f"frames per clip ({KNOB})")
    p.add_argument("--width", type=int, default=None, help=f"frame width in pixels ({KNOB})")
    p.add_argument("--height", type=int, default=None, help=f"frame height in pixels ({KNOB})")
    p.add_argument(
        "--fps", type=float, default=None, help=f"frames per second of the video ({KNOB})"
    )
    p.add_argument(
        "--format",
        choices=FORMAT_CHOICES,
        default=None,
        help="mp4, webm, gif, or png (a folder of frames); default from -o, else mp4",
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a t2v model folder, a diffusers text-to-video folder (one with"
        f" model_index.json), or {BUNDLED_HELP}",
    )
    add_run_options(p)
    p.add_argument("--batch-size", type=int, default=16, help="batch mode: clips per batch")
    p.set_defaults(func=_generate)


def _generate(a) -> None:
    from t2v.generate import generate_batch, generate_one
    from t2v.model import GenerationRequest

    if (a.prompt is None) == (a.prompts_file is None):
        raise UserError("Give either a PROMPT or --prompts-file FILE (with --out-dir).")
    request = GenerationRequest(
        prompt=a.prompt or "",
        negative_prompt=a.negative_prompt,
        seed=a.seed,
        steps=a.steps,
        guidance=a.guidance,
        frames=a.frames,
        width=a.width,
        height=a.height,
        fps=a.fps,
    )
    options = dict(
        format=a.format, model=a.model, device=a.device, precision=a.precision, offload=a.offload
    )
    if a.prompts_file is not None:
        if a.out_dir is None:
            raise UserError("--prompts-file needs --out-dir DIR.")
        print(
            generate_batch(a.prompts_file, a.out_dir, request, batch_size=a.batch_size, **options)
        )
    else:
        print(generate_one(request, a.output, **options))


# --- eval ----------------------------------------------------------------------------------


def _add_eval(sub) -> None:
    p = _parser(sub, "eval", "Score a model on the Moving Shapes evaluation split.")
    p.add_argument("--model", default=None, help=f"a model folder, or {BUNDLED_HELP}")
    p.add_argument("--count", type=int, default=240, help="evaluation prompts in all")
    p.add_argument(
        "--out",
        default="out/eval",
        help="folder for report.json and report.md: new, empty, or an earlier report",
    )
    p.add_argument("--steps", type=int, default=None, help=f"sampling steps ({KNOB})")
    p.add_argument(
        "--guidance", type=float, default=None, help=f"classifier-free guidance scale ({KNOB})"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation split")
    p.add_argument("--batch-size", type=int, default=16, help="clips generated per batch")
    add_run_options(p)
    p.set_defaults(func=_eval)


def _eval(a) -> None:
    from t2v.evaluate import eval_cli

    if a.batch_size < 1:
        raise UserError("--batch-size must be at least 1.")
    eval_cli(
        model=a.model,
        count=a.count,
        out=a.out,
        steps=a.steps,
        guidance=a.guidance,
        seed=a.seed,
        batch_size=a.batch_size,
        device=a.device,
        precision=a.precision,
        offload=a.offload,
    )


# --- main ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from t2v import __version__

    parser = argparse.ArgumentParser(
        prog="t2v",
        formatter_class=_Formatter,
        description="Text-to-video you can train on a laptop CPU and host yourself.",
    )
    parser.add_argument("--version", action="version", version=f"t2v {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_data(sub)
    _add_train(sub)
    _add_export(sub)
    _add_generate(sub)
    _add_eval(sub)
    from t2v.serve.cli import register_cli

    register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("t2v: interrupted", file=sys.stderr)
        return 130
    except UserError as e:  # one sentence for the person; any other exception is a bug
        print(f"t2v: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
