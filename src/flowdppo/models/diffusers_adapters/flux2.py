"""FLUX.2 (``Flux2Pipeline``, [dev]) and FLUX.2 [klein] (``Flux2KleinPipeline``) as a FlowModel.

The latent state is the pipeline's own sampling state: the VAE latent patchified 2x2 and
normalised by the VAE's batch-norm statistics, as a token sequence [B, (H/16)(W/16), 4C]
(``C`` = the VAE's latent channels, 32 in the released models, so 128 per token). The
pipeline draws its noise as [B, 4C, H/16, W/16] and flattens it to tokens; so does
:meth:`initial_noise`. ``decode`` undoes the normalisation and the patches, as the pipeline
does before its VAE.

Text: [dev] encodes with Mistral-Small-3.1 (``Mistral3ForConditionalGeneration``, its
system message, hidden states of layers 10, 20, 30), [klein] with Qwen3 (the chat template,
layers 9, 18, 27): both through the pipeline's own ``encode_prompt``, padded to
``max_sequence_length`` tokens (default 512, the pipelines').

Guidance: [dev] is guidance-distilled: ``sampler.guidance_scale`` is the value given to its
guidance embedding (one forward; the pipeline's default is 4.0). [klein] base models run
classifier-free guidance against the negative prompt (the pipeline's negative is the empty
prompt, ours is ``model.negative_prompt``, default empty) with both rows in one forward;
a step-distilled [klein] (``is_distilled`` in ``model_index.json``) ignores guidance, as
its pipeline does.

Schedule: ``linspace(1, 1/N, N)`` shifted by FLUX.2's empirical ``mu``, which depends on
the image token count *and* the number of steps (the pipeline's ``compute_empirical_mu``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flowdppo.models.base import Cond
from flowdppo.models.diffusers_adapters.base import (
    JOINT_ATTENTION_LORA_TARGETS,
    ComponentConfigs,
    DiffusersFlowModel,
    PipelineInputError,
)

#: The pipeline classes (``model_index.json``'s ``_class_name``) this adapter takes.
PIPELINE_CLASSES = ("Flux2Pipeline", "Flux2KleinPipeline")

#: The double-stream blocks' joint attention (both streams) and the single-stream blocks'
#: fused QKV + MLP input and output projections.
FLUX2_LORA_TARGETS = (*JOINT_ATTENTION_LORA_TARGETS, "attn.to_qkv_mlp_proj", "attn.to_out")


def bn_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent normalisation (mean, std) per patchified channel, [1, 4C, 1, 1]."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).float()
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).float() + vae.config.batch_norm_eps)
    return mean, std


class Flux2Model(DiffusersFlowModel):
    pipeline_classes = PIPELINE_CLASSES
    lora_target_suffixes = FLUX2_LORA_TARGETS
    default_max_sequence_length = 512
    num_train_timesteps = None  # the pipeline passes sigma itself (t / 1000)

    def __init__(self, pipe, **kwargs):
        super().__init__(pipe, **kwargs)
        self.guidance_embedded = bool(self.transformer_config.guidance_embeds)
        self.distilled = bool(pipe.config.get("is_distilled", False))
        # [dev]: the guidance embedding; distilled [klein]: no guidance; [klein]: CFG.
        self.batched_cfg = not (self.guidance_embedded or self.distilled)
        h, w = self._token_hw()
        self._img_ids = type(pipe)._prepare_latent_ids(torch.empty(1, 1, h, w))[0]
        self._img_ids = self._img_ids.to(self.device)

    @classmethod
    def pixel_multiple(cls, configs: ComponentConfigs) -> tuple[int, str]:
        vae = configs("vae")
        transformer = configs("transformer")
        patched = 4 * vae["latent_channels"]
        if transformer["in_channels"] != patched:
            raise PipelineInputError(
                "model.path",
                f"model.path: the transformer takes {transformer['in_channels']} channels per "
                f"token but the VAE's 2x2 patches have {patched} (4 x latent_channels "
                f"{vae['latent_channels']}): the directory mixes components of different models",
            )
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
        return 2 * scale, f"the VAE's {scale}x downsampling times FLUX.2's 2x2 patches"

    def _token_hw(self) -> tuple[int, int]:
        f = self.pipe.vae_scale_factor * 2
        return self.height // f, self.width // f

    def latent_shape(self, n: int) -> tuple[int, ...]:
        h, w = self._token_hw()
        return (n, h * w, self.transformer_config.in_channels)

    @property
    def image_seq_len(self) -> int:
        return self.latent_shape(1)[1]

    def _noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        # The pipeline draws [B, 4C, h, w] in one call and flattens it to tokens.
        h, w = self._token_hw()
        shape = (n, self.transformer_config.in_channels, h, w)
        x = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        return x.flatten(2).transpose(1, 2)

    # ------------------------------------------------------------------ the schedule
    def schedule_mu(self, num_steps: int) -> float:
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        return compute_empirical_mu(image_seq_len=self.image_seq_len, num_steps=num_steps)

    @property
    def mu(self) -> float:
        """``mu`` at the pipeline's default 50 steps (the schedule uses :meth:`schedule_mu`)."""
        return self.schedule_mu(50)

    @property
    def shift(self) -> float:  # type: ignore[override]
        return math.exp(self.mu)

    def _pipeline_base_sigmas(self, num_steps: int):
        if self.pipe.scheduler.config.get("use_flow_sigmas", False):
            return None
        return np.linspace(1.0, 1 / num_steps, num_steps)  # exactly the pipeline's

    # ------------------------------------------------------------------ model calls
    def _encode_batch(self, prompts: list[str]) -> Cond:
        embeds, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds}

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance: float):
        b = x.shape[0]
        embeds = cond["prompt_embeds"]
        text_ids = type(self.pipe)._prepare_text_ids(embeds).to(self.device)
        embed_guidance = None
        if self.guidance_embedded:
            embed_guidance = torch.full((b,), guidance, dtype=torch.float32, device=self.device)
        # As the pipeline: timestep t = sigma * 1000 in the model dtype, passed as t / 1000.
        t = (sigma * 1000).to(self.dtype)
        return self.module(
            hidden_states=x,
            timestep=t / 1000,
            guidance=embed_guidance,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=self._img_ids.expand(b, -1, -1),
            return_dict=False,
        )[0]

    def _decode_chunk(self, x: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        h, w = self._token_hw()
        b, _, c = x.shape
        z = x.float().transpose(1, 2).reshape(b, c, h, w)
        mean, std = bn_stats(vae)
        z = z * std.to(z.device) + mean.to(z.device)
        # Undo the 2x2 patches: [B, 4C, h, w] -> [B, C, 2h, 2w].
        z = (
            z.reshape(b, c // 4, 2, 2, h, w)
            .permute(0, 1, 4, 2, 5, 3)
            .reshape(b, c // 4, 2 * h, 2 * w)
        )
        return vae.decode(z.to(vae.dtype), return_dict=False)[0]


ADAPTER = Flux2Model
