"""The built-in digits task: data, prompts, shipped weights, rewards and pretraining."""

import pytest
import torch
from safetensors.torch import load_file

from flowdppo.rewards import get_reward
from flowdppo.tasks import digits
from flowdppo.tasks.digits.pretrain import classifier_accuracy


@pytest.fixture(scope="module")
def data():
    return digits.load_digits_split()


@pytest.fixture(scope="module")
def model():
    return digits.load_base_model()


def test_data_shape_range_and_split(data):
    assert data.x_train.shape[1:] == (1, 8, 8) and data.x_train.dtype == torch.float32
    assert len(data.y_train) + len(data.y_heldout) == 1797
    assert len(data.y_heldout) == 360  # 20 %, stratified
    for x in (data.x_train, data.x_heldout):
        assert x.min() == -1.0 and x.max() == 1.0
    # Stratified: every class in both parts, in about the same proportion.
    train_counts = torch.bincount(data.y_train, minlength=10).float()
    held_counts = torch.bincount(data.y_heldout, minlength=10).float()
    assert torch.allclose(held_counts / train_counts, torch.full((10,), 0.25), atol=0.02)
    again = digits.load_digits_split()
    assert all(torch.equal(a, b) for a, b in zip(data, again))
    other = digits.load_digits_split(seed=1)
    assert not torch.equal(data.y_heldout, other.y_heldout)


def test_prompts():
    assert digits.TRAIN_PROMPTS == ["zero", "one", "two", "three", "four", "five", "six"]
    assert digits.HELDOUT_PROMPTS == ["seven", "eight", "nine"]
    assert [digits.prompt_to_label(p) for p in digits.DIGIT_NAMES] == list(range(10))
    assert digits.prompt_to_label(" Seven ") == 7
    assert digits.prompts_to_labels(["nine", "zero"]).tolist() == [9, 0]
    with pytest.raises(ValueError, match="unknown digits prompt 'ten'.*zero, one"):
        digits.prompt_to_label("ten")
    with pytest.raises(ValueError, match="unknown digits prompt"):
        digits.prompts_to_labels(["one", "7"])


