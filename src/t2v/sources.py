"""The clip sources the trainer reads: prepared shards, or the endless Moving Shapes stream.

A source gives training batches as a pure function of (step, rank), held-out clips with
their captions (for sample GIFs, PSNR and sample prompts), training captions (for the
tokenizer), and says whether its clips are objects on black and whether it knows where its
objects are. The trainer asks the source, never the data set.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Protocol

import numpy as np

from t2v.data import DataError, index_shard, load_manifest, verify

EVAL_CLIPS = 240  # size of the fixed Moving Shapes evaluation list ("shapes:eval")


class ClipSource(Protocol):
    """What the trainer reads: everything it shows or measures comes from its source."""

    # Clips are objects on black: the autoencoder's loss weights the non-black pixels more.
    black_background: bool
    # boxes() gives where each object of a batch is (for the attention loss).
    has_boxes: bool

    def batch(
        self, step: int, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> tuple[np.ndarray, list[str]]:
        """uint8 (B, T, H, W, 3) clips and their captions; a pure function of its arguments
        (so resuming at a step reproduces the data exactly), and different ranks get
        different samples."""
        ...

    def held_out(self, count: int) -> tuple[np.ndarray, list[str]]:
        """Up to ``count`` clips never trained on, and their captions: for sample GIFs, PSNR
        and sample prompts."""
        ...

    def captions(self, count: int) -> list[str]:
        """Up to ``count`` training captions, for fitting the tokenizer."""
        ...


def _first_index(step: int, batch_size: int, rank: int, world_size: int) -> int:
    """Global index of the first sample of (step, rank): ranks take consecutive slices."""
    if step < 0 or batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"Need step >= 0, batch_size >= 1 and 0 <= rank < world_size, not "
            f"{step}, {batch_size}, {rank}, {world_size}."
        )
    return step * batch_size * world_size + rank * batch_size


class ShapesSource:
    """The Moving Shapes stream: endless seeded training clips, or the fixed eval list cycled.
    Its held-out clips are the start of the eval list, which the training stream never
    draws from (no held-out colour-shape pair, other seeds)."""

    black_background = True
    has_boxes = True

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        two_object_share: float | None = None,
        device="cpu",
    ):
        # Imported here so decoding workers, which import this module, skip torch.
        from t2v import shapes

        if split not in ("train", "eval"):
            raise ValueError(f"Unknown Moving Shapes split {split!r}; use 'train' or 'eval'.")
        if two_object_share is None:
            two_object_share = shapes.TWO_OBJECT_SHARE
        if not 0.0 <= two_object_share <= 1.0:
            raise ValueError(f"two_object_share must be in [0, 1], not {two_object_share}")
        self._shapes, self.split, self.seed = shapes, split, seed
        self.two_object_share = two_object_share
        self._eval = shapes.eval_specs(EVAL_CLIPS, seed) if split == "eval" else None
        # Clips are drawn where the model trains: on a GPU, rendering is a few kernels
        # instead of tens of milliseconds of CPU time per batch.
        self.device = device
        self._drawn: tuple[tuple, list] = ((), [])  # the last (step, ...) and its specs

    def _specs(self, step: int, batch_size: int, rank: int, world_size: int) -> list:
        """The clip specs of (step, rank), drawn once for batch() and boxes() alike."""
        key = (step, batch_size, rank, world_size)
        if self._drawn[0] != key:
            start = _first_index(step, batch_size, rank, world_size)
            if self._eval is None:
                specs = [
                    self._shapes.train_spec(self.seed, start + i, self.two_object_share)
                    for i in range(batch_size)
                ]
            else:
                specs = [self._eval[(start + i) % len(self._eval)] for i in range(batch_size)]
            self._drawn = (key, specs)
        return self._drawn[1]

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1):
        specs = self._specs(step, batch_size, rank, world_size)
        return self._shapes.render(specs, self.device), [s.caption for s in specs]

    def boxes(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1):
        """Where each object of batch(...)'s clips is: see shapes.object_boxes."""
        return self._shapes.object_boxes(self._specs(step, batch_size, rank, world_size))

    def held_out(self, count: int) -> tuple[np.ndarray, list[str]]:
        specs = self._shapes.eval_specs(count)
        return self._shapes.render(specs, self.device), [s.caption for s in specs]

    def captions(self, count: int) -> list[str]:
        return self._shapes.caption_corpus(self.seed, count)


