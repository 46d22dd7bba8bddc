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
