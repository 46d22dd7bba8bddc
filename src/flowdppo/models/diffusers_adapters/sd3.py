"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``) as a FlowModel.

Latents are the VAE's [B, 16, H/8, W/8]; the transformer takes ``timestep = sigma * 1000``;
guidance batches the negative (by default the empty prompt) with the positive rows.
"""

from __future__ import annotations

import torch

from flowdppo.models.base import Cond
from flowdppo.models.diffusers_adapters.base import (
    JOINT_ATTENTION_LORA_TARGETS,
    ComponentConfigs,
    DiffusersFlowModel,
)

#: Joint-attention projections of every MMDiT block (image and text streams).
SD3_LORA_TARGETS = JOINT_ATTENTION_LORA_TARGETS


#: The pipeline classes (``model_index.json``'s ``_class_name``) this adapter takes.
PIPELINE_CLASSES = ("StableDiffusion3Pipeline",)


class SD3Model(DiffusersFlowModel):
    pipeline_classes = PIPELINE_CLASSES
    lora_target_suffixes = SD3_LORA_TARGETS
    default_max_sequence_length = 256  # the pipeline's default for the T5 encoder

    @classmethod
    def pixel_multiple(cls, configs: ComponentConfigs) -> tuple[int, str]:
        vae = 2 ** (len(configs("vae")["block_out_channels"]) - 1)
        patch = configs("transformer").get("patch_size", 2)
        return vae * patch, f"the VAE's {vae}x downsampling times the {patch}x{patch} patches"

    def latent_shape(self, n: int) -> tuple[int, ...]:
        f = self.pipe.vae_scale_factor
        return (n, self.transformer_config.in_channels, self.height // f, self.width // f)

    @property
    def image_seq_len(self) -> int:
        p = self.transformer_config.patch_size
        _, _, h, w = self.latent_shape(1)
        return (h // p) * (w // p)

    def _encode_batch(self, prompts: list[str]) -> Cond:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance: float):
        return self.module(
            hidden_states=x,
            # The pipeline's timestep is its float32 sigma times 1000, also under bf16.
            timestep=sigma * self.num_train_timesteps,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            return_dict=False,
        )[0]

    def _decode_chunk(self, x: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        z = x.float() / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.decode(z.to(vae.dtype), return_dict=False)[0]


ADAPTER = SD3Model
