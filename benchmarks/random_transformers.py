"""Random-weight transformers with the published shapes of SD3.5-Medium, FLUX.2 [klein] and
Wan 2.1 T2V 1.3B, seen as FlowModels, for the memory and GPU-throughput benchmarks.

No weights are needed: each network is built from its config (written out below, from the
models' published ``transformer/config.json``) with random weights, and conditioned on
random text embeddings of the text encoders' shapes. Speed and memory do not depend on the
weights' values. ``tiny=True`` keeps every structural setting and shrinks widths, depths
and text lengths so that the whole network runs on a CPU in milliseconds.

Sources of the configs: SD3.5-M and Wan 2.1 1.3B, their diffusers ``transformer/config.json``
on the hub (stabilityai/stable-diffusion-3.5-medium, Wan-AI/Wan2.1-T2V-1.3B-Diffusers);
FLUX.2 [klein] 4B, the diffusers config of black-forest-labs/FLUX.2-klein-base-4B (24
heads x 128, 5 double + 20 single blocks, text width 7680 from three Qwen3-4B layers);
9B, InvokeAI's FLUX.2 parameter presets (32 heads x 128, 8 + 24 blocks, text width 12288;
one other source gives 6 double blocks: treat the 9B row as approximate).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flowdppo.models.base import Cond, FlowModel


@dataclass
class Shape:
    cls: str  # diffusers class name
    config: dict
    text_tokens: int  # text sequence length the pipeline uses
    latent_channels: int = 16
    vae_factor: int = 8  # pixels per latent cell
    video: bool = False
    tiny: dict = field(default_factory=dict)  # config overrides at toy size


def _klein(double: int, single: int, heads: int, text_width: int) -> Shape:
    """FLUX.2 [klein]: the sizes differ in depth, heads and text width only."""
    return Shape(
        "Flux2Transformer2DModel",
        dict(
            patch_size=1,
            in_channels=128,
            num_layers=double,
            num_single_layers=single,
            attention_head_dim=128,
            num_attention_heads=heads,
            joint_attention_dim=text_width,
            mlp_ratio=3.0,
            axes_dims_rope=(32, 32, 32, 32),
            rope_theta=2000,
            timestep_guidance_channels=256,
            guidance_embeds=False,
        ),
        text_tokens=512,
        latent_channels=128,  # 32 VAE channels, 2 x 2 patches packed per token
        vae_factor=16,
        tiny=dict(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            axes_dims_rope=(4, 4, 4, 4),
        ),
    )


SHAPES: dict[str, Shape] = {
    "sd35m": Shape(
        "SD3Transformer2DModel",
        dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)),
            qk_norm="rms_norm",
        ),
        text_tokens=333,  # 77 CLIP + 256 T5 tokens
        tiny=dict(
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=16,
            dual_attention_layers=(0,),
            pos_embed_max_size=32,
        ),
    ),
    "flux2-klein-4b": _klein(5, 20, 24, 7680),
    "flux2-klein-9b": _klein(8, 24, 32, 12288),
    "wan21-1.3b": Shape(
        "WanTransformer3DModel",
        dict(
            patch_size=(1, 2, 2),
            num_attention_heads=12,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=8960,
            num_layers=30,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            rope_max_seq_len=1024,
        ),
        text_tokens=512,
        video=True,
        tiny=dict(
            num_attention_heads=2,
            attention_head_dim=12,
            text_dim=32,
            freq_dim=32,
            ffn_dim=32,
            num_layers=2,
            rope_max_seq_len=32,
        ),
    ),
}

TINY_TEXT = {"tokens": 8}


def config_of(name: str, tiny: bool) -> dict:
    shape = SHAPES[name]
    return {**shape.config, **(shape.tiny if tiny else {})}


class RandomTransformer(FlowModel):
    """A random-weight transformer of one of :data:`SHAPES` as a FlowModel.

    ``frames`` (video only) are pixel frames, 1 + 4 k as for Wan's VAE. The reference is
    the network with LoRA disabled (the trainer's setting); ``encode`` gives every prompt
    the same random embedding (speed and memory depend on shapes only).
    """

    def __init__(
        self,
        name: str,
        resolution: int,
        frames: int = 1,
        tiny: bool = False,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        overrides: dict | None = None,
    ):
        import diffusers

        self.name, self.shape = name, SHAPES[name]
        self.tiny = tiny
        self.device = torch.device(device)
        self.dtype = dtype
        self.resolution, self.frames = resolution, frames
        torch.manual_seed(0)
        cls = getattr(diffusers, self.shape.cls)
        self.module = cls(**{**config_of(name, tiny), **(overrides or {})}).eval()
        self.module.to(self.device)
        if dtype != torch.float32:
            self.module.to(dtype)
        self.module.requires_grad_(False)
        tokens = TINY_TEXT["tokens"] if tiny else self.shape.text_tokens
        config = self.module.config
        dim = config.get("joint_attention_dim") or config.get("text_dim")
        g = torch.Generator().manual_seed(1)
        self._text = torch.randn(1, tokens, dim, generator=g).to(self.device, dtype)
        pooled = config.get("pooled_projection_dim")
        self._pooled = (
            torch.randn(1, pooled, generator=g).to(self.device, dtype) if pooled else None
        )

    # ---------------------------------------------------------------- shapes
    def latent_shape(self, n: int) -> tuple[int, ...]:
        side = self.resolution // self.shape.vae_factor
        if self.shape.video:
            return (n, self.shape.latent_channels, (self.frames - 1) // 4 + 1, side, side)
        return (n, self.shape.latent_channels, side, side)

    def tokens(self) -> int:
        """Image (or video) tokens of one sample."""
        _, _, *grid = self.latent_shape(1)
        patch = self.module.config.patch_size
        patch = patch if isinstance(patch, tuple | list) else (1,) * (len(grid) - 2) + (patch,) * 2
        out = 1
        for g, p in zip(grid, patch):
            out *= g // p
        return out

    def text_tokens(self) -> int:
        return self._text.shape[1]

    def parameters_count(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    # ---------------------------------------------------------------- FlowModel
    def encode(self, prompts: list[str]) -> Cond:
        n = len(prompts)
        cond = {"text": self._text.expand(n, -1, -1)}
        if self._pooled is not None:
            cond["pooled"] = self._pooled.expand(n, -1)
        return cond

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(self.latent_shape(n), generator=generator).to(self.device)

    def velocity(self, x, sigma, cond, guidance_scale: float = 1.0):
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(b)
        sigma = sigma.to(self.device)
        h = x.to(self.device, self.dtype)
        text = cond["text"].to(self.device)
        if guidance_scale != 1.0:  # batched classifier-free guidance, as the adapters do
            h, sigma = torch.cat([h, h]), torch.cat([sigma, sigma])
            text = torch.cat([text, text])
            cond = {**cond, "pooled": torch.cat([cond["pooled"]] * 2)} if "pooled" in cond else cond
        out = self._call(h, sigma, text, cond).float()
        if guidance_scale == 1.0:
            return out
        uncond, pos = out.chunk(2)
        return uncond + guidance_scale * (pos - uncond)

    def _call(self, h, sigma, text, cond):
        net = self.module
        kind = self.shape.cls
        if kind == "SD3Transformer2DModel":
            return net(
                hidden_states=h,
                timestep=sigma * 1000,
                encoder_hidden_states=text,
                pooled_projections=cond["pooled"].to(self.device),
                return_dict=False,
            )[0]
        if kind == "WanTransformer3DModel":
            return net(
                hidden_states=h,
                timestep=sigma * 1000,
                encoder_hidden_states=text,
                return_dict=False,
            )[0]
        # FLUX.2: latents as a sequence of tokens with 4-axis position ids (t, h, w, l).
        b, c, hh, ww = h.shape
        seq = h.flatten(2).transpose(1, 2)
        grid = torch.stack(
            torch.meshgrid(
                torch.zeros(1),
                torch.arange(hh).float(),
                torch.arange(ww).float(),
                torch.zeros(1),
                indexing="ij",
            ),
            dim=-1,
        ).reshape(-1, 4)
        txt = torch.zeros(text.shape[1], 4)
        txt[:, 3] = torch.arange(text.shape[1])
        out = net(
            hidden_states=seq,
            encoder_hidden_states=text,
            timestep=sigma.to(h.dtype),
            img_ids=grid.to(self.device),
            txt_ids=txt.to(self.device),
            return_dict=False,
        )[0]
        return out.transpose(1, 2).reshape(b, c, hh, ww)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("the benchmarks time the transformer, not a VAE")
