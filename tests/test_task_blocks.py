"""The shared pieces of the built-in tasks (flowdppo.tasks.blocks and .pretraining)."""

from __future__ import annotations

import pytest
import torch

from flowdppo.tasks import get_task
from flowdppo.tasks.blocks import (
    TRUNK_DEFAULTS,
    FlowTransformer,
    TokenEncoder,
    patchify,
    trunk_config,
    unpatchify,
    x0_to_velocity,
)
from flowdppo.tasks.common import load_module
from flowdppo.tasks.shapes import ShapesVelocityNet
from flowdppo.tasks.shapes import pretraining as shapes_pretraining
from flowdppo.tasks.text import TextVelocityNet
from flowdppo.tasks.text import pretraining as text_pretraining

#: Each task's pretraining, with a tiny network and batch.
TINY = {
    "shapes": (
        shapes_pretraining,
        {"dim": 32, "depth": 1, "heads": 2, "text_dim": 16, "text_depth": 1, "conv": 4},
        8,
    ),
    "text": (text_pretraining, {"dim": 32, "depth": 1, "heads": 2, "text_dim": 16, "conv": 4}, 4),
}


@pytest.mark.parametrize(
    ("size", "patch"), [((16, 16), (4, 4)), ((32, 128), (8, 4)), ((4, 6, 8), (2, 3, 4))]
)
def test_patchify_cuts_row_major_patches_and_unpatchify_inverts_it(size, patch):
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    h = patchify(x, patch)
    cells = [s // p for s, p in zip(size, patch)]
    assert h.shape == (2, torch.tensor(cells).prod().item(), 3 * torch.tensor(patch).prod().item())
    # The first token is the first patch of every channel, in row-major order.
    first = x[(slice(None), slice(None), *(slice(0, p) for p in patch))].reshape(2, -1)
    assert torch.equal(h[:, 0], first)
    assert torch.equal(unpatchify(h, size, patch), x)


def test_x0_to_velocity_floors_sigma_for_any_rank():
    x, x0 = torch.ones(2, 1, 3, 4, 4), torch.zeros(2, 1, 3, 4, 4)
    v = x0_to_velocity(x, x0, torch.tensor([0.5, 0.0]))
    assert v[0].eq(2.0).all() and v[1].eq(20.0).all()


def test_trunk_config_orders_the_size_first_and_refuses_unknown_arguments():
    assert trunk_config({"dim": 8}, conv=2) == {**TRUNK_DEFAULTS, "dim": 8, "conv": 2}
    assert list(trunk_config({}, patch=4))[-1] == "patch"
    with pytest.raises(TypeError, match="unexpected arguments \\['widht'\\].*dim, depth"):
        ShapesVelocityNet(widht=3)


def test_token_encoder_masks_padding_out_of_attention_and_pooling():
    torch.manual_seed(0)
    enc = TokenEncoder(10, 6, 16, 1, 2, 2, pad_id=0)
    tokens = torch.tensor([[3, 4, 0, 0, 0, 0], [3, 4, 5, 0, 0, 0]])
    t, pooled, bias = enc(tokens)
    short, pooled_short, _ = enc(tokens[:, :2])
    assert torch.allclose(t[0, :2], short[0], atol=1e-6)
    assert torch.allclose(pooled[0], pooled_short[0], atol=1e-6)
    assert bias.shape == (2, 1, 1, 6) and bias[1, 0, 0, 3] == float("-inf")


def test_the_task_networks_are_flow_transformers_with_the_shared_names():
    small = {"dim": 16, "depth": 1, "heads": 2, "text_dim": 8, "conv": 2}
    for net in (ShapesVelocityNet(**small), TextVelocityNet(**small)):
        assert isinstance(net, FlowTransformer)
        names = {n.split(".")[0] for n, _ in net.named_parameters()}
        assert {"text", "time_fc", "text_fc", "stem", "head1", "head2", "inp", "pos"} <= names
        assert {"blocks", "out_ada", "out"} <= names
        assert type(net)(**net.config).config == net.config


@pytest.mark.parametrize("name", sorted(TINY))
def test_pretraining_is_deterministic(tmp_path, name):
    pretraining, config, batch = TINY[name]
    kw = {"steps": 3, "batch_size": batch, "model_config": config, "threads": 1}
    paths = [tmp_path / f"{n}.safetensors" for n in "abc"]
    metas = [pretraining.pretrain_base_model(p, seed=s, **kw)[1] for p, s in zip(paths, (5, 5, 6))]
    a, b, c = (p.read_bytes() for p in paths)
    assert a == b and metas[0] == metas[1]
    assert a != c
    net, meta = load_module(pretraining.RECIPE.net_cls, paths[0], f"{name} base model", name)
    assert net.config == {**net.config, **config} and meta["steps"] == 3 and meta["seed"] == 5
    task = get_task(name)
    model = task.build_model(str(paths[0]))
    with torch.no_grad():
        x = model.initial_noise(1, torch.Generator().manual_seed(0))
        v = model.velocity(x, torch.tensor([0.5]), model.encode(task.train_prompts[:1]), 2.0)
    assert torch.isfinite(v).all()
