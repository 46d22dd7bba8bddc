"""Shapes task model: shipped weights, the adapter, guidance, LoRA, errors, pretraining."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from flowdppo.models.finetune import apply_finetuning
from flowdppo.tasks import get_task, shapes
from flowdppo.tasks.shapes import grammar
from flowdppo.tasks.shapes.model import BASE_WEIGHTS, ShapesAssetError


@pytest.fixture(scope="module")
def model():
    return shapes.load_base_model()


def test_shipped_weights(model):
    path = shapes.assets_dir() / BASE_WEIGHTS
    assert path.stat().st_size < 8 * 2**20
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["config"] == model.module.config and meta["seed"] == 0
    net = model.module
    assert sum(p.numel() for p in net.parameters()) < 2_000_000
    state = load_file(str(path))
    assert {k: v.shape for k, v in state.items()} == {
        k: v.shape for k, v in net.state_dict().items()
    }
    linear = {
        n.rsplit(".", 1)[-1] for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)
    }
    assert set(shapes.LORA_TARGETS) <= linear


def test_adapter_shapes_and_guidance(model):
    prompts = ["a red circle", "three yellow triangles", "a red square left of a blue circle"]
    cond = model.encode(prompts)
    assert cond["tokens"].dtype == torch.long and cond["tokens"].shape == (3, grammar.MAX_TOKENS)
    noise = model.initial_noise(3, torch.Generator().manual_seed(0))
    assert noise.shape == (3, 3, 16, 16)
    assert torch.equal(noise, model.initial_noise(3, torch.Generator().manual_seed(0)))
    sigma = torch.tensor([1.0, 0.5, 0.1])
    with torch.no_grad():
        v1 = model.velocity(noise, sigma, cond)
        v3 = model.velocity(noise, sigma, cond, guidance_scale=3.0)
        vn = model.velocity(noise, sigma, model.encode(["", "", ""]))
        # A scalar sigma broadcasts over the batch.
        vs = model.velocity(noise, torch.tensor(0.5), cond)
        vb = model.velocity(noise, torch.full((3,), 0.5), cond)
    assert v1.shape == noise.shape and torch.isfinite(v1).all()
    torch.testing.assert_close(v3, vn + 3.0 * (v1 - vn), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(v1, vn, atol=1e-3)  # the caption matters
    torch.testing.assert_close(vs, vb)
    images = model.decode(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5))
    assert images.flatten().tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_velocity_reads_the_module_at_call_time_and_lora(model):
    x = model.initial_noise(2, torch.Generator().manual_seed(1))
    cond = model.encode(["a red circle", "two blue squares"])
    sigma = torch.tensor([0.7, 0.3])
    m = shapes.load_base_model()
    params = apply_finetuning(m, "lora", rank=4, alpha=8.0, targets=shapes.LORA_TARGETS)
    assert params and all(p.requires_grad for p in params)
    with torch.no_grad():
        for p in params:
            p.add_(0.05)
        v_lora = m.velocity(x, sigma, cond)
        with m.reference():
            v_ref = m.velocity(x, sigma, cond)
        v_base = model.velocity(x, sigma, cond)
    torch.testing.assert_close(v_ref, v_base)
    assert not torch.allclose(v_lora, v_base, atol=1e-4)


def test_missing_and_corrupt_weights_name_the_path_and_the_fix(tmp_path):
    missing = tmp_path / "none.safetensors"
    with pytest.raises(
        ShapesAssetError,
        match=f"not found at {re.escape(str(missing))}.*flowdppo pretrain --task shapes",
    ):
        shapes.load_base_model(missing)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}garbage")
    with pytest.raises(
        ShapesAssetError, match=f"{re.escape(str(bad))} could not be loaded.*pretrain --task shapes"
    ):
        shapes.load_base_model(bad)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((shapes.assets_dir() / BASE_WEIGHTS).read_bytes()[:5000])
    with pytest.raises(ShapesAssetError, match="could not be loaded"):
        shapes.load_base_model(truncated)
    with pytest.raises(ShapesAssetError):
        get_task("shapes").build_model(str(bad))
