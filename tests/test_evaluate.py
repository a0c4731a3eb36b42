"""The evaluator: reads labels back from real renders and real MP4s, scores generators."""

import json
import re

import numpy as np
import pytest

from t2v import evaluate as ev
from t2v import reader
from t2v.shapes import COLORS, HELD_OUT_PAIRS, eval_specs, render, train_spec, write_dataset
from t2v.video import read_video

ATTRS = ("color", "shape", "size", "direction")


@pytest.fixture(scope="module")
def rendered():
    """300 rendered eval clips, cycling over the three spec groups."""
    specs = eval_specs(300)
    return specs, render(specs)


@pytest.fixture(scope="module")
def eval_clips(rendered):
    """The first 150: 50 from each group."""
    specs, clips = rendered
    return specs[:150], clips[:150]


def check_reads_back(result: dict, floor: float = 0.98) -> None:
    for name, summary in [("overall", result["overall"]), *result["groups"].items()]:
        for key in (*ATTRS, "all"):
            assert summary[key] >= floor, (name, key, summary)


def test_reader_reads_raw_renders(eval_clips):
    specs, clips = eval_clips
    result = ev.score_clips(clips, [s.labels() for s in specs], [s.group for s in specs])
    assert set(result["groups"]) == {"single_seen", "single_heldout", "two_object"}
    check_reads_back(result)
    assert result["overall"]["temporal_consistency"] >= 0.98
    objects = reader.read_clip(clips[2])  # a two-object clip
    read = {tuple(o[a] for a in ATTRS) for o in objects}
    assert read == {tuple(label[a] for a in ATTRS) for label in specs[2].labels()}


def test_reader_reads_mp4_written_by_the_data_set(tmp_path):
    """The foundation check: labels read back from the eval split's H.264 MP4 files."""
    write_dataset(tmp_path, 150, split="eval", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "index.jsonl").read_text().splitlines()]
    clips = np.stack([read_video(tmp_path / row["file"]) for row in rows])
    groups = [s.group for s in eval_specs(150)]
    result = ev.score_clips(clips, [row["objects"] for row in rows], groups)
    check_reads_back(result)


def test_shuffled_labels_score_near_chance(eval_clips):
    specs, clips = eval_clips
    order = np.random.default_rng(0).permutation(len(specs))
    result = ev.score_clips(clips, [specs[i].labels() for i in order])
    assert result["overall"]["all"] < 0.1
    assert result["overall"]["color"] < 0.4


def blur(clips: np.ndarray) -> np.ndarray:
    """Binomial [1, 4, 6, 4, 1] / 16 blur of every frame (a Gaussian of sigma 1)."""
    out = clips.astype(np.float32)
    for axis in (2, 3):
        for _ in range(2):  # [1, 2, 1] / 4 twice
            pad = np.pad(out, [(1, 1) if a == axis else (0, 0) for a in range(out.ndim)])
            lo, mid, hi = (np.take(pad, range(i, i + out.shape[axis]), axis) for i in range(3))
            out = (lo + 2 * mid + hi) / 4
    return out


def test_reader_tolerates_blur_noise_and_specks(eval_clips):
    """Generated clips are blurrier and noisier than renders."""
    specs, clips = eval_clips[0][:60], eval_clips[1][:60]
    rng = np.random.default_rng(1)
    noisy = blur(clips) + rng.normal(0, 6, clips.shape)
    specks = rng.random(clips.shape[:4]) < 0.002  # isolated bright pixels of random colours
    noisy[specks] = rng.integers(0, 256, (int(specks.sum()), 3))
    noisy = noisy.round().clip(0, 255).astype(np.uint8)
    result = ev.score_clips(noisy, [s.labels() for s in specs], [s.group for s in specs])
    check_reads_back(result, floor=0.95)


def test_blank_clip_reads_as_nothing():
    assert reader.read_clip(np.zeros((16, 64, 64, 3), np.uint8)) == []
    with pytest.raises(ValueError, match="uint8"):
        reader.read_clip(np.zeros((16, 64, 64, 3), np.float32))


