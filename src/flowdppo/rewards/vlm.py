"""``vlm``: a vision-language judge behind an OpenAI-compatible chat-completions endpoint.

What vLLM (``vllm serve``) and SGLang serve at ``{base_url}/chat/completions``: every
image is one request, a user message holding the image as a base64 PNG data URL and the
judge prompt (``template`` with ``{prompt}`` replaced by the sample's prompt). A video is
judged frame by frame and the scores are averaged. How the score is read (``score``):

* ``number`` (default): the first number in the answer, mapped from ``score_range``
  ``[lo, hi]`` to [0, 1]. An answer with no number, or one outside the range, scores NaN:
  the sample is left out of the iteration like any invalid reward
  (``reward.max_invalid_fraction``), so one odd answer does not end a run.
* ``yes_no``: the probability of "yes" against "no" in the first token, from the
  server's ``logprobs`` (``top_logprobs`` candidates; tokens compared without case or
  spaces): ``p(yes) / (p(yes) + p(no))``. A server that returns no logprobs, or neither
  word among them, falls back to the answer text: 1 for yes, 0 for no, NaN otherwise.

Options: ``base_url`` (``FLOWDPPO_VLM_URL``, e.g. ``http://127.0.0.1:8000/v1``), ``model``
(``FLOWDPPO_VLM_MODEL``), ``api_key`` (``FLOWDPPO_VLM_API_KEY``, sent as a bearer token
if set), ``template``, ``score``, ``score_range``, ``max_tokens``, ``temperature``,
``top_logprobs``, ``concurrency`` (requests in flight), ``timeout`` (seconds for a whole
answer), ``retries``, ``backoff``. Delivery has the guarantees of the ``http`` reward
(:func:`flowdppo.rewards.http.post_json`): a deadline for the whole answer, bounded
retries of connection failures, timeouts and 5xx answers, none of 4xx; a server that
stays down raises :class:`RewardServerError`, which ends the run with the checkpoints
already written intact. An answer that is not a chat completion is an error at once.

Plain HTTP rather than the ``openai`` client: the client's timeout bounds each read, not
the whole answer (a server that trickles bytes holds it for ever), its retry policy is
its own, and it would add a dependency (with its own httpx and pydantic pins) for one
POST request that the ``http`` reward already makes, with tested guarantees.
"""

from __future__ import annotations

import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor

import torch

from flowdppo.rewards import register_reward
from flowdppo.rewards.http import RewardServerError, encode_png, post_json
from flowdppo.rewards.vision import as_frames

URL_ENV, MODEL_ENV, KEY_ENV = "FLOWDPPO_VLM_URL", "FLOWDPPO_VLM_MODEL", "FLOWDPPO_VLM_API_KEY"
SCORES = ("number", "yes_no")
DEFAULT_TEMPLATE = (
    "You are judging a generated image. The image was generated from this prompt: "
    '"{prompt}". How well does the image match the prompt, and how good is it? Answer with '
    "a single number from 0 (not at all) to 10 (perfectly), nothing else."
)
YES_NO_TEMPLATE = 'Does this image show "{prompt}"? Answer yes or no.'
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


