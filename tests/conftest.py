"""A toy task for fast trainer tests: 2x2x2 latents, an MLP velocity, a brightness reward."""

import threading
from http.server import ThreadingHTTPServer

import pytest
import torch
from torch import nn

from flowdppo.models.base import FlowModel
from flowdppo.rewards import _FACTORIES, register_reward
from flowdppo.tasks import _TASKS, Task, register_task

PROMPTS = ["bright", "dark", "grey"]


class ToyNet(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(len(PROMPTS), 8)
        self.inp = nn.Linear(8 + 8 + 1, 32)
        self.out = nn.Linear(32, 8)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))

    def forward(self, x, sigma, label):
        h = torch.cat([x.flatten(1), self.embed(label), sigma[:, None]], dim=1)
        return self.out(torch.tanh(self.inp(h))).view_as(x)


class ToyModel(FlowModel):
    def __init__(self):
        self.module = ToyNet()

    def encode(self, prompts):
        return {"label": torch.tensor([PROMPTS.index(p) for p in prompts])}

    def initial_noise(self, n, generator):
        return torch.randn(n, 2, 2, 2, generator=generator)

    def velocity(self, x, sigma, cond, guidance_scale=1.0):
        return self.module(x, sigma, cond["label"])

    def decode(self, x):
        return ((x.clamp(-1, 1) + 1) / 2)[:, :1]


def _brightness(images, prompts):
    target = torch.tensor([{"bright": 1.0, "dark": 0.0, "grey": 0.5}[p] for p in prompts])
    return 1 - (images.mean(dim=(1, 2, 3)) - target).abs()


if "toy" not in _TASKS:
    register_reward("toy_brightness")(lambda: _brightness)
    register_reward("toy_contrast")(lambda: lambda images, prompts: images.std(dim=(1, 2, 3)))
    # A broken reward: NaN for every sample.
    register_reward("toy_nan")(
        lambda: lambda images, prompts: torch.full((len(prompts),), float("nan"))
    )

    @register_task("toy")
    def _toy():
        return Task(
            name="toy",
            build_model=lambda weights: ToyModel(),
            default_rewards=["toy_brightness"],
            train_prompts=["bright", "dark"],
            heldout_prompts=["grey"],
            extra={"lora_targets": ["inp", "out"]},
        )


TOY = [
    "task=toy",
    "train.iterations=2",
    "train.prompts_per_iteration=2",
    "train.group_size=4",
    "train.minibatch_size=4",
    "sampler.num_steps=6",
    "sampler.num_sde_steps=2",
    "log.eval_samples_per_prompt=4",
    "log.tensorboard=false",
    "log.checkpoint_every=1",
    "train.lr=1e-2",
]


@pytest.fixture
def toy_overrides():
    return list(TOY)


