"""FLUX.1 (``FluxPipeline``) as a FlowModel.

The latent state is FLUX's *packed* sequence [B, (H/16)(W/16), 64]: what the pipeline
draws, steps and returns with ``output_type="latent"``, so no pack / unpack runs per step
(the kernels are element-wise, so packing changes no log-prob). ``decode`` unpacks.

Guidance: FLUX.1-dev is guidance-distilled, so ``guidance_scale`` goes to the transformer's
guidance embedding in a single forward (set ``sampler.guidance_scale=3.5``, the pipeline's
default). A model without the embedding (FLUX.1-schnell) runs true classifier-free
guidance against the negative prompt when ``guidance_scale != 1``, batched in one forward.

The schedule uses dynamic shifting: ``mu`` from the image token count, applied to
``linspace(1, 1/N, N)``, which equals a static shift ``exp(mu)`` of the plain linear
schedule, so :attr:`shift` is ``exp(mu)`` and :attr:`num_train_timesteps` is None.
"""

from __future__ import annotations

import numpy as np
import torch

from flowdppo.models.base import Cond
from flowdppo.models.diffusers_adapters.base import (
    JOINT_ATTENTION_LORA_TARGETS,
    ComponentConfigs,
    DiffusersFlowModel,
)

#: Attention projections of the double-stream blocks (both streams) and the single-stream
#: blocks (which have ``to_q/k/v`` only).
FLUX_LORA_TARGETS = JOINT_ATTENTION_LORA_TARGETS


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: 2x2 patches as tokens (FLUX's layout)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent of height ``h`` and width ``w``."""
    b, _, d = latents.shape
    x = latents.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


#: The pipeline classes (``model_index.json``'s ``_class_name``) this adapter takes.
PIPELINE_CLASSES = ("FluxPipeline",)


class PackedLatentModel(DiffusersFlowModel):
    """A pipeline whose sampling state is the VAE latent packed into 2x2-patch tokens,
    [B, (h/2)(w/2), 4C], on the ``linspace(1, 1/N, N)`` schedule (FLUX.1, Qwen-Image)."""

    num_train_timesteps = None  # see the module docstring: the linear spacing, shift exp(mu)

    def _latent_hw(self) -> tuple[int, int]:
        f = self.pipe.vae_scale_factor * 2  # the VAE's factor, times 2 for packing
        return 2 * (self.height // f), 2 * (self.width // f)

    @property
    def latent_channels(self) -> int:
        return self.transformer_config.in_channels // 4

    def latent_shape(self, n: int) -> tuple[int, ...]:
        h, w = self._latent_hw()
        return (n, (h // 2) * (w // 2), self.latent_channels * 4)

    @property
    def image_seq_len(self) -> int:
        return self.latent_shape(1)[1]

    def _noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        # The pipeline draws the unpacked latent in one call and packs it: so do we.
        h, w = self._latent_hw()
        shape = (n, self.latent_channels, h, w)
        return pack_latents(
            torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        )

    def _pipeline_base_sigmas(self, num_steps: int) -> np.ndarray:
        return np.linspace(1.0, 1.0 / num_steps, num_steps)  # exactly the pipeline's

    def _unpacked(self, x: torch.Tensor) -> torch.Tensor:
        """Packed float32 latents back to the VAE's [B, C, h, w]."""
        return unpack_latents(x.float(), *self._latent_hw())


class FluxModel(PackedLatentModel):
    pipeline_classes = PIPELINE_CLASSES
    lora_target_suffixes = FLUX_LORA_TARGETS
    default_max_sequence_length = 512

    def __init__(self, pipe, **kwargs):
        super().__init__(pipe, **kwargs)
        # Distilled guidance replaces classifier-free guidance where the model has it.
        self.batched_cfg = not self.transformer_config.guidance_embeds
        h, w = self._latent_hw()
        self._img_ids = self._image_ids(h // 2, w // 2)

    @classmethod
    def pixel_multiple(cls, configs: ComponentConfigs) -> tuple[int, str]:
        vae = 2 ** (len(configs("vae")["block_out_channels"]) - 1)
        return 2 * vae, f"the VAE's {vae}x downsampling times FLUX's 2x2 packing"

    def _image_ids(self, h: int, w: int) -> torch.Tensor:
        ids = torch.zeros(h, w, 3)
        ids[..., 1] += torch.arange(h)[:, None]
        ids[..., 2] += torch.arange(w)[None, :]
        return ids.reshape(h * w, 3).to(self.device, self.dtype)

    def _encode_batch(self, prompts: list[str]) -> Cond:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance: float):
        b = x.shape[0]
        embed_guidance = None
        if self.transformer_config.guidance_embeds:
            embed_guidance = torch.full((b,), guidance, dtype=torch.float32, device=self.device)
        text_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=self.device)
        # As the pipeline: timestep t = sigma * 1000 in the model dtype, passed as t / 1000.
        t = (sigma * 1000).to(self.dtype)
        return self.module(
            hidden_states=x,
            timestep=t / 1000,
            guidance=embed_guidance,
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=text_ids.to(self.dtype),
            img_ids=self._img_ids,
            return_dict=False,
        )[0]

    def _decode_chunk(self, x: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        z = self._unpacked(x) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.decode(z.to(vae.dtype), return_dict=False)[0]


ADAPTER = FluxModel
