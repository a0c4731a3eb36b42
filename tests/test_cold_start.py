"""A cold `t2v generate` stays fast: the generate path imports only what it runs, and the
frozen MiniLM loads without transformers, giving transformers' own outputs bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from t2v.model import ModelError

# Each costs from a tenth of a second to seconds at import, and generating needs none of them.
HEAVY = (
    "transformers",
    "diffusers",
    "fastapi",
    "starlette",
    "tensorboard",
    "scenedetect",
    "scipy",
    "sympy",
    "torch._dynamo",
    "torch.distributed.tensor",
    "t2v.train",
    "t2v.data",
    "t2v.shapes",
    "t2v.serve.app",
)

# What `t2v generate` imports and does before sampling: the handler's modules, then the
# bundled model (MiniLM included) loaded and one prompt encoded.
GENERATE_PATH = """
import json, sys
from t2v.cli import build_parser
from t2v.generate import generate_batch, generate_one
from t2v.model import GenerationRequest
from t2v.backends import load_model
model = load_model(None, device="cpu")
model.text_encoder(["a red circle moving left"])
print(json.dumps(sorted(sys.modules)))
"""


def test_the_generate_path_imports_nothing_heavy():
    out = subprocess.run(
        [sys.executable, "-c", GENERATE_PATH], check=True, capture_output=True, text=True
    )
    modules = set(json.loads(out.stdout.splitlines()[-1]))
    assert "t2v.pipeline" in modules and "torch" in modules  # it did load the model
    loaded = sorted(m for m in HEAVY if m in modules)
    assert not loaded, f"the generate path imports {loaded}"


@pytest.fixture(scope="module")
def both():
    """The shipped MiniLM loaded the fast way and through transformers."""
    pytest.importorskip("transformers")
    from t2v.models.text_encoders import _load_plain_bert, _load_with_transformers, minilm_path

    path = minilm_path()
    config = json.loads((path / "config.json").read_text("utf-8"))
    fast, fast_tokenize = _load_plain_bert(path, config, 48)
    hf, hf_tokenize = _load_with_transformers(path, 48)
    return fast.eval(), fast_tokenize, hf.eval(), hf_tokenize


TEXTS = [
    "a red circle moving left",
    "a small blue square moving up",
    "a large green circle moving down and a tiny yellow triangle spinning",
    "Café naïve ÀÉÎ 東京 😀 don't stop-believing 3.14",
    "",
    "word " * 80,  # cut at 48 tokens
]


@pytest.mark.parametrize("batch", [TEXTS[:1], TEXTS[1:3], TEXTS])
def test_the_fast_minilm_matches_transformers_bit_for_bit(both, batch):
    fast, fast_tokenize, hf, hf_tokenize = both
    ours, theirs = fast_tokenize(batch), hf_tokenize(batch)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    with torch.no_grad():
        a = fast(**ours).last_hidden_state
        b = hf(**theirs).last_hidden_state
    mask = ours["attention_mask"].bool()
    assert torch.equal(a[mask], b[mask])  # padding positions are dropped by the encoder
    assert fast.num_parameters() == hf.num_parameters()  # the model card's count


def test_a_non_bert_folder_goes_through_transformers(tmp_path):
    from t2v.models.text_encoders import _is_plain_bert, minilm_path

    path = minilm_path()
    config = json.loads((path / "config.json").read_text("utf-8"))
    assert _is_plain_bert(path, config)
    assert not _is_plain_bert(path, {**config, "model_type": "roberta"})
    assert not _is_plain_bert(path, {**config, "position_embedding_type": "relative_key"})
    assert not _is_plain_bert(tmp_path, config)  # no model.safetensors, no tokenizer.json


def test_a_masked_lm_bert_file_loads_and_a_truncated_one_is_refused(tmp_path):
    """A BertForMaskedLM checkpoint names its tensors "bert.*", has a "cls.*" head and no
    pooler: it loads as the same encoder. A file missing an encoder weight is refused."""
    import shutil

    from safetensors.torch import load_file, save_file

    from t2v.models.text_encoders import _load_plain_bert, minilm_path

    path = minilm_path()
    config = json.loads((path / "config.json").read_text("utf-8"))
    state = load_file(path / "model.safetensors")
    for name in ("masked_lm", "truncated"):
        folder = tmp_path / name
        folder.mkdir()
        for file in ("config.json", "tokenizer.json"):
            shutil.copy(path / file, folder / file)
        renamed = {f"bert.{k}": v for k, v in state.items() if not k.startswith("pooler.")}
        renamed["cls.predictions.bias"] = torch.zeros(config["vocab_size"])
        if name == "truncated":
            del renamed["bert.encoder.layer.5.output.dense.weight"]
        save_file(renamed, folder / "model.safetensors")
    original, tokenize = _load_plain_bert(path, config, 48)
    masked_lm, _ = _load_plain_bert(tmp_path / "masked_lm", config, 48)
    batch = tokenize(TEXTS[:3])
    with torch.no_grad():
        assert torch.equal(
            masked_lm(**batch).last_hidden_state, original(**batch).last_hidden_state
        )
    with pytest.raises(ModelError, match="lacks BERT weights"):
        _load_plain_bert(tmp_path / "truncated", config, 48)
