"""Fully sharded data parallel (``train.distributed=fsdp``) with PyTorch's FSDP2.

:func:`shard_model` applies ``torch.distributed.fsdp.fully_shard`` to every block of the
network (each element of its outermost ``nn.ModuleList``s, the usual layout of transformer
blocks) and then to the whole network, so each process stores ``1/W`` of every parameter,
gradient and optimizer state (parameters become ``DTensor``s sharded on their first
dimension). A block's parameters are gathered just before its forward or backward and freed
after it; the parameters outside the blocks (embeddings, output layers) are gathered for
the whole network's forward and backward and freed after each. The module object is changed in place, so the model adapter's ``velocity``, peft's
``disable_adapter()`` (the LoRA reference) and the frozen copy of full fine-tuning all keep
working; every forward is a collective, though, so every process must run the same forwards.

Checkpoints keep the one-process format: :func:`full_state` gathers the full trainable
tensors and optimizer state onto rank 0's CPU with
``torch.distributed.checkpoint.state_dict`` and renames the optimizer's parameter names to
the integer ids of ``Optimizer.state_dict()``; :func:`load_full_state` does the reverse. A
checkpoint written under FSDP therefore resumes under FSDP, DDP or one process, and back.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from flowdppo.trainer.guards import TrainingError


def shard_blocks(module: nn.Module) -> list[str]:
    """Names of the submodules sharded on their own: elements of the outermost ModuleLists."""
    picked: list[str] = []
    for name, child in module.named_modules():
        if not isinstance(child, nn.ModuleList):
            continue
        if any(name.startswith(p + ".") for p in picked):
            continue  # a list inside a block already picked (e.g. attention's to_out)
        for i, block in enumerate(child):
            if any(True for _ in block.parameters()):
                picked.append(f"{name}.{i}" if name else str(i))
    return picked


def shard_module(module: nn.Module) -> list[str]:
    """``fully_shard`` every block of ``module``, then ``module`` itself; the block names."""
    blocks = shard_blocks(module)
    for name in blocks:
        fully_shard(module.get_submodule(name))
    # FSDP2 keeps the root's own parameters gathered after a forward by default (a backward
    # usually follows). Rollouts and the reference run forwards without a backward, so
    # reshard the root too: between forwards a process holds only its shards.
    fully_shard(module, reshard_after_forward=True)
    return blocks


def shard_model(model) -> list[nn.Parameter]:
    """Shard a :class:`FlowModel`'s network (and a full fine-tuning reference copy).

    Returns the trainable parameters (now sharded ``DTensor``s) for the optimizer.
    """
    shard_module(model.module)
    if model.frozen_reference is not None:
        shard_module(model.frozen_reference)
    return [p for p in model.module.parameters() if p.requires_grad]


def _optimizer_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter name of each integer id ``Optimizer.state_dict()`` uses."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def full_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full trainable tensors and optimizer state, as a one-process checkpoint holds them.

    A collective: every process must call it. Only rank 0 gets the tensors (on the CPU);
    the other processes get empty dicts.
    """
    model_state = get_model_state_dict(module, options=_FULL)
    named = get_optimizer_state_dict(module, optimizer, options=_FULL)
    if not named:
        return model_state, {}
    ids = {name: i for i, name in enumerate(_optimizer_names(module, optimizer))}
    optim_state = {
        "state": {ids[name]: value for name, value in named["state"].items()},
        "param_groups": [
            dict(g, params=[ids[name] for name in g["params"]]) for g in named["param_groups"]
        ],
    }
    return model_state, optim_state


def load_full_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict
) -> None:
    """Load a full checkpoint state (every process holds it) into the sharded model."""
    names = _optimizer_names(module, optimizer)
    try:
        named = {
            "state": {names[int(i)]: value for i, value in optim_state["state"].items()},
            "param_groups": [
                dict(g, params=[names[int(i)] for i in g["params"]])
                for g in optim_state["param_groups"]
            ],
        }
    except (IndexError, KeyError, ValueError) as exc:
        raise TrainingError(
            f"the checkpoint's optimizer state does not match this model's {len(names)} "
            f"trainable parameters ({type(exc).__name__}: {exc})"
        ) from exc
    load = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(module, model_state, options=load)
    set_optimizer_state_dict(module, optimizer, named, options=load)


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sharded tensors kept beside the model (DiffusionNFT's old model, the EMA) in full, on
    the CPU. A collective for sharded ones: every process must call it."""
    return {
        name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()
        for name, t in tensors.items()
    }
