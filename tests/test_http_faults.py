"""An HTTP reward server that dies or stalls mid-answer, alone and under a training run.

Complements the hang / 5xx / dead-port tests in ``test_rewards_real.py``: here the server
drops the connection without answering, sends half an answer, stalls after its headers,
trickles its answer a byte at a time, or disappears between two requests. Each ends in a bounded number of attempts and a
``RewardServerError`` naming the URL; in a training run, in a ``TrainingError`` naming
the reward, with the checkpoints intact and a resume that loses nothing.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from flowdppo.config import load_config
from flowdppo.rewards import _FACTORIES, register_reward
from flowdppo.rewards import http as http_rewards
from flowdppo.trainer import checkpoint as ckpt
from flowdppo.trainer.loop import Trainer, TrainingError, metrics_of

ROOT = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location(
        "reward_server", ROOT / "examples/reward_server.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Server:
    """The example reward server, with a switch that makes it misbehave."""

    def __init__(self):
        self.mode = "ok"
        self.requests = 0
        self.release = threading.Event()
        healthy = _example().make_handler(_example().score)
        server = self

        class Handler(healthy):
            def do_POST(self):
                server.requests += 1
                if server.mode == "ok":
                    return super().do_POST()
                self.rfile.read(int(self.headers["Content-Length"]))
                if server.mode == "drop":  # the process behind it died mid-request
                    self.close_connection = True
                    return
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                if server.mode == "half":  # died while answering
                    self.wfile.write(b'{"rewards": [0.')
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if server.mode == "trickle":  # a byte every 0.1 s, for up to 100 s
                    for _ in range(1000):
                        if server.release.wait(0.1):
                            return
                        self.wfile.write(b" ")
                        self.wfile.flush()
                    return
                server.release.wait(10)  # "stall": headers sent, then nothing

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        host, port = self.httpd.server_address[:2]
        self.url = f"http://{host}:{port}/"

    def stop(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.stop()


def _images(n=2):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "mode,reason",
    [
        ("drop", "Remote end closed connection without response"),
        ("half", "IncompleteRead"),
        ("stall", "timed out"),
    ],
)
def test_server_dying_or_stalling_mid_answer(server, mode, reason):
    server.mode = mode
    reward = http_rewards.HttpReward(server.url, timeout=0.3, retries=2, backoff=0.01)
    t0 = time.monotonic()
    with pytest.raises(http_rewards.RewardServerError, match=reason) as err:
        reward(_images(), ["a", "b"])
    assert f"reward server {server.url} gave no usable answer after 3 attempts" in str(err.value)
    assert server.requests == 3  # bounded retries, no more
    assert time.monotonic() - t0 < 5


def test_server_gone_between_requests(server):
    reward = http_rewards.HttpReward(server.url, timeout=0.5, retries=1, backoff=0.01)
    assert reward(_images(), ["a", "b"]).shape == (2,)
    server.stop()
    with pytest.raises(http_rewards.RewardServerError, match="after 2 attempts.*failed"):
        reward(_images(), ["a", "b"])


_CURRENT: dict[str, str] = {}  # the URL the "toy_http" reward asks


def test_training_stops_clearly_when_the_server_dies_and_resumes_after(
    server, tmp_path, toy_overrides
):
    if "toy_http" not in _FACTORIES:
        register_reward("toy_http")(
            lambda: http_rewards.HttpReward(_CURRENT["url"], timeout=0.5, retries=1, backoff=0.01)
        )
    _CURRENT["url"] = server.url
    cfg = load_config(None, toy_overrides + ["reward.names=[toy_http]", "train.iterations=3"])
    Trainer(cfg, tmp_path / "reference").train()

    # The server dies after 3 requests: the evaluation before training (2, one per
    # prompt split) and iteration 1's scoring; iteration 2's scoring fails.
    run = tmp_path / "run"
    trainer = Trainer(cfg, run)
    reward = trainer.rewards["toy_http"]
    post, calls = reward._post, [0]

    def dies_after_three(payload):
        calls[0] += 1
        if calls[0] > 3:
            server.mode = "drop"
        return post(payload)

    reward._post = dies_after_three
    with pytest.raises(TrainingError) as err:
        trainer.train()
    assert str(err.value).startswith(
        f"reward 'toy_http' raised RewardServerError: reward server {server.url} gave no "
        "usable answer after 2 attempts"
    )
    assert ckpt.latest_checkpoint(run).name == "ckpt-000001"
    ckpt.load_checkpoint(run / "ckpt-000001")
    assert [r["iteration"] for r in metrics_of(run)] == [1]

    server.mode = "ok"  # the server is back: resuming loses nothing
    Trainer(cfg, run, resume=True).train()

    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]

    assert strip(metrics_of(run)) == strip(metrics_of(tmp_path / "reference"))
    assert len(metrics_of(run)) == 3


def test_a_trickling_server_is_cut_off_at_the_timeout(server):
    """Each byte arrives within the socket timeout, the whole answer does not."""
    server.mode = "trickle"
    reward = http_rewards.HttpReward(server.url, timeout=0.4, retries=0)
    t0 = time.monotonic()
    with pytest.raises(http_rewards.RewardServerError, match="timed out"):
        reward(_images(), ["a", "b"])
    assert time.monotonic() - t0 < 1.5 and server.requests == 1