def test_eval_set_covers_four_groups_without_overlap():
    clips = ev.eval_set(40, seed=0)
    assert [c.index for c in clips] == list(range(40))
    assert [c.group for c in clips[:4]] == list(ev.GROUPS)
    by_group = {g: [c for c in clips if c.group == g] for g in ev.GROUPS}
    assert all(len(v) == 10 for v in by_group.values())
    seen = {c.spec for c in by_group["single_seen"]}
    assert not seen & {c.spec for c in by_group["paraphrase"]}
    for c in by_group["paraphrase"]:
        (o,) = c.spec.objects
        assert (o.color, o.shape) not in HELD_OUT_PAIRS
        assert c.prompt != c.spec.caption
    assert [c.prompt for c in ev.eval_set(40, seed=0)] == [c.prompt for c in clips]


def _found(table: dict[str, tuple[str, ...]], text: str) -> set[str]:
    return {k for k, phrases in table.items() for p in phrases if re.search(rf"\b{p}\b", text)}


def test_paraphrases_never_occur_in_training_captions():
    captions = [train_spec(0, i).caption for i in range(5000)]
    text = "\n".join(captions)
    vocabulary = set(re.findall(r"[\w-]+", text))
    tables = (ev.PARAPHRASE_SIZES, ev.PARAPHRASE_SHAPES, ev.PARAPHRASE_MOTIONS)
    for table in tables:
        for phrase in (p for phrases in table.values() for p in phrases):
            assert not re.search(rf"\b{re.escape(phrase)}\b", text), phrase
            assert set(re.findall(r"[\w-]+", phrase)) - vocabulary, f"{phrase!r}: no new word"
    # Every paraphrase prompt names all four attributes, each unambiguously.
    for clip in ev.eval_set(400):
        if clip.group != "paraphrase":
            continue
        (label,) = clip.spec.labels()
        colors = {c for c in COLORS if re.search(rf"\b{c}\b", clip.prompt)}
        assert colors == {label["color"]}, clip.prompt
        for table, attr in zip(tables, ("size", "shape", "direction"), strict=True):
            assert _found(table, clip.prompt) == {label[attr]}, (clip.prompt, attr)


def test_frechet_distance_separates_renders_from_garbage(rendered):
    a, b = reader.clip_features(rendered[1][:150]), reader.clip_features(rendered[1][150:])
    blank = reader.clip_features(np.zeros((20, 16, 64, 64, 3), np.uint8))
    noise = np.random.default_rng(0).integers(0, 256, (20, 16, 64, 64, 3), dtype=np.uint8)
    floor = reader.frechet_distance(a, b)
    assert reader.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert floor < 0.5
    assert reader.frechet_distance(a, blank) > 10 * floor
    assert reader.frechet_distance(a, reader.clip_features(noise)) > 10 * floor


class RenderingGenerator:
    """A fake pipeline that draws the true clip of each eval prompt (clip i has seed i)."""

    def __init__(self, count: int):
        self.specs = [c.spec for c in ev.eval_set(count)]
        self.calls = []

    def generate(self, prompts, seeds, *, steps=None, guidance=None):
        self.calls.append((len(prompts), steps, guidance))
        return render([self.specs[s] for s in seeds])


def test_evaluate_with_a_perfect_generator_writes_a_consistent_report(tmp_path):
    gen = RenderingGenerator(24)
    report = ev.evaluate(
        gen, count=24, batch_size=10, steps=3, guidance=2.0, out_dir=tmp_path, progress=False
    )
    assert gen.calls == [(10, 3, 2.0), (10, 3, 2.0), (4, 3, 2.0)]
    assert report["overall"]["all"] >= 0.98
    assert set(report["groups"]) == set(ev.GROUPS)
    assert sum(g["clips"] for g in report["groups"].values()) == 24
    assert report["overall"]["all"] == np.mean([c["correct"] for c in report["clips"]])
    assert report["frechet_distance"] < 1e-6  # the same clips as the reference
    assert report["frechet_floor"] > 0
    assert report["autoencoder_ceiling"] is None  # a bare generator has no autoencoder
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["overall"] == report["overall"]
    markdown = (tmp_path / "report.md").read_text()
    for group in ev.GROUPS:
        assert f"| {group} |" in markdown
    gifs = re.findall(r"\]\((clips/\d+(?:_rendered)?\.gif)\)", markdown)
    assert len(gifs) == 2 * 2 * len(ev.GROUPS)
    assert all(read_video(tmp_path / g).shape == (16, 64, 64, 3) for g in gifs)


