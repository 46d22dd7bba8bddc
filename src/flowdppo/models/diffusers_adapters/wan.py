"""Wan 2.1 text-to-video (``WanPipeline``) as a FlowModel.

Latents are 5-D [B, 16, F', H/8, W/8] with ``F' = (frames - 1) / 4 + 1``; the transformer
takes ``timestep = sigma * 1000``; guidance batches the negative prompt (default: empty,
as the pipeline) with the positive rows, where the pipeline runs two forwards.

``decode`` returns videos [B, 3, F, H, W] in [0, 1]; the rewards of
``flowdppo.rewards.vision`` score every frame and average over frames.

Wan 2.1 checkpoints ship a multistep UniPC scheduler. The RL sampler takes Euler / SDE
steps on the flow-matching Euler schedule with the checkpoint's ``flow_shift`` (see
:meth:`sigmas`), so its samples match ``WanPipeline`` only when that pipeline is given a
``FlowMatchEulerDiscreteScheduler`` with the same shift. Wan 2.2's two-expert pipelines
(``transformer_2``, ``boundary_ratio``) are not supported.
"""

from __future__ import annotations

import torch

from flowdppo.models.base import Cond
from flowdppo.models.diffusers_adapters.base import (
    ComponentConfigs,
    DiffusersFlowModel,
    PipelineInputError,
    require_multiple,
)

#: Self- and cross-attention projections of every block.
WAN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


#: The pipeline classes (``model_index.json``'s ``_class_name``) this adapter takes.
PIPELINE_CLASSES = ("WanPipeline",)


class WanModel(DiffusersFlowModel):
    pipeline_classes = PIPELINE_CLASSES
    lora_target_suffixes = WAN_LORA_TARGETS
    default_max_sequence_length = 512
    default_resolution = (480, 832)
    default_frames = 81

    def __init__(self, pipe, *, frames: int = 81, **kwargs):
        if getattr(pipe, "transformer_2", None) is not None or pipe.config.get(
            "expand_timesteps", False
        ):
            raise ValueError(
                "this is a Wan 2.2 pipeline (two experts or expanded timesteps), which the "
                "Wan adapter does not support; use a Wan 2.1 T2V checkpoint"
            )
        self.frames = frames
        super().__init__(pipe, **kwargs)

    def _frames(self) -> int | None:
        return self.frames

    @classmethod
    def check_inputs(
        cls, configs: ComponentConfigs, height: int, width: int, frames: int | None
    ) -> None:
        vae = configs("vae")
        downsample = list(vae.get("temperal_downsample", [False, True, True]))
        spatial = 2 ** len(downsample) * configs("transformer")["patch_size"][1]
        why = "the VAE's spatial downsampling times the transformer's patch"
        require_multiple("model.resolution", "height", height, spatial, why)
        require_multiple("model.resolution", "width", width, spatial, why)
        temporal = 2 ** sum(downsample)
        frames = cls.default_frames if frames is None else frames
        if frames < 1 or (frames - 1) % temporal:
            near = max(0, round((frames - 1) / temporal)) * temporal + 1
            raise PipelineInputError(
                "model.frames",
                f"model.frames: {frames} frames is not 1 + a multiple of {temporal} (the VAE "
                f"compresses {temporal} frames into one); use e.g. {near}",
            )

    def latent_shape(self, n: int) -> tuple[int, ...]:
        s = self.pipe.vae_scale_factor_spatial
        f = (self.frames - 1) // self.pipe.vae_scale_factor_temporal + 1
        return (n, self.transformer_config.in_channels, f, self.height // s, self.width // s)

    @property
    def image_seq_len(self) -> int:
        _, _, f, h, w = self.latent_shape(1)
        p = self.transformer_config.patch_size
        return (f // p[0]) * (h // p[1]) * (w // p[2])

    def _encode_batch(self, prompts: list[str]) -> Cond:
        embeds, _ = self.pipe.encode_prompt(
            prompt=prompts,
            negative_prompt=None,
            do_classifier_free_guidance=False,
            num_videos_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        return {"prompt_embeds": embeds}

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance: float):
        return self.module(
            hidden_states=x,
            timestep=sigma * self.num_train_timesteps,
            encoder_hidden_states=cond["prompt_embeds"],
            return_dict=False,
        )[0]

    def _decode_chunk(self, x: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=x.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=x.device).view(shape)
        z = x.float() * std + mean
        return vae.decode(z.to(vae.dtype), return_dict=False)[0]


ADAPTER = WanModel
