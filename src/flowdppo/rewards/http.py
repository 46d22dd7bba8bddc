"""A reward computed by a remote server over HTTP (stdlib only).

Protocol: ``POST`` JSON ``{"prompts": [...], "images": [<base64 PNG>, ...]}`` (one image per
prompt; a video is sent frame by frame with its prompt repeated, and the scores are
averaged over frames) and expect ``{"rewards": [float, ...]}`` of the same length.
``examples/reward_server.py`` is a minimal server.

Registered as ``http``; its options are ``url`` (``FLOWDPPO_REWARD_URL``), ``timeout``
seconds per request, ``retries`` after the first attempt, ``backoff`` seconds (doubled per
retry) and ``batch_size`` images per request. Connection failures, timeouts and 5xx
answers are retried; a 4xx answer or a malformed body is not, since repeating it cannot
help. Every error names the URL.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import time
import urllib.error
import urllib.request

import numpy as np
import torch

from flowdppo.rewards import register_reward
from flowdppo.rewards.vision import as_frames

URL_ENV = "FLOWDPPO_REWARD_URL"


class RewardServerError(RuntimeError):
    """The reward server could not be reached or answered something unusable."""


def encode_png(image: torch.Tensor) -> str:
    """An image [3, H, W] (or [1, H, W]) in [0, 1] as a base64 PNG string."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    arr = arr.permute(1, 2, 0).numpy()
    img = Image.fromarray(np.ascontiguousarray(arr[..., 0] if arr.shape[-1] == 1 else arr))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class HttpReward:
    """``fn(images, prompts) -> Tensor[B]`` that asks a reward server."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 120.0,
        retries: int = 2,
        backoff: float = 1.0,
        batch_size: int = 64,
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"reward server URL must start with http:// or https://, got {url!r}")
        if retries < 0 or timeout <= 0 or batch_size < 1:
            raise ValueError("need retries >= 0, timeout > 0 and batch_size >= 1")
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.batch_size = batch_size

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        frames, f = as_frames(images)
        if len(prompts) * f != frames.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} samples")
        texts = [p for p in prompts for _ in range(f)]
        scores = []
        for start in range(0, len(texts), self.batch_size):
            chunk = frames[start : start + self.batch_size]
            payload = {
                "prompts": texts[start : start + self.batch_size],
                "images": [encode_png(img) for img in chunk],
            }
            scores.extend(self._post(payload))
        return torch.tensor(scores, dtype=torch.float32).view(-1, f).mean(1)

    def _post(self, payload: dict) -> list[float]:
        raw = post_json(
            self.url, payload, timeout=self.timeout, retries=self.retries, backoff=self.backoff
        )
        return self._parse(raw, len(payload["images"]))

    def _parse(self, raw: bytes, expected: int) -> list[float]:
        try:
            data = json.loads(raw)
            rewards = [float(r) for r in data["rewards"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise RewardServerError(
                f"reward server {self.url} answered {raw[:200]!r}, not JSON of the form "
                '{"rewards": [numbers]}'
            ) from exc
        if len(rewards) != expected:
            raise RewardServerError(
                f"reward server {self.url} returned {len(rewards)} rewards for {expected} "
                "images; it must return one per image, in order"
            )
        return rewards


def post_json(
    url: str,
    payload: dict,
    *,
    timeout: float,
    retries: int,
    backoff: float,
    headers: dict[str, str] | None = None,
    what: str = "reward server",
) -> bytes:
    """POST ``payload`` as JSON and return the answer's body.

    Each attempt has ``timeout`` seconds for the whole answer; connection failures,
    timeouts and 5xx answers are retried ``retries`` times (after ``backoff`` seconds,
    doubled each time); a 4xx answer is not. Failures are :class:`RewardServerError`
    naming ``what`` and the URL.
    """
    body = json.dumps(payload).encode()
    last: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        request = urllib.request.Request(
            url,
            data=body,
            headers={"Content-Type": "application/json", **(headers or {})},
            method="POST",
        )
        try:
            deadline = time.monotonic() + timeout
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return _read_until(response, deadline)
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            if exc.code < 500:  # the request itself is wrong: retrying cannot help
                raise RewardServerError(
                    f"{what} {url} rejected the request with HTTP {exc.code}: {detail}"
                ) from exc
            last = RewardServerError(f"HTTP {exc.code}: {detail}")
        except (
            urllib.error.URLError,
            TimeoutError,
            ConnectionError,
            http.client.HTTPException,
        ) as exc:
            reason = getattr(exc, "reason", exc)
            kind = "timed out" if isinstance(reason, TimeoutError) else "failed"
            last = RewardServerError(f"request {kind} ({reason})")
    raise RewardServerError(
        f"{what} {url} gave no usable answer after {retries + 1} attempts "
        f"(timeout {timeout:g} s each); last error: {last}. Check that the server is "
        "running and reachable, or raise the reward's timeout"
    )


def _read_until(response, deadline: float) -> bytes:
    """The response body, or TimeoutError once ``deadline`` passes.

    The socket timeout bounds each read; this bounds the whole body, so a server that
    trickles bytes (or keeps a connection alive with a byte now and then) cannot stall
    training indefinitely.
    """
    chunks = []
    while chunk := response.read1(1 << 16):
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise TimeoutError("the answer took longer than the timeout")
    body = b"".join(chunks)
    if response.length:  # the connection closed before the announced Content-Length
        raise http.client.IncompleteRead(body, response.length)
    return body


def http_reward(
    url: str | None = None,
    timeout: float = 120.0,
    retries: int = 2,
    backoff: float = 1.0,
    batch_size: int = 64,
) -> HttpReward:
    url = url or os.environ.get(URL_ENV)
    if not url:
        raise ValueError(
            f"reward 'http' needs the server's URL: set {URL_ENV}=http://HOST:PORT/ "
            "(or pass url=... to the reward factory)"
        )
    return HttpReward(url, timeout=timeout, retries=retries, backoff=backoff, batch_size=batch_size)


register_reward("http")(http_reward)
