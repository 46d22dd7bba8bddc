"""Wan 2.1 and Wan 2.2 text-to-video (``WanPipeline``) as a FlowModel.

Three layouts of the one pipeline class, told apart by its components and config:

* Wan 2.1 T2V: one transformer, the 16-channel VAE (8x spatial), a scalar timestep.
* Wan 2.2 TI2V-5B: one transformer on the 48-channel VAE (16x spatial, its 2x2
  patchify inside the VAE) and per-token timesteps (``expand_timesteps``): the pipeline
  gives every latent token the step's timestep, and so does :meth:`_forward`.
* Wan 2.2 A14B: two experts, ``transformer`` (high noise) and ``transformer_2`` (low
  noise). The pipeline uses the first while ``timestep >= boundary_ratio *
  num_train_timesteps`` and the second below, with ``guidance_scale_2`` (default: the
  same as ``guidance_scale``) for the low-noise expert. :meth:`velocity` routes every
  row to the expert the pipeline would use at its noise level, so rollout, replay, the
  KL and the reference (adapters disabled) all see that expert. ``module`` is then a
  :class:`WanExperts` holding both, LoRA goes on both, and the export writes one file per
  expert (see :meth:`WanModel.lora_files`).

Latents are 5-D [B, C, F', H/s, W/s] with ``F' = (frames - 1) / 4 + 1`` (C = 16, s = 8;
TI2V-5B: C = 48, s = 16); the transformer takes ``timestep = sigma * 1000``; guidance
batches the negative prompt (default: empty, as the pipeline) with the positive rows,
where the pipeline runs two forwards. ``decode`` returns videos [B, 3, F, H, W] in [0, 1];
the rewards of ``flowdppo.rewards.vision`` score every frame and average over frames.

Wan checkpoints ship a multistep UniPC scheduler. The RL sampler takes Euler / SDE steps
on the flow-matching Euler schedule with the checkpoint's ``flow_shift`` (see
:meth:`sigmas`), so its samples match ``WanPipeline`` only when that pipeline is given a
``FlowMatchEulerDiscreteScheduler`` with the same shift.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flowdppo.models.base import Cond, index_cond
from flowdppo.models.diffusers_adapters.base import (
    ComponentConfigs,
    DiffusersFlowModel,
    PipelineInputError,
    require_video_sizes,
)

#: Self- and cross-attention projections of every block.
WAN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

#: Where the low-noise expert's LoRA goes in an export; load it with
#: ``pipe.load_lora_weights(DIR, weight_name=LOW_NOISE_LORA_FILE, load_into_transformer_2=True)``.
LOW_NOISE_LORA_FILE = "pytorch_lora_weights_transformer_2.safetensors"


class WanExperts(nn.Module):
    """Wan 2.2 A14B's two experts as one module: what LoRA wraps and the trainer optimises.

    ``forward(expert, **inputs)`` runs ``transformer`` (expert 0, high noise) or
    ``transformer_2`` (expert 1, low noise); going through this module's own forward
    keeps peft's and FSDP's hooks on the path.
    """

    def __init__(self, transformer: nn.Module, transformer_2: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2

    def forward(self, expert: int, **inputs: Any):
        return (self.transformer if expert == 0 else self.transformer_2)(**inputs)


#: The pipeline classes (``model_index.json``'s ``_class_name``) this adapter takes.
PIPELINE_CLASSES = ("WanPipeline",)


class WanModel(DiffusersFlowModel):
    pipeline_classes = PIPELINE_CLASSES
    lora_target_suffixes = WAN_LORA_TARGETS
    default_max_sequence_length = 512
    default_resolution = (480, 832)
    default_frames = 81

    def __init__(
        self,
        pipe,
        *,
        frames: int = 81,
        guidance_scale_2: float | None = None,
        **kwargs,
    ):
        # The layout and sizes are checked by check_inputs (base __init__).
        if guidance_scale_2 is not None and pipe.config.get("boundary_ratio") is None:
            raise PipelineInputError("sampler.guidance_scale_2", NO_LOW_NOISE_EXPERT)
        self.frames = frames
        self.expand_timesteps = bool(pipe.config.get("expand_timesteps", False))
        ratio = pipe.config.get("boundary_ratio")
        self.two_experts = ratio is not None
        # The pipeline compares its float32 timestep with this Python float.
        self.boundary_timestep = (
            ratio * pipe.scheduler.config.num_train_timesteps if self.two_experts else None
        )
        self.guidance_scale_2 = guidance_scale_2
        super().__init__(pipe, **kwargs)
        if self.two_experts:
            low = pipe.transformer_2
            if kwargs.get("gradient_checkpointing"):
                low.enable_gradient_checkpointing()
            self.module = WanExperts(pipe.transformer, low)
            self._lora_targets = self._match_lora_targets(self.module)

    @classmethod
    def check_inputs(
        cls, configs: ComponentConfigs, height: int, width: int, frames: int | None
    ) -> None:
        index = configs("pipeline")
        check_layout(
            bool((index.get("transformer") or [None])[0]),
            bool((index.get("transformer_2") or [None])[0]),
            index.get("boundary_ratio"),
        )
        vae = configs("vae")
        downsample = list(vae.get("temperal_downsample", [False, True, True]))
        # Wan 2.2's 48-channel VAE patchifies inside and says its own factors.
        spatial = vae.get("scale_factor_spatial") or 2 ** len(downsample)
        spatial *= configs("transformer")["patch_size"][1]
        temporal = vae.get("scale_factor_temporal") or 2 ** sum(downsample)
        frames = cls.default_frames if frames is None else frames
        why = "the VAE's spatial downsampling times the transformer's patch"
        require_video_sizes(height, width, frames, spatial, temporal, why)

    @classmethod
    def check_guidance_scale_2(cls, configs: ComponentConfigs) -> None:
        """``sampler.guidance_scale_2`` needs a two-expert (A14B) pipeline."""
        if configs("pipeline").get("boundary_ratio") is None:
            raise PipelineInputError("sampler.guidance_scale_2", NO_LOW_NOISE_EXPERT)

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
            prompt=list(prompts),
            negative_prompt=None,
            do_classifier_free_guidance=False,
            num_videos_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        return {"prompt_embeds": embeds}

    # ------------------------------------------------------------------ experts
    def high_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        """Which rows the pipeline gives to the high-noise expert (all, with one expert)."""
        if self.boundary_timestep is None:
            return torch.ones_like(sigma, dtype=torch.bool)
        return sigma * self.num_train_timesteps >= self.boundary_timestep

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        if not self.two_experts:
            return super().velocity(x, sigma, cond, guidance_scale)
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=self.device).reshape(-1)
        sigma = sigma.expand(b) if sigma.numel() == 1 else sigma
        high = self.high_noise(sigma)
        low_scale = guidance_scale
        if self.guidance_scale_2 is not None and guidance_scale != 1.0:
            low_scale = self.guidance_scale_2  # the pipeline guides only when g > 1
        if bool(high.all()) or not bool(high.any()):  # one expert for the whole batch
            scale = guidance_scale if bool(high[0]) else low_scale
            return super().velocity(x, sigma, cond, scale)
        out = torch.empty(x.shape, dtype=torch.float32, device=self.device)
        for rows, scale in ((high, guidance_scale), (~high, low_scale)):
            idx = rows.nonzero().squeeze(1)
            out[idx] = super().velocity(x[idx], sigma[idx], index_cond(cond, idx), scale)
        return out

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance: float):
        timestep = sigma * self.num_train_timesteps
        if self.expand_timesteps:
            # The pipeline's per-token timesteps: one per 2x2 patch of every latent frame.
            _, _, f, h, w = x.shape
            timestep = timestep[:, None].expand(-1, f * ((h + 1) // 2) * ((w + 1) // 2))
        inputs = dict(
            hidden_states=x,
            timestep=timestep,
            encoder_hidden_states=cond["prompt_embeds"],
            return_dict=False,
        )
        if self.two_experts:
            # velocity() hands each call rows of one expert only.
            return self.module(expert=0 if bool(self.high_noise(sigma[:1])) else 1, **inputs)[0]
        return self.module(**inputs)[0]

    def _decode_chunk(self, x: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=x.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=x.device).view(shape)
        z = x.float() * std + mean
        return vae.decode(z.to(vae.dtype), return_dict=False)[0]

    # ------------------------------------------------------------------ export
    def lora_files(self) -> list[tuple[str, str, dict]]:
        """(file name, module prefix, extra ``load_lora_weights`` keywords) per export file.

        Two experts: the high-noise adapter in diffusers' default file (plain
        ``load_lora_weights(DIR)``), the low-noise one in :data:`LOW_NOISE_LORA_FILE`.
        """
        if not self.two_experts:
            return super().lora_files()
        return [
            ("pytorch_lora_weights.safetensors", "transformer.", {}),
            (
                LOW_NOISE_LORA_FILE,
                "transformer_2.",
                {"weight_name": LOW_NOISE_LORA_FILE, "load_into_transformer_2": True},
            ),
        ]


# ---------------------------------------------------------------------- checks before loading
NO_LOW_NOISE_EXPERT = (
    "sampler.guidance_scale_2: it is the low-noise expert's guidance of a two-expert Wan 2.2 "
    "(A14B) pipeline; this one has a single transformer: drop it"
)


def check_layout(has_transformer: bool, has_transformer_2: bool, boundary_ratio) -> None:
    """Raise a :class:`PipelineInputError` for a Wan layout this adapter cannot train."""
    if not has_transformer:
        raise PipelineInputError(
            "model.path",
            "this WanPipeline has no 'transformer' (only transformer_2); the Wan adapter "
            "needs the high-noise expert too: download the full checkpoint",
        )
    if has_transformer_2 != (boundary_ratio is not None):
        raise PipelineInputError(
            "model.path",
            "this WanPipeline has "
            + ("transformer_2 but no boundary_ratio" if has_transformer_2 else "a boundary_ratio")
            + " but not both, which no Wan 2.2 checkpoint has; fix its model_index.json",
        )


ADAPTER = WanModel