class VlmReward:
    """``fn(images, prompts) -> Tensor[B]`` that asks a chat-completions judge."""

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        *,
        template: str | None = None,
        score: str = "number",
        score_range: tuple[float, float] | list[float] = (0.0, 10.0),
        api_key: str | None = None,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_logprobs: int = 20,
        concurrency: int = 8,
        timeout: float = 120.0,
        retries: int = 2,
        backoff: float = 1.0,
    ):
        base_url = base_url or os.environ.get(URL_ENV)
        model = model or os.environ.get(MODEL_ENV)
        api_key = api_key or os.environ.get(KEY_ENV)
        for value, key, env, example in (
            (base_url, "base_url", URL_ENV, "http://127.0.0.1:8000/v1"),
            (model, "model", MODEL_ENV, "the name the server serves"),
        ):
            if not value:
                raise ValueError(
                    f"reward 'vlm' needs its {key}: set reward.options.vlm.{key} or {env} "
                    f"({example})"
                )
        if len(score_range) != 2:
            raise ValueError(f"reward.options.vlm.score_range must be [lo, hi], got {score_range}")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"reward 'vlm': base_url must start with http:// or https://, got {base_url!r}"
            )
        if score not in SCORES:
            raise ValueError(f"reward.options.vlm.score must be number or yes_no, got {score!r}")
        template = template or (YES_NO_TEMPLATE if score == "yes_no" else DEFAULT_TEMPLATE)
        if "{prompt}" not in template:
            raise ValueError(
                "reward.options.vlm.template must contain {prompt}, where the sample's prompt goes"
            )
        try:
            template.format(prompt="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"reward.options.vlm.template: {exc!r}; only {{prompt}} is filled in (write "
                "other braces as {{ and }})"
            ) from None
        lo, hi = (float(v) for v in score_range)
        if not hi > lo:
            raise ValueError("reward.options.vlm.score_range must be [lo, hi] with hi > lo")
        if concurrency < 1 or retries < 0 or timeout <= 0 or not 1 <= top_logprobs <= 20:
            raise ValueError(
                "reward 'vlm' needs concurrency >= 1, retries >= 0, timeout > 0 and "
                "1 <= top_logprobs <= 20"
            )
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.template = template
        self.score = score
        self.range = (lo, hi)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.max_tokens = max_tokens or (1 if score == "yes_no" else 16)
        self.temperature = temperature
        self.top_logprobs = top_logprobs
        self.concurrency = concurrency
        self.timeout, self.retries, self.backoff = timeout, retries, backoff

    def request(self, image: torch.Tensor, prompt: str) -> dict:
        """The chat-completions request that judges one image."""
        content = [
            {
                "type": "image_url",
                "image_url": {"url": f"data:image/png;base64,{encode_png(image)}"},
            },
            {"type": "text", "text": self.template.format(prompt=prompt)},
        ]
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if self.score == "yes_no":
            body |= {"logprobs": True, "top_logprobs": self.top_logprobs}
        return body

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        frames, f = as_frames(images)
        if len(prompts) * f != frames.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} samples")
        texts = [p for p in prompts for _ in range(f)]
        with ThreadPoolExecutor(min(self.concurrency, len(texts)) or 1) as pool:
            scores = list(pool.map(self._judge, frames, texts))
        return torch.tensor(scores, dtype=torch.float32).view(-1, f).mean(1)

    def _judge(self, image: torch.Tensor, prompt: str) -> float:
        raw = post_json(
            self.url,
            self.request(image, prompt),
            timeout=self.timeout,
            retries=self.retries,
            backoff=self.backoff,
            headers=self.headers,
            what="VLM judge",
        )
        text, logprobs = self._parse(raw)
        if self.score == "yes_no":
            return yes_probability(text, logprobs)
        return scaled_number(text, *self.range)

    def _parse(self, raw: bytes) -> tuple[str, list | None]:
        try:
            choice = json.loads(raw)["choices"][0]
            text = choice["message"]["content"] or ""
            if not isinstance(text, str):
                raise TypeError("content is not a string")
            logprobs = (choice.get("logprobs") or {}).get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise RewardServerError(
                f"VLM judge {self.url} answered {raw[:200]!r}, not a chat completion "
                f'({{"choices": [{{"message": {{"content": ...}}}}]}}): {exc!r}. Is '
                "base_url the server's OpenAI-compatible /v1 root?"
            ) from None
        return text, logprobs


def scaled_number(text: str, lo: float, hi: float) -> float:
    """The first number in ``text`` mapped from [lo, hi] to [0, 1]; NaN if none or outside."""
    found = _NUMBER.search(text)
    if found is None:
        return math.nan
    value = float(found.group())
    if not lo <= value <= hi:
        return math.nan
    return (value - lo) / (hi - lo)


def yes_probability(text: str, logprobs: list | None) -> float:
    """p(yes) / (p(yes) + p(no)) from the first token's candidates, else the answer text."""
    if logprobs:
        first = logprobs[0] or {}
        candidates = first.get("top_logprobs") or [first]
        p = {"yes": 0.0, "no": 0.0}
        for cand in candidates:
            word = str(cand.get("token", "")).strip().lower()
            if word in p and isinstance(cand.get("logprob"), int | float):
                p[word] += math.exp(cand["logprob"])
        if p["yes"] + p["no"] > 0:
            return p["yes"] / (p["yes"] + p["no"])
    word = text.strip().lower().rstrip(".!")
    return {"yes": 1.0, "no": 0.0}.get(word, math.nan)


# The class is the factory: its arguments are the options.
register_reward("vlm")(VlmReward)
