"""The ``vlm`` reward against a fake OpenAI-compatible judge on 127.0.0.1.

The fake server speaks the chat-completions protocol: it decodes the image from the
request's base64 PNG data URL and answers with its mean brightness, as a number or as
yes/no logprobs, so a correct reading of the answer is checked against the image itself.
It also misbehaves on demand (slow, malformed, 500, dropped connection) and keeps its own
timestamps of every request, which the concurrency test reads.
"""

from __future__ import annotations

import base64
import io
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler

import numpy as np
import pytest
import torch
from conftest import serve_on_loopback

from flowdppo import cli
from flowdppo.rewards import get_reward
from flowdppo.rewards.http import RewardServerError
from flowdppo.rewards.vlm import VlmReward, scaled_number, yes_probability
from flowdppo.trainer import checkpoint as ckpt
from flowdppo.trainer import guards

pytestmark = pytest.mark.usefixtures("one_thread")


class Judge:
    """A chat-completions server whose answer is the image's mean brightness."""

    def __init__(self):
        self.mode = "number"  # number, logprobs, text, slow, malformed, 500, drop
        self.delay = 0.0
        self.fail_after: int | None = None  # answer 500 from this request on
        self.requests: list[dict] = []  # model, text, image, start, end (server clock)
        self.lock = threading.Lock()
        self.release = threading.Event()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                start = time.monotonic()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    n = len(judge.requests)
                    record = {"start": start, "path": self.path, "body": body}
                    judge.requests.append(record)
                mode = judge.mode
                if judge.fail_after is not None and n >= judge.fail_after:
                    mode = "500"
                if mode == "drop":  # the process behind it died mid-request
                    self.close_connection = True
                    return
                if mode == "slow":
                    judge.release.wait(judge.delay)
                elif judge.delay:
                    time.sleep(judge.delay)
                record["end"] = time.monotonic()
                if mode == "500":
                    return self._send(500, b"internal error")
                if mode == "malformed":
                    return self._send(200, b"<html>not the API</html>")
                self._send(200, json.dumps(judge.answer(body, mode)).encode())

            def _send(self, status, payload):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd, root = serve_on_loopback(Handler)
        self.base_url = f"{root}/v1"

    def answer(self, body: dict, mode: str) -> dict:
        brightness = float(decode(body).mean())
        message = {"role": "assistant", "content": f"Score: {10 * brightness:.4f} out of 10"}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        if mode == "text":
            message["content"] = "Yes." if brightness > 0.5 else "no"
        if mode == "logprobs":
            message["content"] = "Yes"
            top = [
                {"token": "Yes", "logprob": math.log(brightness * 0.9)},
                {"token": " yes", "logprob": math.log(brightness * 0.1)},
                {"token": "No", "logprob": math.log(1 - brightness)},
            ]
            choice["logprobs"] = {
                "content": [{"token": "Yes", "logprob": 0.0, "top_logprobs": top}]
            }
        return {"id": "x", "object": "chat.completion", "model": body["model"], "choices": [choice]}

    def stop(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def decode(body: dict) -> np.ndarray:
    from PIL import Image

    content = body["messages"][0]["content"]
    url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))) / 255.0


@pytest.fixture
def judge():
    j = Judge()
    yield j
    j.stop()


