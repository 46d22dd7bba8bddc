"""Tiny random FLUX.2, Qwen-Image and Z-Image pipelines, built offline and saved to disk.

As in ``tiny_pipelines``: every component, tokenizers included, is made in-process. The
Qwen-family tokenizers are byte-level BPE vocabularies with no merges plus the chat
template's special tokens; the text encoders have hidden sizes of 16 and, where the
pipeline reads fixed hidden-state layers (FLUX.2 [klein]: 9, 18, 27), just enough layers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_pipelines import _save, _seeded

#: A Qwen-style chat template: what the pipelines' apply_chat_template calls need.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT_DIM = 16  # hidden size of the tiny Qwen text encoders


def qwen_tokenizer(words: tuple[str, ...] = ()):
    """A Qwen2 tokenizer over the byte-level alphabet, with the chat special tokens.

    ``words`` become single tokens: a pipeline's long system message, which would otherwise
    fill the tiny models' short text window one byte at a time."""
    from tokenizers import AddedToken
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {s: i for i, s in enumerate(sorted(ByteLevel.alphabet()))}
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for t in special:
        vocab[t] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], chat_template=CHAT_TEMPLATE)
    tok.add_tokens([AddedToken(t, special=True) for t in special[1:]], special_tokens=True)
    tok.add_tokens(list(words))
    return tok


def qwen3_config(layers: int, vocab: int):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=TEXT_DIM,
        intermediate_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
    )


def qwen3_encoder(layers: int):
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM(qwen3_config(layers, len(qwen_tokenizer())))


def flux2_vae(latent_channels: int = 4):
    """A three-level AutoencoderKLFlux2 (scale 4, so 32 x 48 px is 4 x 6 tokens), random
    batch-norm statistics so that decoding checks the de-normalisation."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(4, 4, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    with torch.no_grad():
        vae.bn.running_mean.normal_(0.0, 0.3)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def flux2_transformer(text_dim: int, guidance_embeds: bool, latent_channels: int = 4):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_dim,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )


def flux2_scheduler():
    # FLUX.2's released scheduler config: dynamic shifting, the pipeline supplies mu.
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)


def build_flux2_klein(out_dir: str | Path, seed: int = 0, is_distilled: bool = False) -> Path:
    """A tiny Flux2KleinPipeline: Qwen3 text encoder (27 layers of width 16: the pipeline
    stacks layers 9, 18 and 27), CFG (base model) unless ``is_distilled``."""
    from diffusers import Flux2KleinPipeline

    _seeded(seed)
    pipe = Flux2KleinPipeline(
        scheduler=flux2_scheduler(),
        vae=flux2_vae(),
        text_encoder=qwen3_encoder(layers=27),
        tokenizer=qwen_tokenizer(),
        transformer=flux2_transformer(3 * TEXT_DIM, guidance_embeds=False),
        is_distilled=is_distilled,
    )
    return _save(pipe, out_dir)


def mistral3_encoder(layers: int = 30):
    """A tiny Mistral3ForConditionalGeneration (the [dev] text encoder; its vision tower is
    never run for text prompts)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    vocab = len(qwen_tokenizer()) + 2  # + the system message and the image token
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": vocab,
            "hidden_size": TEXT_DIM,
            "intermediate_size": 16,
            "max_position_embeddings": 1024,
            "num_attention_heads": 2,
            "num_hidden_layers": layers,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "sliding_window": None,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 16,
            "image_size": 12,
            "patch_size": 6,
            "num_channels": 3,
        },
        image_token_index=vocab - 1,  # never in a text prompt
    )
    return Mistral3ForConditionalGeneration(config)


def build_flux2_dev(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny Flux2Pipeline ([dev]: guidance embedding, Mistral3 text encoder with 30 layers:
    the pipeline stacks layers 10, 20 and 30).

    Its tokenizer is the Qwen2 tokenizer above rather than Mistral's PixtralProcessor
    (which needs torchvision); the pipeline only calls its ``apply_chat_template``.
    """
    from diffusers import Flux2Pipeline
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    _seeded(seed)
    pipe = Flux2Pipeline(
        scheduler=flux2_scheduler(),
        vae=flux2_vae(),
        text_encoder=mistral3_encoder(),
        tokenizer=qwen_tokenizer(words=(SYSTEM_MESSAGE,)),
        transformer=flux2_transformer(3 * TEXT_DIM, guidance_embeds=True),
    )
    return _save(pipe, out_dir)


def qwen25_vl_encoder(vocab: int):
    """A tiny Qwen2_5_VLForConditionalGeneration (the Qwen-Image text encoder; the vision
    tokens are ids no prompt produces)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": TEXT_DIM,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "vocab_size": vocab + 3,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": TEXT_DIM,
        },
        vocab_size=vocab + 3,
        bos_token_id=0,
        eos_token_id=0,
        vision_start_token_id=vocab,
        vision_end_token_id=vocab + 1,
        vision_token_id=vocab + 2,
        image_token_id=vocab + 2,
        video_token_id=vocab + 2,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def build_qwen_image(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny QwenImagePipeline: a 2-level Qwen-Image VAE (scale 4) with random latent
    statistics, one dual-stream block, a 2-layer Qwen2.5-VL text encoder."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    _seeded(seed)
    z_dim = 4
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=torch.randn(z_dim).mul(0.3).tolist(),
        latents_std=torch.rand(z_dim).add(0.5).tolist(),
    )
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z_dim,
        out_channels=z_dim,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    # Qwen-Image's released scheduler: dynamic shifting from the image token count.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True)
    tokenizer = qwen_tokenizer()
    pipe = QwenImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=qwen25_vl_encoder(len(tokenizer) + 18),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    # The template's system message as 18 tokens, so that its prefix is the 34 tokens the
    # pipeline drops (as with the real tokenizer) and what remains is the prompt's.
    system = pipe.prompt_template_encode.split("system\n", 1)[1].split("<|im_end|>", 1)[0]
    cuts = [round(i * len(system) / 18) for i in range(19)]
    tokenizer.add_tokens([system[a:b] for a, b in zip(cuts, cuts[1:])])
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx
    return _save(pipe, out_dir)


def build_z_image(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny ZImagePipeline: 3-level AutoencoderKL (scale 4), one main layer and one
    refiner layer each, a 2-layer Qwen3 text encoder (the pipeline reads hidden_states[-2]),
    Z-Image-Turbo's static shift 3.0."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Model

    _seeded(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=TEXT_DIM,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # allocated with torch.empty
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(4, 4, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    tokenizer = qwen_tokenizer()
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=Qwen3Model(qwen3_config(2, len(tokenizer))),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return _save(pipe, out_dir)


#: The families' builders by test name: ``flux2`` is [klein] (the paper's FLUX.2 model).
BUILDERS = {
    "flux2": build_flux2_klein,
    "flux2_dev": build_flux2_dev,
    "qwen_image": build_qwen_image,
    "z_image": build_z_image,
}
