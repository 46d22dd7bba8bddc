"""Tiny random Wan 2.2 pipelines (TI2V-5B and A14B layouts), built offline and saved.

Same approach as ``tiny_pipelines`` (whose T5 tokenizer, UMT5 encoder, Wan 2.1 VAE and
one-block Wan transformer are reused): every component is made in-process from a config,
then saved with ``save_pretrained`` so the adapters load it the way they load real weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_pipelines import _save, t5_encoder, t5_tokenizer, wan_transformer, wan_vae


def _wan(out_dir, vae, shift: float, **config) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=t5_encoder(umt5=True),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        **config,
    )
    return _save(pipe, out_dir)


def build_wan22_a14b(out_dir: str | Path, seed: int = 0, boundary_ratio: float = 0.875) -> Path:
    """Wan 2.2 A14B layout: a high-noise ``transformer`` and a low-noise ``transformer_2``
    switched at ``boundary_ratio`` (the A14B T2V checkpoint's 0.875), the Wan 2.1 VAE."""
    torch.manual_seed(seed)
    vae = wan_vae()
    experts = {"transformer": wan_transformer(16), "transformer_2": wan_transformer(16)}
    return _wan(out_dir, vae, 3.0, boundary_ratio=boundary_ratio, **experts)


def build_wan22_ti2v(out_dir: str | Path, seed: int = 0) -> Path:
    """Wan 2.2 TI2V-5B layout: one transformer on the 48-channel VAE (2x2 patchified
    inside, 16x spatial), with per-token timesteps (``expand_timesteps``)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=48,
        in_channels=12,
        out_channels=12,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,
        patch_size=2,
        scale_factor_spatial=16,
        latents_mean=[0.0] * 48,
        latents_std=[1.0] * 48,
    )
    return _wan(out_dir, vae, 5.0, transformer=wan_transformer(48), expand_timesteps=True)


# A chat template in Qwen's layout (system and user turns, then the assistant's opening).
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer():
    """A byte-level Qwen2 tokenizer (every byte symbol, no merges) with a chat template."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {s: i for i, s in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def build_hunyuan_video15(out_dir: str | Path, seed: int = 0, shift: float = 7.0) -> Path:
    """A tiny HunyuanVideo15Pipeline (text-to-video): a 1-layer Qwen2.5-VL text model, a
    ByT5 glyph encoder, a one-block transformer and a 4x spatial / 2x temporal VAE."""
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from transformers import (
        ByT5Tokenizer,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLTextModel,
    )

    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    text_encoder = Qwen2_5_VLTextModel(
        Qwen2_5_VLTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=2,  # the pipeline reads the third-to-last hidden state
            num_attention_heads=2,
            num_key_value_heads=2,
            rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            rope_theta=1000000.0,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    byt5 = ByT5Tokenizer()
    glyph_encoder = t5_encoder(d_model=8, vocab_size=len(byt5))
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=2 * 4 + 1,  # latents, condition latents, condition mask
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        text_embed_dim=16,
        text_embed_2_dim=8,
        image_embed_dim=12,
        rope_axes_dim=(2, 2, 4),
        target_size=16,
        task_type="t2v",
    )
    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=4,
        block_out_channels=(8, 8),
        layers_per_block=1,
        spatial_compression_ratio=4,
        temporal_compression_ratio=2,
        downsample_match_channel=False,
        upsample_match_channel=False,
    )
    pipe = HunyuanVideo15Pipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        text_encoder_2=glyph_encoder,
        tokenizer_2=byt5,
        guider=ClassifierFreeGuidance(guidance_scale=1.0),
    )
    return _save(pipe, out_dir)


#: The builders by family name (the benchmark and the test fixture share them).
BUILDERS = {
    "wan22_a14b": build_wan22_a14b,
    "wan22_ti2v": build_wan22_ti2v,
    "hunyuan_video15": build_hunyuan_video15,
}
