"""Tiny random-weight diffusers folders (Wan, LTX-Video, CogVideoX) for offline tests.

diffusers' own fast tests download a tiny T5 from a hub; these build everything here: a T5
tokenizer from a small in-memory vocabulary (a Unigram model of the `tokenizers` library,
wrapped in transformers' T5Tokenizer), a 1-layer T5/UMT5 encoder of width 32, and the
pipeline's transformer and VAE at the sizes of diffusers' fast tests. Each folder is written
with ``save_pretrained`` (safetensors, JSON) and generates a clip in well under a second.

Use ``build_tiny(kind, folder)``, or the session fixture ``tiny_diffusers`` of
tests/test_diffusers.py (``{"wan": Path, "ltx": Path, "cogvideox": Path}``).
"""

from __future__ import annotations

from pathlib import Path

KINDS = ("wan", "ltx", "cogvideox")
WORDS = (
    "a an the dog cat bird car person running walking flying on in at beach street sky field "
    "red blue green yellow white black circle square moving left right up down slowly fast "
    "blurry low quality"
).split()
TEXT_DIM = 32


def tiny_tokenizer():
    """A T5 tokenizer over WORDS and the letters, made in memory (no hub, no sentencepiece)."""
    from transformers import T5Tokenizer

    letters = "abcdefghijklmnopqrstuvwxyz0123456789.,'!?-"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"\u2581{w}", -2.0) for w in WORDS]
    pieces += [("\u2581", -3.0)] + [(c, -5.0) for c in letters]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _text_encoder(umt5: bool, vocab_size: int):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kwargs = dict(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=37,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        decoder_start_token_id=0,
    )
    if umt5:
        return UMT5EncoderModel(UMT5Config(**kwargs))
    return T5EncoderModel(T5Config(**kwargs))


def _wan(tokenizer, text_encoder):
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,  # as the released Wan 2.1 configs: 832x480 needs 52 positions
    )
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )


def _ltx(tokenizer, text_encoder):
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    # Three down-scaling levels: 8x in time and space, the real model's 8k+1 frames rule.
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=1,
        caption_channels=TEXT_DIM,
    )
    return LTXPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


def _cogvideox(tokenizer, text_encoder):
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=TEXT_DIM,
        num_layers=1,
        sample_width=4,  # latent pixels: the default size is 32x32
        sample_height=4,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    return CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=CogVideoXDDIMScheduler(),
    )


BUILDERS = {"wan": (_wan, True), "ltx": (_ltx, False), "cogvideox": (_cogvideox, False)}


def build_tiny(kind: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight diffusers folder of ``kind`` (wan, ltx or cogvideox)."""
    import torch

    build, umt5 = BUILDERS[kind]
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    pipe = build(tokenizer, _text_encoder(umt5, len(tokenizer)))
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_all(root: str | Path) -> dict[str, Path]:
    """All three kinds under ``root``: {"wan": root/wan, "ltx": ..., "cogvideox": ...}."""
    return {kind: build_tiny(kind, Path(root) / kind) for kind in KINDS}