def _images(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Flat images of known brightness, quantised to 8 bits as the PNG carries them.
    levels = (torch.rand(n, generator=g) * 0.8 + 0.1) * 255
    return (levels.round() / 255).view(n, 1, 1, 1).expand(n, 3, 8, 8).contiguous()


def _reward(judge, **options):
    options = {"base_url": judge.base_url, "model": "judge-1", "backoff": 0.01, **options}
    return get_reward("vlm", **options)


def test_number_answers_are_read_and_scaled(judge):
    images = _images()
    prompts = ["a red cat", "two dogs", "a tree", "the sea"]
    reward = _reward(judge, template="Judge {prompt} now")
    out = reward(images, prompts)
    assert torch.allclose(out, images.mean(dim=(1, 2, 3)), atol=1e-4)
    sent = sorted(r["body"]["messages"][0]["content"][1]["text"] for r in judge.requests)
    assert sent == sorted(f"Judge {p} now" for p in prompts)
    assert {r["path"] for r in judge.requests} == {"/v1/chat/completions"}
    assert {r["body"]["model"] for r in judge.requests} == {"judge-1"}


def test_yes_no_from_logprobs_and_from_text(judge):
    images = _images()
    judge.mode = "logprobs"
    out = _reward(judge, score="yes_no")(images, ["p"] * 4)
    assert torch.allclose(out, images.mean(dim=(1, 2, 3)), atol=1e-5)
    assert all(r["body"]["logprobs"] is True for r in judge.requests)
    judge.mode = "text"  # a server that returns no logprobs: the answer's word
    out = _reward(judge, score="yes_no")(images, ["p"] * 4)
    assert out.tolist() == [1.0 if b > 0.5 else 0.0 for b in images.mean(dim=(1, 2, 3))]


def test_score_parsing_rules():
    assert scaled_number("I'd say 7.5/10", 0, 10) == 0.75
    assert scaled_number("-1", -1, 1) == 0.0
    assert math.isnan(scaled_number("no idea", 0, 10))
    assert math.isnan(scaled_number("12", 0, 10))  # outside the range: not trusted
    assert yes_probability("Yes.", None) == 1.0 and yes_probability(" NO", None) == 0.0
    assert math.isnan(yes_probability("maybe", None))
    tokens = [{"token": "yes", "logprob": math.log(0.3), "top_logprobs": []}]
    assert yes_probability("yes", tokens) == 1.0  # the chosen token, no alternatives given


def test_videos_are_judged_per_frame(judge):
    frames = _images(4)
    video = torch.stack([frames[:2], frames[2:]]).permute(0, 2, 1, 3, 4)  # [2, 3, 2, H, W]
    out = _reward(judge)(video, ["a", "b"])
    expected = frames.mean(dim=(1, 2, 3)).view(2, 2).mean(1)
    assert torch.allclose(out, expected, atol=1e-4)


def test_slow_answer_times_out_with_bounded_retries(judge):
    judge.mode, judge.delay = "slow", 10
    reward = _reward(judge, timeout=0.3, retries=1, concurrency=1)
    with pytest.raises(RewardServerError, match="gave no usable answer after 2 attempts"):
        reward(_images(1), ["p"])
    assert len(judge.requests) == 2


def test_malformed_answer_fails_at_once(judge):
    judge.mode = "malformed"
    with pytest.raises(RewardServerError, match="not a chat completion"):
        _reward(judge, retries=3, concurrency=1)(_images(1), ["p"])
    assert len(judge.requests) == 1  # repeating it cannot help


@pytest.mark.parametrize("mode,reason", [("500", "HTTP 500"), ("drop", "Remote end closed")])
def test_server_errors_are_retried_then_reported(judge, mode, reason):
    judge.mode = mode
    with pytest.raises(RewardServerError, match=reason) as err:
        _reward(judge, retries=2, concurrency=1)(_images(1), ["p"])
    assert f"VLM judge {judge.base_url}/chat/completions" in str(err.value)
    assert len(judge.requests) == 3
    judge.mode, judge.requests = "number", []  # back up: the next batch is scored
    assert torch.isfinite(_reward(judge)(_images(2), ["a", "b"])).all()


def test_two_remote_rewards_run_concurrently(judge):
    judge.delay = 0.3
    rewards = {
        "judge_a": _reward(judge, model="a", concurrency=2),
        "judge_b": VlmReward(judge.base_url, "b", concurrency=2, backoff=0.01),
    }

    def served(concurrent: bool) -> tuple[float, list[dict]]:
        judge.requests = []
        times: dict[str, float] = {}
        out, valid = guards.score(
            rewards, _images(2), ["x", "y"], 0.0, concurrent=concurrent, times=times
        )
        assert valid.all() and set(times) == set(rewards)
        reqs = judge.requests
        return max(r["end"] for r in reqs) - min(r["start"] for r in reqs), reqs

    span, reqs = served(concurrent=True)
    print(f"two 0.3 s rewards: {span:.3f} s concurrently", end="; ")
    # All four requests (two per reward) were in the server at the same time.
    assert max(r["start"] for r in reqs) < min(r["end"] for r in reqs)
    assert span < 0.45, span  # two 0.3 s rewards, one after the other, take >= 0.6 s
    serial, _ = served(concurrent=False)
    print(f"{serial:.3f} s one after the other")
    assert serial >= 0.6


def test_bad_options_name_the_key(judge):
    with pytest.raises(ValueError, match="needs its model"):
        get_reward("vlm", base_url=judge.base_url)
    with pytest.raises(ValueError, match="template must contain"):
        _reward(judge, template="no placeholder")
    with pytest.raises(ValueError, match="score must be number or yes_no"):
        _reward(judge, score="stars")
    with pytest.raises(ValueError, match="only {prompt} is filled in"):
        _reward(judge, template="{prompt} as JSON {score: 1}")


def test_a_dead_judge_ends_the_run_with_checkpoints_kept(judge, tmp_path, toy_overrides, capsys):
    judge.fail_after = 20  # the evaluation (12 images) and the first iteration (8) pass
    args = toy_overrides + [
        "reward.names=[vlm]",
        f"reward.options.vlm={{base_url: '{judge.base_url}', model: m, timeout: 0.5, "
        "retries: 1, backoff: 0.01}",
        "train.iterations=3",
    ]
    code = cli.main(["train", *args, f"log.run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: reward 'vlm' raised RewardServerError: VLM judge")
    assert "after 2 attempts" in err
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["ckpt-000001"]
    ckpt.verify_checkpoint(tmp_path / "run" / "ckpt-000001")
    judge.fail_after = None  # the server is back: the run continues where it stopped
    assert cli.main(["train", "--resume", str(tmp_path / "run")]) == 0
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "ckpt-000003"