assert _FACTORIES  # the registry is shared with the package


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: a second thread buys nothing, and
    on a shared machine its spin-waits make every op many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_tiny_pipelines(tmp_path_factory, name: str, builders: dict) -> dict:
    """Run each builder into its own directory under a fresh temporary ``name``, quietly and
    on one thread; the paths by builder name."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(name)
    try:
        return {key: build(root / key) for key, build in builders.items()}
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_pipes(tmp_path_factory) -> dict:
    """Tiny random SD3, FLUX and Wan pipelines built offline and saved to disk, once."""
    pytest.importorskip("diffusers")
    import tiny_pipelines

    builders = {
        "sd3": tiny_pipelines.build_sd3,
        "flux": tiny_pipelines.build_flux,
        "wan": tiny_pipelines.build_wan,
    }
    return build_tiny_pipelines(tmp_path_factory, "pipes", builders)


@pytest.fixture(scope="session")
def tiny_image_pipes(tmp_path_factory) -> dict:
    """Tiny random FLUX.2 ([klein] and [dev]), Qwen-Image and Z-Image pipelines, built
    offline and saved to disk once (tests/tiny_pipelines_image.py)."""
    pytest.importorskip("diffusers")
    import tiny_pipelines_image

    return build_tiny_pipelines(tmp_path_factory, "image-pipes", tiny_pipelines_image.BUILDERS)


def assert_sde_replay_gives_ratio_one(model, guidance_scale: float, steps: int = 6) -> None:
    """With LoRA on and SDE steps, replaying a rollout gives ratio 1 and a finite, nonzero
    gradient: rollout and replay compute the same velocity."""
    from flowdppo.models.finetune import apply_finetuning
    from flowdppo.trainer.rollout import ForwardCounter, SamplerSpec, rollout
    from flowdppo.trainer.update import ObjectiveSpec, step_loss

    apply_finetuning(model, "lora", rank=4, alpha=8, targets=model.default_lora_targets())
    spec = SamplerSpec("flow", model.sigmas(steps), eta=0.7, guidance_scale=guidance_scale)
    prompts = [p for p in ("a red cat", "two dogs on grass") for _ in range(2)]
    group = torch.tensor([0, 0, 1, 1])
    ro = rollout(
        model, prompts, group, spec, [0, 2], torch.Generator().manual_seed(0), ForwardCounter()
    )
    assert ro.states.shape[:2] == (2, 4) and torch.isfinite(ro.final).all()
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    for i in range(2):
        loss, stats = step_loss(
            model,
            ro,
            torch.arange(4),
            i,
            adv,
            spec,
            ObjectiveSpec("dppo", 1e-4, 1e-4),
            ForwardCounter(),
        )
        assert abs(float(stats["ratio_max"]) - 1) < 1e-6
        assert abs(float(stats["ratio_min"]) - 1) < 1e-6
        assert float(stats["kl_max"]) < 1e-10
        loss.mean().backward()
    grads = [p.grad for p in model.module.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.fixture(scope="session")
def tiny_video_pipes(tmp_path_factory) -> dict:
    """Tiny random Wan 2.2 (A14B two experts, TI2V-5B) and HunyuanVideo 1.5 pipelines saved
    to disk, once."""
    pytest.importorskip("diffusers")
    import tiny_pipelines_video

    return build_tiny_pipelines(tmp_path_factory, "video-pipes", tiny_pipelines_video.BUILDERS)


def serve_on_loopback(handler: type) -> tuple[ThreadingHTTPServer, str]:
    """A threaded HTTP server for ``handler`` on 127.0.0.1 (a free port), running in a
    daemon thread; returns it and its ``http://host:port`` root."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    host, port = httpd.server_address[:2]
    return httpd, f"http://{host}:{port}"


class _Killed(BaseException):
    """Stands in for a kill in the middle of an iteration (not caught as an Exception)."""


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
    """A tiny run with TensorBoard, killed twice and resumed twice, as a user would see it.

    6 iterations, a checkpoint every 3, an evaluation every 2 (grids at 0, 2, 4, 6). The
    first kill comes in iteration 5 (iterations 1-4 logged, the checkpoint at 3), the
    second in iteration 6 of the resumed run (4 and 5 logged again); the third attempt
    finishes from the checkpoint at 3.
    """
    from flowdppo.config import load_config
    from flowdppo.trainer.loop import Trainer

    run_dir = tmp_path_factory.mktemp("toy-run") / "run"
    args = TOY + [
        "log.tensorboard=true",
        "train.iterations=6",
        "log.checkpoint_every=3",
        "log.eval_every=2",
        f"log.run_dir={run_dir}",
    ]
    cfg = load_config(None, args)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kill_at in (5, 6, None):
            trainer = Trainer(cfg, run_dir, resume=run_dir.is_dir())
            if kill_at is not None:
                real = trainer.run_iteration

                def run_iteration(real=real, kill_at=kill_at, trainer=trainer):
                    if trainer.iteration + 1 == kill_at:
                        raise _Killed
                    return real()

                trainer.run_iteration = run_iteration
            try:
                trainer.train()
            except _Killed:
                assert kill_at is not None
    finally:
        torch.set_num_threads(before)
    return run_dir


class CrashAfterCheckpoint(Exception):
    """Raised by :func:`crash_after_checkpoint` right after a checkpoint is written."""


def crash_after_checkpoint(monkeypatch, make_trainer, iteration: int) -> None:
    """Train ``make_trainer()`` until it has written the checkpoint of ``iteration``, then
    stop it there as a crash would."""
    from flowdppo.trainer.loop import Trainer

    original = Trainer._checkpoint

    def crash(self):
        original(self)
        if self.iteration == iteration:
            raise CrashAfterCheckpoint

    monkeypatch.setattr(Trainer, "_checkpoint", crash)
    with pytest.raises(CrashAfterCheckpoint):
        make_trainer().train()
    monkeypatch.setattr(Trainer, "_checkpoint", original)


def checkpoint_digests(root, runs, iteration: int) -> list[str]:
    """The checksums of each run's checkpoint of ``iteration`` (equal: bit-identical)."""
    import json

    name = f"ckpt-{iteration:06d}"
    return [json.loads((root / r / name / "state.json").read_text())["sha256"] for r in runs]
