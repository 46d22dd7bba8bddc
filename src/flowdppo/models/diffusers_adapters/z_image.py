"""Z-Image (``ZImagePipeline``: Z-Image and Z-Image-Turbo) as a FlowModel.

Latents are the VAE's [B, 16, H/8, W/8], drawn in float32 for the whole batch as the
pipeline draws them; the transformer patchifies them itself (2x2) and takes a *list* of
per-sample latents [C, 1, h, w] and a list of per-sample text features of their own
lengths. A condition batch keeps the text padded with a mask; :meth:`_forward` hands the
transformer each row's valid tokens, exactly the pipeline's list.

Sign and time: the transformer predicts ``x0 - eps`` at ``t = 1 - sigma``; the pipeline
negates it before its Euler step, and so does :meth:`_forward`, so ``velocity`` is the
usual ``eps - x0``.

Guidance: the pipeline's ``guidance_scale`` g' is the weight of ``pos + g' (pos - neg)``,
so ``sampler.guidance_scale`` g (``neg + g (pos - neg)``, 1 = off) is the pipeline's
g' = g - 1: Z-Image-Turbo's recommended ``guidance_scale=0`` is our 1. The pipeline's
``cfg_normalization`` and ``cfg_truncation`` options are off by default and not modelled.
Schedule: ``torch.linspace(1, 1/N, N)`` with the scheduler's own shift (Turbo: static 3.0).
"""

from __future__ import annotations

import torch

from flowdppo.models.base import Cond
from flowdppo.models.diffusers_adapters.base import (
    ComponentConfigs,
    DiffusersFlowModel,
    PipelineInputError,
    pad_text,
)

#: The pipeline classes (``model_index.json``'s ``_class_name``) this adapter takes.
PIPELINE_CLASSES = ("ZImagePipeline",)

#: Self-attention of the main layers and of the noise / context refiners.
Z_IMAGE_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class ZImageModel(DiffusersFlowModel):
    pipeline_classes = PIPELINE_CLASSES
    lora_target_suffixes = Z_IMAGE_LORA_TARGETS
    default_max_sequence_length = 512  # the pipeline's default
    default_resolution = 512
    num_train_timesteps = None  # the transformer takes 1 - sigma

    @classmethod
    def pixel_multiple(cls, configs: ComponentConfigs) -> tuple[int, str]:
        vae, transformer = configs("vae"), configs("transformer")
        if transformer["in_channels"] != vae["latent_channels"]:
            raise PipelineInputError(
                "model.path",
                f"model.path: the transformer takes {transformer['in_channels']} latent "
                f"channels but the VAE makes {vae['latent_channels']}: the directory mixes "
                "components of different models",
            )
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
        return 2 * scale, f"the VAE's {scale}x downsampling times the 2x2 patches"

    def latent_shape(self, n: int) -> tuple[int, ...]:
        f = self.pipe.vae_scale_factor * 2
        h, w = 2 * (self.height // f), 2 * (self.width // f)
        return (n, self.transformer_config.in_channels, h, w)

    @property
    def image_seq_len(self) -> int:
        _, _, h, w = self.latent_shape(1)
        return (h // 2) * (w // 2)

    def _pipeline_base_sigmas(self, num_steps: int) -> list[float]:
        # The pipeline's get_default_z_image_sigmas: a float32 torch linspace, as floats.
        return torch.linspace(1.0, 1 / num_steps, num_steps).tolist()

    def _encode_batch(self, prompts: list[str]) -> Cond:
        # encode_prompt rewrites its prompt list in place (each prompt becomes its chat
        # template): it gets a copy.
        embeds, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        rows = [
            {"prompt_embeds": e[None], "prompt_mask": e.new_ones(1, e.shape[0])} for e in embeds
        ]
        return pad_text(rows)

    def _collate(self, conds: list[Cond]) -> Cond:
        return pad_text(conds)

    def _guide(self, uncond: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
        # The pipeline's own arithmetic, pos + (g - 1)(pos - neg), on the negated outputs:
        # bit for bit what its Euler step sees.
        return text + (scale - 1) * (text - uncond)

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance: float):
        mask = cond["prompt_mask"].bool()
        text = [e[m] for e, m in zip(cond["prompt_embeds"], mask)]
        t = (1000 - sigma * 1000) / 1000  # as the pipeline, from its timestep sigma * 1000
        out = self.module(list(x.unsqueeze(2).unbind(0)), t, text, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def _decode_chunk(self, x: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        z = x.float() / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(z.to(vae.dtype), return_dict=False)[0]


ADAPTER = ZImageModel
