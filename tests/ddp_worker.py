"""Run by test_train.py under `torchrun`: trains the generator stage of a recipe, then writes
this rank's parameter checksums and the clips it was fed to OUT/rank<r>.json.

Only this test helper writes per-rank files; the trainer itself writes from rank 0 alone.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch.distributed as dist

from t2v import config as cfg
from t2v.train import TrainConfig, Trainer


def checksum(tensors) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(tensors.items()):
        digest.update(name.encode() + value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(recipe: str, out: str) -> None:
    trainer = Trainer(cfg.load(TrainConfig, recipe), "generator", progress=False)
    initial = checksum(trainer.model.state_dict())
    seen: list[list[str]] = []  # per step: a hash of each clip this rank trained on
    read = trainer.source.batch

    def recording(step, batch_size, rank=0, world_size=1):
        clips, captions = read(step, batch_size, rank, world_size)
        seen.append([hashlib.sha256(c.tobytes()).hexdigest() for c in clips])
        return clips, captions

    trainer.source.batch = recording
    trainer.run()
    report = {
        "world": trainer.dist.world,
        "initial": initial,
        "seen": seen,
        "params": checksum(trainer.model.state_dict()),
        "ema": checksum(trainer.ema),
    }
    Path(out, f"rank{trainer.dist.rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
