"""Qwen-Image (``QwenImagePipeline``) as a FlowModel.

The latent state is the pipeline's packed sequence [B, (H/16)(W/16), 4C] (2x2 patches of
the VAE's C = 16 latent channels), drawn as the pipeline draws it ([B, 1, C, H/8, W/8] in
one call, then packed: the same numbers as FLUX's [B, C, H/8, W/8] draw). ``decode`` unpacks and de-normalises with the VAE's
``latents_mean`` / ``latents_std``.

Schedule: ``linspace(1, 1/N, N)`` with dynamic shifting by the image token count, as
FLUX.1 (the pipeline's ``calculate_shift``).

Text: Qwen2.5-VL through the pipeline's ``encode_prompt`` (its system template, the
template tokens dropped). Prompts have their own lengths: rows are padded to the longest
in a batch with an attention mask (``encoder_hidden_states_mask``), as the pipeline pads
a batch; a batch without padding passes no mask, as the pipeline does.

Guidance: ``sampler.guidance_scale`` is the pipeline's ``true_cfg_scale`` against
``model.negative_prompt`` (default empty; the pipeline needs an explicit negative prompt to
run it), negative and positive rows in one forward, then the pipeline's norm rescale: the
guided prediction is scaled back to the positive prediction's norm per token. A
guidance-distilled variant (``guidance_embeds`` in the transformer config) takes the scale
as its embedded guidance instead, in one forward.
"""

from __future__ import annotations

import torch

from flowdppo.models.base import Cond
from flowdppo.models.diffusers_adapters.base import (
    JOINT_ATTENTION_LORA_TARGETS,
    ComponentConfigs,
    PipelineInputError,
    pad_text,
)
from flowdppo.models.diffusers_adapters.flux import PackedLatentModel

#: The pipeline classes (``model_index.json``'s ``_class_name``) this adapter takes.
PIPELINE_CLASSES = ("QwenImagePipeline",)

#: Joint attention of every dual-stream block, image (``to_*``) and text (``add_*``).
QWEN_IMAGE_LORA_TARGETS = JOINT_ATTENTION_LORA_TARGETS


class QwenImageModel(PackedLatentModel):
    pipeline_classes = PIPELINE_CLASSES
    lora_target_suffixes = QWEN_IMAGE_LORA_TARGETS
    default_max_sequence_length = 512  # the pipeline's default
    default_resolution = 512

    def __init__(self, pipe, **kwargs):
        super().__init__(pipe, **kwargs)
        self.guidance_embedded = bool(self.transformer_config.guidance_embeds)
        self.batched_cfg = not self.guidance_embedded
        h, w = self._latent_hw()
        self._img_shape = (1, h // 2, w // 2)

    @classmethod
    def pixel_multiple(cls, configs: ComponentConfigs) -> tuple[int, str]:
        vae, transformer = configs("vae"), configs("transformer")
        if transformer.get("patch_size", 2) != 2 or transformer["in_channels"] != 4 * vae["z_dim"]:
            raise PipelineInputError(
                "model.path",
                f"model.path: the transformer takes {transformer['in_channels']} channels in "
                f"patches of {transformer.get('patch_size')}, but the pipeline packs 2x2 "
                f"patches of the VAE's {vae['z_dim']} channels: the directory mixes "
                "components of different models",
            )
        scale = 2 ** len(vae.get("temperal_downsample", [False, True, True]))
        return 2 * scale, f"the VAE's {scale}x downsampling times the 2x2 packing"

    def _match_lora_targets(self, module) -> list[str]:
        # The last block's text-stream output is discarded by the transformer: an adapter
        # there would never get a gradient.
        last = f"transformer_blocks.{len(module.transformer_blocks) - 1}.attn.to_add_out"
        return [n for n in super()._match_lora_targets(module) if n != last]

    def _encode_batch(self, prompts: list[str]) -> Cond:
        embeds, mask = self.pipe.encode_prompt(
            prompt=list(prompts),
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_mask": mask}

    def _collate(self, conds: list[Cond]) -> Cond:
        return pad_text(conds)

    def _guide(self, uncond: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
        guided = uncond + scale * (text - uncond)
        # The pipeline's rescale: each token's guided prediction gets the positive's norm.
        return guided * (text.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance: float):
        b = x.shape[0]
        mask = cond["prompt_mask"]
        embed_guidance = None
        if self.guidance_embedded:
            embed_guidance = torch.full((b,), guidance, dtype=torch.float32, device=self.device)
        t = (sigma * 1000).to(self.dtype)  # as the pipeline: t in the model dtype, over 1000
        return self.module(
            hidden_states=x,
            timestep=t / 1000,
            guidance=embed_guidance,
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            encoder_hidden_states=cond["prompt_embeds"],
            img_shapes=[[self._img_shape]] * b,
            return_dict=False,
        )[0]

    def _decode_chunk(self, x: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        z = self._unpacked(x)[:, :, None]  # [B, C, 1, h, w]
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=z.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=z.device).view(shape)
        z = z * std + mean
        return vae.decode(z.to(vae.dtype), return_dict=False)[0][:, :, 0]


ADAPTER = QwenImageModel
