"""Which parameters train: LoRA adapters (peft) or the full network.

With LoRA the reference model is the same network with its adapters disabled, so the KL to
the pre-trained model costs no second copy. Full fine-tuning keeps a frozen copy.
"""

from __future__ import annotations

import copy

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
