"""Which parameters train: LoRA adapters (peft) or the full network.

With LoRA the reference model is the same network with its adapters disabled, so the KL to
the pre-trained model costs no second copy. Full fine-tuning keeps a frozen copy.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from flowdppo.models.base import FlowModel


def apply_finetuning(
    model: FlowModel,
    mode: str,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: list[str] | None = None,
) -> list[nn.Parameter]:
    """Prepare ``model`` for training and return its trainable parameters."""
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        if not targets:
            raise ValueError("LoRA needs target modules: set model.lora_targets")
        names = [n for n, _ in model.module.named_modules() if n]
        # peft's rule: a target names a module exactly or is a dotted suffix of its name
        # ("to_out.0" matches "blocks.3.attn.to_out.0").
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise ValueError(
                f"model.lora_targets {missing} match no module of the network; "
                f"linear layers it has: {sorted(linear_module_names(model.module))}"
            )
        config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0
        )
        model.module = get_peft_model(model.module, config)
    elif mode == "full":
        model.frozen_reference = copy.deepcopy(model.module).requires_grad_(False).eval()
        model.module.requires_grad_(True)
    else:
        raise ValueError(f"model.finetune must be 'lora' or 'full', got {mode!r}")
    params = [p for p in model.module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters after setting up fine-tuning")
    return params


def trainable_state(module: nn.Module) -> dict:
    """The trainable tensors by name: the adapters with LoRA, everything with full tuning."""
    return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}


def linear_module_names(module: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)}


@contextmanager
def lora_folded(module: nn.Module) -> Iterator[None]:
    """Inside the block, every active LoRA layer of ``module`` answers from its base weight
    with the adapter folded in, ``W + scaling * B A``: one matrix product where the adapter
    adds two, a product and a sum, for the same function up to float rounding (the folded
    weight is rounded once). For passes without gradient (``sampler.merge_lora``). The
    base weights are put back exactly afterwards: the originals are kept and restored, not
    unfolded by a subtraction that would round. A network without peft LoRA layers, or
    one whose adapters are disabled (the reference), is left as it is.
    """
    layers = []
    if "peft" in sys.modules:  # no peft imported: no LoRA layer can exist
        from peft.tuners.lora import LoraLayer

        layers = [
            m
            for m in module.modules()
            if isinstance(m, LoraLayer) and not m.merged and not m.disable_adapters
        ]
    saved = []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.get_base_layer().weight
                delta = sum(
                    layer.get_delta_weight(name)
                    for name in layer.active_adapters
                    if name in layer.lora_A
                )
                saved.append((layer, weight, weight.data))
                weight.data = weight.data + delta.to(weight.dtype)
                # peft's disabled path runs the base layer alone, here with the fold.
                layer._disable_adapters = True
        yield
    finally:
        for layer, weight, original in saved:
            weight.data = original
            layer._disable_adapters = False
