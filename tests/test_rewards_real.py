"""Real-model rewards on a tiny random CLIP saved to disk, JPEG size, and the HTTP client
against the example server (and against servers that hang, die or miscount), on loopback."""

from __future__ import annotations

import importlib.util
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from flowdppo.rewards import get_reward, vision
from flowdppo.rewards import http as http_rewards

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "two dogs"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    import tiny_pipelines

    return tiny_pipelines.build_clip_model(tmp_path_factory.mktemp("clip"))


def _images(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Quantised to 8 bits, so that a PIL round trip (the processor's path) is lossless.
    return (torch.rand(n, 3, size, size, generator=g) * 255).round() / 255


# ---------------------------------------------------------------- CLIP-based rewards
def test_clip_score_matches_transformers_clip(clip_dir, monkeypatch):
    from transformers import CLIPModel, CLIPProcessor

    monkeypatch.setenv("FLOWDPPO_CLIP_PATH", str(clip_dir))
    reward = get_reward("clip_score")
    images = _images()
    ours = reward(images, PROMPTS)

    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    pil = [_to_pil(i) for i in images]
    inputs = processor(text=PROMPTS, images=pil, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    expected = (out.image_embeds * out.text_embeds).sum(-1)
    assert ours.shape == (2,) and ours.dtype == torch.float32
    assert torch.allclose(ours, expected, atol=1e-5)
    assert (ours.abs() <= 1).all()


def _to_pil(image):
    from PIL import Image

    arr = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def test_videos_are_scored_per_frame_and_averaged(clip_dir):
    reward = vision.clip_score(path=str(clip_dir), device="cpu")
    video = torch.stack([_images(3, seed=1), _images(3, seed=2)])  # [B=2, F=3, 3, H, W]
    video = video.permute(0, 2, 1, 3, 4)  # [B, 3, F, H, W]
    scores = reward(video, PROMPTS)
    per_frame = [reward(video[:, :, f], PROMPTS) for f in range(3)]
    assert torch.allclose(scores, torch.stack(per_frame).mean(0), atol=1e-6)


def test_other_resolutions_are_resized(clip_dir):
    reward = vision.clip_score(path=str(clip_dir), device="cpu")
    assert torch.isfinite(reward(_images(size=48), PROMPTS)).all()
    assert torch.isfinite(reward(torch.rand(2, 3, 40, 64), PROMPTS)).all()


def test_pickscore_is_scaled_cosine(clip_dir):
    pick = vision.pickscore(path=str(clip_dir), processor_path=str(clip_dir), device="cpu")
    clip = vision.clip_score(path=str(clip_dir), device="cpu")
    images = _images()
    from transformers import CLIPModel

    scale = CLIPModel.from_pretrained(clip_dir).logit_scale.exp().item()
    assert torch.allclose(pick(images, PROMPTS), scale * clip(images, PROMPTS), atol=1e-4)


def test_aesthetic_head_on_clip_embedding(clip_dir, tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    state = {
        "layers.0.weight": torch.randn(16, 32, generator=g),
        "layers.0.bias": torch.randn(16, generator=g),
        "layers.2.weight": torch.randn(1, 16, generator=g),
        "layers.2.bias": torch.randn(1, generator=g),
    }
    save_file(state, tmp_path / "head.safetensors")
    reward = vision.aesthetic(path=str(clip_dir), head=str(tmp_path / "head.safetensors"))
    images = _images()
    emb = vision.ClipEmbedder(str(clip_dir), device="cpu").images(images)
    h = emb @ state["layers.0.weight"].T + state["layers.0.bias"]
    expected = (h @ state["layers.2.weight"].T + state["layers.2.bias"]).squeeze(-1)
    assert torch.allclose(reward(images, PROMPTS), expected, atol=1e-5)

    save_file({"layers.0.weight": torch.zeros(1, 768)}, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="takes 768-dim embeddings but the CLIP model"):
        vision.aesthetic(path=str(clip_dir), head=str(tmp_path / "wide.safetensors"))


def test_missing_paths_say_what_to_set(monkeypatch, tmp_path):
    monkeypatch.delenv("FLOWDPPO_CLIP_PATH", raising=False)
    with pytest.raises(ValueError, match="FLOWDPPO_CLIP_PATH"):
        get_reward("clip_score")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vision.clip_score(path=str(tmp_path / "missing"))
    monkeypatch.delenv("FLOWDPPO_AESTHETIC_HEAD", raising=False)
    with pytest.raises(ValueError, match="FLOWDPPO_AESTHETIC_HEAD"):
        vision.aesthetic(path=str(tmp_path))
    with pytest.raises(ValueError, match=r"images \[B, 3, H, W\] or videos"):
        vision.jpeg_compressibility()(torch.rand(3, 8, 8), ["a"])


def test_jpeg_compressibility_prefers_flat_images():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    fn = get_reward("jpeg_compressibility")
    assert fn(flat, ["x"]).item() > fn(noise, ["x"]).item()
    size = get_reward("jpeg_incompressibility")(noise, ["x"]).item()
    assert size == pytest.approx(-fn(noise, ["x"]).item()) and size > 1


# ---------------------------------------------------------------- the HTTP reward
def _example_server_module():
    spec = importlib.util.spec_from_file_location(
        "reward_server", ROOT / "examples/reward_server.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _serve(server):
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"


@pytest.fixture
def example_server():
    server = _example_server_module().make_server("127.0.0.1", 0)
    yield _serve(server)
    server.shutdown()
    server.server_close()


def test_http_reward_against_the_example_server(example_server, monkeypatch):
    monkeypatch.setenv("FLOWDPPO_REWARD_URL", example_server)
    reward = get_reward("http")
    images = _images(5)
    reward.batch_size = 2  # three requests
    scores = reward(images, [f"p{i}" for i in range(5)])
    assert torch.allclose(scores, images.mean(dim=(1, 2, 3)), atol=1e-6)
    video = torch.rand(2, 3, 4, 8, 8)
    assert torch.allclose(reward(video, PROMPTS), video.mean(dim=(1, 2, 3, 4)), atol=3e-3)


def _handler(behaviour, log):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            log.append(time.monotonic())
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, answer = behaviour(body)
            if status is None:
                return  # hang: the client's timeout must end it
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture
def odd_server():
    servers, release = [], threading.Event()

    def start(behaviour):
        log: list[float] = []
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(behaviour, log))
        server.daemon_threads = True
        servers.append(server)
        return _serve(server), log

    yield start, release
    release.set()
    for s in servers:
        s.shutdown()
        s.server_close()


def test_http_timeout_is_bounded_and_names_the_url(odd_server):
    start, release = odd_server

    def hang(body):
        release.wait(10)
        return None, None

    url, log = start(hang)
    reward = http_rewards.HttpReward(url, timeout=0.3, retries=1, backoff=0.05)
    t0 = time.monotonic()
    with pytest.raises(http_rewards.RewardServerError, match="timed out") as err:
        reward(_images(1), ["x"])
    assert url in str(err.value) and "2 attempts" in str(err.value)
    assert time.monotonic() - t0 < 3 and len(log) == 2


def test_http_retries_server_errors_then_succeeds(odd_server):
    start, _ = odd_server
    calls = []

    def flaky(body):
        calls.append(1)
        if len(calls) == 1:
            return 503, {"error": "warming up"}
        return 200, {"rewards": [0.25] * len(body["images"])}

    url, _ = start(flaky)
    reward = http_rewards.HttpReward(url, timeout=2, retries=2, backoff=0.01)
    assert reward(_images(2), PROMPTS).tolist() == [0.25, 0.25] and len(calls) == 2


def test_http_wrong_count_and_bad_request_are_not_retried(odd_server):
    start, _ = odd_server
    url, log = start(lambda body: (200, {"rewards": [1.0]}))
    reward = http_rewards.HttpReward(url, timeout=2, retries=3, backoff=0.01)
    with pytest.raises(http_rewards.RewardServerError, match="returned 1 rewards for 2 images"):
        reward(_images(2), PROMPTS)
    url, log = start(lambda body: (400, {"error": "no"}))
    reward = http_rewards.HttpReward(url, timeout=2, retries=3, backoff=0.01)
    with pytest.raises(http_rewards.RewardServerError, match="HTTP 400"):
        reward(_images(2), PROMPTS)
    assert len(log) == 1
    url, log = start(lambda body: (200, {"scores": []}))
    with pytest.raises(http_rewards.RewardServerError, match="not JSON of the form"):
        http_rewards.HttpReward(url, timeout=2)(_images(1), ["x"])


def test_http_dead_server_fails_after_retries():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    reward = http_rewards.HttpReward(url, timeout=1, retries=2, backoff=0.01)
    with pytest.raises(http_rewards.RewardServerError, match=f"{url} gave no usable answer"):
        reward(_images(1), ["x"])


def test_http_configuration_errors(monkeypatch):
    monkeypatch.delenv("FLOWDPPO_REWARD_URL", raising=False)
    with pytest.raises(ValueError, match="FLOWDPPO_REWARD_URL"):
        get_reward("http")
    with pytest.raises(ValueError, match="http:// or https://"):
        http_rewards.HttpReward("localhost:8000")


# ---------------------------------------------------------------- the registry
def test_registry_imports_reward_modules_lazily_and_without_transformers():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from flowdppo.rewards import available_rewards, get_reward\n"
        "assert 'flowdppo.rewards.vision' not in sys.modules\n"
        "assert {'clip_score', 'pickscore', 'aesthetic', 'http'} <= set(available_rewards())\n"
        "get_reward('jpeg_compressibility', quality=50)\n"
        "get_reward('http', url='http://127.0.0.1:9/')\n"
        "assert 'flowdppo.rewards.vision' in sys.modules\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_reward_options_are_passed_and_checked(clip_dir):
    images = _images()
    low = get_reward("jpeg_incompressibility", quality=10)(images, PROMPTS)
    high = get_reward("jpeg_incompressibility", quality=95)(images, PROMPTS)
    assert (high > low).all()  # the option reached the factory
    direct = vision.clip_score(path=str(clip_dir), device="cpu")(images, PROMPTS)
    named = get_reward("clip_score", path=str(clip_dir), device="cpu")(images, PROMPTS)
    assert torch.equal(direct, named)
    with pytest.raises(ValueError, match="takes path, device, batch_size"):
        get_reward("clip_score", pth="/x")
    from flowdppo.rewards import _FACTORIES, register_reward

    if "test_no_options" not in _FACTORIES:
        register_reward("test_no_options")(lambda: lambda images, prompts: images.mean((1, 2, 3)))
    with pytest.raises(ValueError, match="takes no options"):
        get_reward("test_no_options", scale=2)
