"""HunyuanVideo 1.5 text-to-video (``HunyuanVideo15Pipeline``) as a FlowModel.

Latents are 5-D [B, C, F', H/s, W/s] (the released VAE: C = 32, s = 16, 4x temporal, so
``F' = (frames - 1) / 4 + 1``). The transformer's input is the latents with a zero
condition latent and a zero condition mask concatenated on channels (the pipeline's
text-to-video inputs), plus zero image embeddings of the pipeline's size; its text
conditions are the Qwen2.5-VL hidden states (the pipeline's chat template, cropped) and
the ByT5 glyph embeddings of quoted text in the prompt, each with its attention mask.
The transformer takes ``timestep = sigma * 1000``.

Guidance: the pipeline guides through its ``guider`` (a ``ClassifierFreeGuidance`` whose
``guidance_scale`` is our ``sampler.guidance_scale``, diffusers' formulation ``uncond + g
(cond - uncond)``); the negative prompt (default: empty, as the pipeline) runs in its own
forward, as the pipeline's, combined in float32. A checkpoint whose guider rescales, uses the original formulation or
guides only part of the schedule is refused on load rather than sampled differently.

Schedule: the pipeline's linear sigmas ``1 .. 1/n`` through its Euler scheduler (shift
included). Noise is drawn in the transformer's dtype, as the pipeline does, then kept in
float32. ``model.max_sequence_length`` sets the pipeline's ``tokenizer_max_length`` (the
Qwen tokens kept after the template; default 1000). The VAE decodes one video at a time
(its causal attention mask does not broadcast over a batch in diffusers 0.42).

LoRA: the joint-attention projections of the double-stream blocks (not the text
refiner, nor the last block's text query and output, whose result the model discards). ``HunyuanVideo15Pipeline`` has no ``load_lora_weights``: the export is in
diffusers' transformer-LoRA format, and ``pipe.transformer.load_lora_adapter(DIR)``
loads it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from flowdppo.models.base import Cond
from flowdppo.models.diffusers_adapters.base import (
    JOINT_ATTENTION_LORA_TARGETS,
    ComponentConfigs,
    DiffusersFlowModel,
    PipelineInputError,
    require_video_sizes,
)

#: The diffusers pipeline classes (``model_index.json``'s ``_class_name``) this adapter loads.
PIPELINE_CLASSES = ("HunyuanVideo15Pipeline",)

HUNYUAN_VIDEO15_LORA_TARGETS = JOINT_ATTENTION_LORA_TARGETS


class HunyuanVideo15Model(DiffusersFlowModel):
    pipeline_classes = PIPELINE_CLASSES
    lora_target_suffixes = HUNYUAN_VIDEO15_LORA_TARGETS
    default_max_sequence_length = 1000
    default_resolution = (480, 848)  # the 480p checkpoints' 16:9 size
    default_frames = 121  # the pipeline's
    # Measured (benchmarks/sampler_vs_pipeline.py, CPU): one forward of 2B rows cost
    # 0.87x the pipeline's two of B, the 256 ByT5 tokens' 2048-wide projection and the
    # 729 zero image tokens dominating; two calls, as the pipeline, match it.
    cfg_in_one_forward = False

    def __init__(self, pipe, *, frames: int = 121, **kwargs):
        check_guider(pipe.guider)
        self.frames = frames
        kwargs["decode_batch_size"] = 1
        super().__init__(pipe, **kwargs)
        pipe.tokenizer_max_length = self.max_sequence_length

    @classmethod
    def check_inputs(
        cls, configs: ComponentConfigs, height: int, width: int, frames: int | None
    ) -> None:
        vae, transformer = configs("vae"), configs("transformer")
        spatial = vae.get("spatial_compression_ratio", 16) * transformer.get("patch_size", 1)
        temporal = vae.get("temporal_compression_ratio", 4)
        frames = cls.default_frames if frames is None else frames
        why = "the VAE's spatial compression times the transformer's patch"
        require_video_sizes(height, width, frames, spatial, temporal, why)

    def _match_lora_targets(self, module: nn.Module) -> list[str]:
        # The token refiner's attention has the same names; LoRA stays on the main blocks.
        # The last block's text stream is discarded after it, so its text query and text
        # output projections would train nothing.
        last = f"transformer_blocks.{self.transformer_config.num_layers - 1}.attn."
        dead = {last + "add_q_proj", last + "to_add_out"}
        return [
            n
            for n in super()._match_lora_targets(module)
            if n.startswith("transformer_blocks.") and n not in dead
        ]

    def latent_shape(self, n: int) -> tuple[int, ...]:
        s = self.pipe.vae_scale_factor_spatial
        f = (self.frames - 1) // self.pipe.vae_scale_factor_temporal + 1
        return (n, self.pipe.num_channels_latents, f, self.height // s, self.width // s)

    def _noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        # The pipeline draws its latents in the transformer's dtype (one call, whole batch).
        shape = self.latent_shape(n)
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=self.dtype)
        return noise.float()

    @property
    def image_seq_len(self) -> int:
        _, _, f, h, w = self.latent_shape(1)
        c = self.transformer_config
        return (f // c.patch_size_t) * (h // c.patch_size) * (w // c.patch_size)

    def _pipeline_base_sigmas(self, num_steps: int):
        return np.linspace(1.0, 0.0, num_steps + 1)[:-1]

    def _encode_batch(self, prompts: list[str]) -> Cond:
        embeds, mask, embeds_2, mask_2 = self.pipe.encode_prompt(
            prompt=list(prompts),
            device=self.device,
            dtype=self.dtype,
            batch_size=len(prompts),
        )
        return {
            "prompt_embeds": embeds,
            "prompt_embeds_mask": mask,
            "prompt_embeds_2": embeds_2,
            "prompt_embeds_mask_2": mask_2,
        }

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance: float):
        b = x.shape[0]
        # Text-to-video: no condition frames, so a zero condition latent and mask.
        inputs = torch.cat([x, torch.zeros_like(x), x.new_zeros(b, 1, *x.shape[2:])], dim=1)
        image_embeds = x.new_zeros(
            b, self.pipe.vision_num_semantic_tokens, self.pipe.vision_states_dim
        )
        return self.module(
            hidden_states=inputs,
            image_embeds=image_embeds,
            timestep=(sigma * self.num_train_timesteps).to(x.dtype),
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_attention_mask=cond["prompt_embeds_mask"],
            encoder_hidden_states_2=cond["prompt_embeds_2"],
            encoder_attention_mask_2=cond["prompt_embeds_mask_2"],
            return_dict=False,
        )[0]

    def _decode_chunk(self, x: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        z = x.float() / vae.config.scaling_factor
        return vae.decode(z.to(vae.dtype), return_dict=False)[0]


def check_guider(guider) -> None:
    """Refuse a guider whose guidance is not plain CFG over the whole schedule (on load:
    its config is a guider/ file, not one of the JSON configs read before loading)."""
    if guider is None:
        return
    config = dict(getattr(guider, "config", {}))
    odd = {
        k: config[k]
        for k, plain in (
            ("guidance_rescale", 0.0),
            ("use_original_formulation", False),
            ("start", 0.0),
            ("stop", 1.0),
        )
        if k in config and config[k] != plain
    }
    if odd:
        raise PipelineInputError(
            "model.path",
            f"this HunyuanVideo15Pipeline's guider sets {odd}; flowdppo's guidance is plain "
            "classifier-free guidance at every step (sampler.guidance_scale): reset those "
            "keys in guider/guider_config.json",
        )


ADAPTER = HunyuanVideo15Model