def test_shipped_model_shapes_guidance_and_decode(model):
    net = model.module
    assert sum(p.numel() for p in net.parameters()) < 1_000_000
    assert (digits.assets_dir() / "digits_base.safetensors").stat().st_size < 4 * 2**20
    linear = {
        n.rsplit(".", 1)[-1] for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)
    }
    assert set(digits.LORA_TARGETS) <= linear
    assert model.shift == 1.0

    cond = model.encode(["zero", "seven", "nine"])
    assert cond["label"].dtype == torch.long and cond["label"].tolist() == [0, 7, 9]
    noise = model.initial_noise(3, torch.Generator().manual_seed(0))
    assert noise.shape == (3, 1, 8, 8)
    assert torch.equal(noise, model.initial_noise(3, torch.Generator().manual_seed(0)))

    sigma = torch.tensor([1.0, 0.5, 0.1])
    with torch.no_grad():
        v1 = model.velocity(noise, sigma, cond)
        v3 = model.velocity(noise, sigma, cond, guidance_scale=3.0)
        null = {"label": torch.full((3,), digits.NULL_LABEL)}
        v_null = model.velocity(noise, sigma, null)
    assert v1.shape == noise.shape and torch.isfinite(v1).all()
    torch.testing.assert_close(v3, v_null + 3.0 * (v1 - v_null), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(v1, v3)

    images = model.decode(torch.randn(5, 1, 8, 8) * 3)
    assert images.shape == (5, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert images.min() == 0 and images.max() == 1


def test_velocity_reads_module_at_call_time(model):
    x = torch.randn(2, 1, 8, 8)
    sigma, cond = torch.full((2,), 0.5), model.encode(["one", "two"])
    trained = model.module
    zero = digits.DigitsVelocityNet(**trained.config)
    torch.nn.init.zeros_(zero.out.weight)
    torch.nn.init.zeros_(zero.out.bias)
    model.frozen_reference = zero
    try:
        with torch.no_grad(), model.reference():
            assert torch.count_nonzero(model.velocity(x, sigma, cond)) == 0
    finally:
        model.frozen_reference = None
    assert model.module is trained


def test_classifier_heldout_accuracy(data):
    accuracy = classifier_accuracy(digits.load_classifier(), data.x_heldout, data.y_heldout)
    assert accuracy >= 0.95


def test_digit_prob_reward_on_real_digits(data):
    reward = get_reward("digit_prob")
    images = (data.x_heldout + 1) / 2
    right = [digits.DIGIT_NAMES[y] for y in data.y_heldout.tolist()]
    wrong = [digits.DIGIT_NAMES[(y + 3) % 10] for y in data.y_heldout.tolist()]
    r_right, r_wrong = reward(images, right), reward(images, wrong)
    assert r_right.shape == (len(right),)
    assert r_right.min() >= 0 and r_right.max() <= 1
    assert r_right.mean() > 0.9 and r_wrong.mean() < 0.05
    with pytest.raises(ValueError, match="unknown digits prompt"):
        reward(images[:1], ["a cat"])


def test_digit_smoothness_reward(data):
    reward = get_reward("digit_smoothness")
    real = reward((data.x_heldout + 1) / 2, ["zero"] * len(data.y_heldout))
    assert 0.4 < real.mean() < 0.65
    blank = reward(torch.zeros(2, 1, 8, 8), ["zero", "one"])
    noisy = reward(torch.randint(0, 2, (2, 1, 8, 8)).float(), ["zero", "one"])
    assert blank.tolist() == [1.0, 1.0] and (noisy < real.mean()).all()


def test_base_model_leaves_headroom(model):
    # The RL setting (10 Euler steps, no guidance) on a small fixed sample; the full
    # numbers are in docs/digits-task.md (benchmarks/digits_base_reward.py).
    res = digits.evaluate_base(
        model,
        digits.TRAIN_PROMPTS,
        samples_per_prompt=32,
        rewards={"digit_prob": get_reward("digit_prob")},
    )["digit_prob"]
    assert 0.3 < res["train"] < 0.8


def test_pretraining_is_deterministic(tmp_path):
    metas = []
    for name in ("a", "b"):
        metas.append(digits.pretrain_base_model(tmp_path / f"{name}.safetensors", steps=20))
        digits.pretrain_classifier(tmp_path / f"clf_{name}.safetensors", epochs=1)
    # Byte-identical files, metadata included.
    for a_file, b_file in (("a", "b"), ("clf_a", "clf_b")):
        a_bytes = (tmp_path / f"{a_file}.safetensors").read_bytes()
        assert a_bytes == (tmp_path / f"{b_file}.safetensors").read_bytes()
    a = load_file(tmp_path / "a.safetensors")
    assert metas[0] == metas[1] and metas[0]["steps"] == 20 and metas[0]["seed"] == 0
    other = digits.pretrain_base_model(tmp_path / "c.safetensors", seed=1, steps=20)
    c = load_file(tmp_path / "c.safetensors")
    assert not torch.equal(a["inp.weight"], c["inp.weight"])
    assert other["seed"] == 1
    # The written file loads as a model.
    loaded = digits.load_base_model(tmp_path / "a.safetensors")
    assert torch.equal(loaded.module.inp.weight, a["inp.weight"])
    assert (tmp_path / "a.json").is_file()


def test_clear_error_on_missing_or_corrupt_weights(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(digits.DigitsAssetError, match=f"not found at {missing}.*flowdppo pretrain"):
        digits.load_base_model(missing)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    with pytest.raises(digits.DigitsAssetError, match=f"{corrupt} could not be loaded.*pretrain"):
        digits.load_base_model(corrupt)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((digits.assets_dir() / "digits_base.safetensors").read_bytes()[:5000])
    with pytest.raises(ValueError, match="flowdppo pretrain"):
        digits.load_base_model(truncated)
    with pytest.raises(ValueError, match="classifier.*flowdppo pretrain"):
        digits.load_classifier(corrupt)


def test_digit_prob_takes_a_classifier_file(tmp_path):
    import shutil

    from flowdppo.tasks.common import assets_dir

    copy = tmp_path / "digits_classifier.safetensors"
    shutil.copy(assets_dir() / "digits_classifier.safetensors", copy)
    images = torch.rand(2, 1, 8, 8)
    shipped = get_reward("digit_prob")(images, ["three", "seven"])
    assert torch.equal(
        get_reward("digit_prob", classifier=str(copy))(images, ["three", "seven"]), shipped
    )
    with pytest.raises(Exception, match="missing.safetensors"):
        get_reward("digit_prob", classifier=str(tmp_path / "missing.safetensors"))
