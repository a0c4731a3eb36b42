"""Do a frozen text encoder's token states bind each object's attributes to it?

Probes trained on two-object Moving Shapes captions: given the states of a caption and one
object's colour, predict that object's shape, size and motion. Three probes, from weakest to
strongest: the pooled (mean) vector, one cross-attention layer over the token states (what
one generator layer can do), and one trainable self-attention layer before it (an adapter).
High scores mean the text holds the binding, so a generator that mixes attributes up between
two objects has not learnt to read it. Prints a Markdown table.

    python experiments/text_binding.py [--captions 12000] [--steps 1500] [--pretrained-path DIR]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.nn import functional as F

from t2v.models.layers import Attention
from t2v.models.text_encoders import PretrainedTextEncoder, TextEncoderConfig
from t2v.shapes import COLORS, DIRECTIONS, SHAPES, SIZES, train_spec

TARGETS = {"shape": list(SHAPES), "size": list(SIZES), "direction": list(DIRECTIONS)}


def encode(captions: list[str], pretrained_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L, D) token states and (N, L) masks, padded to the longest caption."""
    encoder = PretrainedTextEncoder(
        TextEncoderConfig(kind="pretrained", pretrained_path=pretrained_path, split_objects=False)
    )
    parts = [encoder(captions[i : i + 256]) for i in range(0, len(captions), 256)]
    width = max(p.tokens.shape[1] for p in parts)
    states = torch.cat([F.pad(p.tokens, (0, 0, 0, width - p.tokens.shape[1])) for p in parts])
    masks = torch.cat([F.pad(p.mask, (0, width - p.mask.shape[1])) for p in parts])
    return states, masks


class Probe(nn.Module):
    """colour query + caption states -> logits per target; `kind` sets how it reads them."""

    def __init__(self, kind: str, dim: int, width: int = 128):
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(dim, width)
        self.query = nn.Embedding(len(COLORS), width)
        if kind == "adapter":
            self.ln = nn.LayerNorm(width)
            self.adapter = Attention(width, 4)
        self.read = Attention(width, 1)
        self.heads = nn.ModuleList(nn.Linear(2 * width, len(v)) for v in TARGETS.values())

    def forward(self, states, mask, color):
        x, q = self.proj(states), self.query(color)
        if self.kind == "adapter":
            x = x + self.adapter(self.ln(x), mask=mask)
        if self.kind == "pooled":
            m = mask[..., None].to(x.dtype)
            read = (x * m).sum(1) / m.sum(1)
        else:
            read = self.read(q[:, None], x, mask)[:, 0]
        return [head(torch.cat([read, q], -1)) for head in self.heads]


def run(kind, states, masks, rows, labels, train, steps) -> dict[str, float]:
    torch.manual_seed(0)
    probe = Probe(kind, states.shape[-1])
    opt = torch.optim.AdamW(probe.parameters(), 2e-3)
    fit, test = train.nonzero().squeeze(1), (~train).nonzero().squeeze(1)
    for _ in range(steps):
        b = fit[torch.randint(len(fit), (256,))]
        out = probe(states[rows[b]], masks[rows[b]], labels[b, 0])
        loss = sum(F.cross_entropy(o, labels[b, j + 1]) for j, o in enumerate(out))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = probe(states[rows[test]], masks[rows[test]], labels[test, 0])
        hits = torch.stack([o.argmax(-1) == labels[test, j + 1] for j, o in enumerate(out)])
    return {
        **{k: hits[j].float().mean().item() for j, k in enumerate(TARGETS)},
        "all": hits.all(0).float().mean().item(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--captions", type=int, default=12000, help="training captions (default: 12000)")
    p.add_argument("--test", type=int, default=2000, help="held-back captions (default: 2000)")
    p.add_argument("--steps", type=int, default=1500, help="probe training steps (default: 1500)")
    p.add_argument("--pretrained-path", default="", help="HF folder (default: bundled MiniLM)")
    a = p.parse_args()
    specs = [train_spec(0, i, two_object_share=1.0) for i in range(a.captions + a.test)]
    t0 = time.perf_counter()
    states, masks = encode([s.caption for s in specs], a.pretrained_path)
    print(f"encoded {len(specs)} captions in {time.perf_counter() - t0:.0f} s")
    colors = list(COLORS)
    rows = torch.tensor([i for i in range(len(specs)) for _ in range(2)])
    labels = torch.tensor(
        [
            [colors.index(o.color), *(v.index(getattr(o, k)) for k, v in TARGETS.items())]
            for s in specs
            for o in s.objects
        ]
    )
    train = rows < a.captions
    print("\n| probe | shape | size | direction | all | seconds |\n|---|---|---|---|---|---|")
    for kind, name in (
        ("pooled", "pooled vector"),
        ("cross", "one cross-attention layer"),
        ("adapter", "self-attention adapter + cross-attention"),
    ):
        t0 = time.perf_counter()
        r = run(kind, states, masks, rows, labels, train, a.steps)
        cells = " | ".join(f"{100 * r[k]:.1f}%" for k in (*TARGETS, "all"))
        print(f"| {name} | {cells} | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
