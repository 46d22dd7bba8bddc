"""Tiny random diffusers pipelines and CLIP models, built offline from configs.

The tests cannot reach the model hub, so every component (tokenizers included) is made
in-process: a byte-level CLIP BPE vocabulary with no merges, a character-level T5 Unigram
vocabulary, and text encoders / transformers / VAEs with hidden sizes of 16-64. Each builder
saves the pipeline with ``save_pretrained`` so that the adapters load it back the way they
load real weights.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

CLIP_DIM = 32  # hidden size of the tiny CLIP text encoders
T5_DIM = 32  # d_model of the tiny T5 encoder


def clip_tokenizer(max_length: int = 77):
    """A CLIP tokenizer whose vocabulary is every byte-level symbol (no merges)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols:
        vocab[s] = len(vocab)
        vocab[s + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = 512):
    """A T5 (Unigram) tokenizer over lower-case letters, digits and a few symbols."""
    from transformers import T5Tokenizer

    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -3.5) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def clip_text_config(**kw):
    from transformers import CLIPTextConfig

    tok = clip_tokenizer()
    base = dict(
        vocab_size=len(tok),
        hidden_size=CLIP_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=CLIP_DIM,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )
    base.update(kw)
    return CLIPTextConfig(**base)


def t5_encoder(d_model: int = T5_DIM, umt5: bool = False, vocab_size: int | None = None):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kw = dict(
        vocab_size=vocab_size or len(t5_tokenizer()),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    if umt5:
        return UMT5EncoderModel(UMT5Config(**kw))
    return T5EncoderModel(T5Config(**kw))


def _seeded(seed: int):
    torch.manual_seed(seed)


def build_sd3(
    out_dir: str | Path, seed: int = 0, layers: int = 1, heads: int = 2, head_dim: int = 8
) -> Path:
    """A tiny StableDiffusion3Pipeline (two CLIP + one T5 encoder) saved to ``out_dir``.

    The transformer's width is ``heads * head_dim``; the benchmark uses a larger one.
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    _seeded(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        # CLIP-L and CLIP-G hidden states are concatenated (2 x 32) then padded to T5's
        # width, so the joint width is max(64, T5_DIM).
        joint_attention_dim=2 * CLIP_DIM,
        caption_projection_dim=head_dim * heads,
        pooled_projection_dim=2 * CLIP_DIM,
        out_channels=4,
        pos_embed_max_size=32,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(latent_channels=4),
        text_encoder=CLIPTextModelWithProjection(clip_text_config()),
        tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config()),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(d_model=2 * CLIP_DIM),
        tokenizer_3=t5_tokenizer(),
    )
    return _save(pipe, out_dir)


def smooth_in_sigma(transformer, max_rad_per_sigma: float = 10.0) -> None:
    """Drop the timestep embedding's sinusoids faster than ``max_rad_per_sigma`` (in place).

    The diffusers embedding of ``timestep = 1000 sigma`` reaches 1 rad per timestep unit,
    so a random transformer's velocity oscillates in sigma with a period of 0.006: no ODE
    solver shows its order before its steps are that small. A trained model's velocity is
    smooth in sigma; with the columns of the faster sinusoids zeroed, the random one is too
    (the order checks of ``sampler.solver``)."""
    import math

    lin = transformer.time_text_embed.timestep_embedder.linear_1
    half = lin.weight.shape[1] // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
    keep = (1000 * freqs <= max_rad_per_sigma).to(lin.weight.dtype)
    with torch.no_grad():
        lin.weight.mul_(torch.cat([keep, keep])[None])


def build_flux(out_dir: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A tiny FluxPipeline (dev-style guidance embedding by default) saved to ``out_dir``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    _seeded(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * 4,  # packed 2x2 patches of a 4-channel latent
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_DIM,
        pooled_projection_dim=CLIP_DIM,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_vae(latent_channels=4),
        text_encoder=CLIPTextModel(clip_text_config()),
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5_encoder(),
        tokenizer_2=t5_tokenizer(),
    )
    return _save(pipe, out_dir)


def build_wan(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny WanPipeline (Wan 2.1 T2V layout, Euler flow scheduler) saved to ``out_dir``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    _seeded(seed)
    vae = wan_vae()
    pipe = WanPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=t5_encoder(umt5=True),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        transformer=wan_transformer(16),
    )
    return _save(pipe, out_dir)


def wan_vae():
    """The Wan 2.1 VAE (16 latent channels, 8x spatial, 4x temporal), 3 channels wide."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )


def wan_transformer(channels: int):
    """A one-block WanTransformer3DModel on ``channels`` latent channels."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=channels,
        out_channels=channels,
        text_dim=T5_DIM,
        freq_dim=32,
        ffn_dim=32,
        num_layers=1,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def build_clip_model(out_dir: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny CLIPModel with its processor (tokenizer + image processor) saved to ``out_dir``."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPVisionConfig,
    )

    _seeded(seed)
    text = clip_text_config()
    vision = CLIPVisionConfig(
        hidden_size=CLIP_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
        projection_dim=CLIP_DIM,
    )
    config = CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=CLIP_DIM
    )
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer())
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _vae(latent_channels: int):
    """A two-level AutoencoderKL: vae_scale_factor 2, so 32 px images have 16 x 16 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def _save(pipe, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    pipe.save_pretrained(out)
    return out