class ShardSource:
    """Prepared shards, read at random by (step, rank): training sample ``g`` is entry
    ``g % N`` of a permutation of the N training samples seeded by (seed, epoch ``g // N``).
    A share ``held_out`` of the samples (at least one when above 0), picked by a fixed seed,
    is never trained on: it gives the held-out clips."""

    black_background = False
    has_boxes = False

    def __init__(self, shards_dir, rehash: bool = True, seed: int = 0, held_out: float = 0.0):
        self.dir, self.seed = Path(shards_dir), seed
        self.manifest = verify(self.dir) if rehash else load_manifest(self.dir)
        self._paths = [self.dir / s["name"] for s in self.manifest["shards"]]
        rows = [(i, *entry) for i, p in enumerate(self._paths) for entry in index_shard(p)]
        if not rows:
            raise DataError(f"{self.dir} holds no samples; prepare some videos first.")
        index = np.array(rows, dtype=np.int64)  # (N, 5): shard, npy off/size, txt off/size
        keep = max(1, round(held_out * len(index))) if held_out > 0 else 0
        if keep >= len(index):
            raise DataError(
                f"{self.dir} holds {len(index)} clips, too few to keep {keep} of them out of "
                "training; prepare more videos or lower data.held_out."
            )
        order = np.random.default_rng(0x4E1D).permutation(len(index))
        self._held, self._index = index[np.sort(order[:keep])], index[np.sort(order[keep:])]
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._index)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch seldom spans more than two epochs
                self._perms.pop(next(iter(self._perms)))
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(len(self._index))
        return self._perms[epoch]

    def _read(self, row: np.ndarray, clip: bool = True) -> tuple[np.ndarray | None, str]:
        shard, npy_at, npy_size, txt_at, txt_size = (int(v) for v in row)
        with open(self._paths[shard], "rb") as f:
            array = None
            if clip:
                f.seek(npy_at)
                array = np.load(io.BytesIO(f.read(npy_size)), allow_pickle=False)
            f.seek(txt_at)
            return array, f.read(txt_size).decode("utf-8")

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1):
        start = _first_index(step, batch_size, rank, world_size)
        n = len(self._index)
        samples = [
            self._read(self._index[self._permutation(g // n)[g % n]])
            for g in range(start, start + batch_size)
        ]
        return np.stack([clip for clip, _ in samples]), [caption for _, caption in samples]

    def held_out(self, count: int) -> tuple[np.ndarray, list[str]]:
        if not len(self._held):
            raise DataError(f"No clips of {self.dir} are held out; set data.held_out above 0.")
        samples = [self._read(row) for row in self._held[:count]]
        return np.stack([clip for clip, _ in samples]), [caption for _, caption in samples]

    def captions(self, count: int) -> list[str]:
        n = len(self._index)
        return [self._read(self._index[i % n], clip=False)[1] for i in range(count)]


def is_moving_shapes(spec: str) -> bool:
    """Whether a data.source names the Moving Shapes stream rather than a shard folder."""
    return spec in ("shapes", "shapes:train", "shapes:eval")


def model_vocabulary(spec: str) -> dict | None:
    """The ``vocabulary.json`` a model trained on ``spec`` carries for the prompt rewriter
    (`t2v.rewrite`): Moving Shapes' caption grammar; None for shards, whose captions are free
    text with no grammar to map onto."""
    if not is_moving_shapes(str(spec)):
        return None
    from t2v import shapes  # imported lazily, as ShapesSource does

    return shapes.caption_vocabulary()


def save_vocabulary(model_dir: str | Path, spec: str) -> None:
    """Write `model_vocabulary` into a model folder, when the source has one."""
    vocabulary = model_vocabulary(spec)
    if vocabulary is not None:
        from t2v.rewrite import Rewriter

        Rewriter(vocabulary).save(model_dir)


def open_source(
    spec: str,
    seed: int = 0,
    two_object_share: float | None = None,
    device="cpu",
    held_out: float = 0.0,
) -> ClipSource:
    """Moving Shapes for "shapes", "shapes:train" or "shapes:eval", else the shards in the
    folder ``spec`` (write ./shapes for a folder of that name). ``two_object_share`` is the
    share of two-object clips in the Moving Shapes training stream (None: the stream's own),
    ``device`` (a torch device) where its clips are rendered, and ``held_out`` the share of
    shard clips kept out of training."""
    spec = str(spec)
    if is_moving_shapes(spec):
        return ShapesSource(spec.partition(":")[2] or "train", seed, two_object_share, device)
    if not Path(spec).is_dir():
        raise DataError(
            f"{spec!r} is neither 'shapes', 'shapes:train', 'shapes:eval' nor a folder of "
            "prepared shards."
        )
    return ShardSource(spec, seed=seed, held_out=held_out)