class WithAutoencoder(RenderingGenerator):
    """A fake pipeline whose autoencoder round trip either keeps clips or blanks them."""

    def __init__(self, count: int, keeps: bool):
        super().__init__(count)
        self.keeps = keeps

    def reconstruct(self, clips):
        return clips.copy() if self.keeps else np.zeros_like(clips)


@pytest.mark.parametrize("keeps", [True, False])
def test_autoencoder_ceiling_scores_the_round_trip_of_the_truth(keeps):
    report = ev.evaluate(WithAutoencoder(16, keeps), count=16, batch_size=8, progress=False)
    ceiling = report["autoencoder_ceiling"]
    assert set(ceiling) == {"overall", *ev.GROUPS}
    assert all(v == (1.0 if keeps else 0.0) for v in ceiling.values())
    assert report["overall"]["all"] == 1.0  # the generated clips are scored as before
    table = ev.format_table(report)
    assert "autoencoder_ceiling |" in table
    assert "| overall | 16 |" in table and table.splitlines()[-3].endswith(
        "| 100.0% |" if keeps else "| 0.0% |"
    )


def test_evaluate_with_a_black_generator_scores_zero():
    def black(prompts, seeds, *, steps=None, guidance=None):
        return np.zeros((len(prompts), 16, 64, 64, 3), np.uint8)

    report = ev.evaluate(black, count=40, progress=False)
    for key in (*ATTRS, "all", "count_right"):
        assert report["overall"][key] == 0
    assert report["overall"]["temporal_consistency"] is None
    assert report["frechet_distance"] > 10 * report["frechet_floor"]


def test_eval_cli_scores_a_saved_model(tiny_model_dir, tmp_path, capsys):
    """The real pipeline (tiny, random weights) end to end: it draws no readable shapes."""
    report = ev.eval_cli(str(tiny_model_dir), 8, str(tmp_path), 2, None, 0, 4, "cpu")
    assert report["steps"] == 2 and report["count"] == 8
    assert report["overall"]["all"] == 0
    assert 0 <= report["autoencoder_ceiling"]["overall"] <= 1  # the real round trip ran
    assert (tmp_path / "report.json").is_file() and (tmp_path / "clips" / "0000.gif").is_file()
    out = capsys.readouterr().out
    assert "| overall | 8 |" in out and str(tmp_path / "report.md") in out


@pytest.mark.usefixtures("one_thread")
def test_eval_cli_scores_a_diffusers_model_and_says_what_the_scores_mean(
    tiny_diffusers, tmp_path, capsys
):
    """Any model load_model takes: a tiny CogVideoX makes 17 frames of 64 px, which the
    evaluation samples down to the reader's 16."""
    report = ev.eval_cli(str(tiny_diffusers["cogvideox"]), 4, str(tmp_path), 1, None, 0, 4, "cpu")
    assert report["model"]["kind"] == "CogVideoXPipeline" and report["count"] == 4
    assert report["autoencoder_ceiling"] is None
    assert "mean something only for a model tuned on Moving Shapes" in report["note"]
    out = capsys.readouterr().out
    assert "only for a model tuned on Moving Shapes" in out
    assert "only for a model tuned on Moving Shapes" in (tmp_path / "report.md").read_text()


def test_a_models_clips_are_brought_to_the_readers_format():
    t, h, w = np.meshgrid(np.arange(17), np.arange(96), np.arange(128), indexing="ij")
    frames = np.stack([t, h, w], axis=-1).astype(np.uint8)  # each pixel holds its position
    clip = ev._resample(frames)
    assert clip.shape == (16, 64, 64, 3)
    assert clip[0, 0, 0].tolist() == [0, 0, 1] and clip[-1, -1, -1].tolist() == [16, 95, 127]
    assert (np.diff(clip[..., 0].astype(int), axis=0) >= 1).all()  # frames kept in order
