"""Cost per image of the built-in rewards that run on this machine: images per second.

``ocr`` (the shipped PP-OCR models) on sign-like images at several resolutions, each with
one rendered line of text, the JPEG reward at the same sizes, and the built-in tasks'
rewards on a batch of 64 of their own images. Timed after one warm-up call,
over ``--repeats`` calls of a batch of ``--batch`` images; reports the median. The model
rewards that need weights (CLIP, PickScore, aesthetic) and the served ones (``http``,
``vlm``) cost what their model or server costs; docs/rewards.md says how to measure them.

    OMP_NUM_THREADS=1 python benchmarks/reward_cost.py --threads 1
    python benchmarks/reward_cost.py --sizes 512,1024 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from flowdppo.rewards import get_reward

WORDS = ["OPEN", "Harbor", "velvet", "quartz", "SALE 50%", "garden", "Flow", "meadow"]


def signs(n: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` images of ``size`` px, each with one word at a third of the image's height."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(0)
    font = ImageFont.load_default(size=max(12, size // 8))
    images, prompts = [], []
    for i in range(n):
        word = WORDS[i % len(WORDS)]
        img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(180, 256, 3)))
        ImageDraw.Draw(img).text((size // 10, size // 3), word, fill=(20, 20, 20), font=font)
        images.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255)
        prompts.append(f'a shop sign that says "{word}"')
    return torch.stack(images), prompts


TASK_REWARDS = {
    "digits": ["digit_prob", "digit_smoothness"],
    "shapes": ["shapes_geneval", "shapes_strict", "shapes_smoothness"],
}


def task_batch(name: str, n: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` samples of a built-in task's base model (ODE-free: decoded noise), its prompts."""
    from flowdppo.tasks import get_task

    task = get_task(name)
    model = task.build_model(None)
    images = model.decode(model.initial_noise(n, torch.Generator().manual_seed(0)))
    return images, [task.train_prompts[i % len(task.train_prompts)] for i in range(n)]


def images_per_second(reward, images, prompts, repeats: int) -> float:
    reward(images, prompts)  # warm-up: first-call allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        reward(images, prompts)
        times.append(time.perf_counter() - start)
    return len(prompts) / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,512", help="comma-separated image sides in px")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rewards = {"ocr": get_reward("ocr"), "jpeg_compressibility": get_reward("jpeg_compressibility")}
    rows = []
    for task_name, names in TASK_REWARDS.items():
        images, prompts = task_batch(task_name, 64)
        for name in names:
            ips = images_per_second(get_reward(name), images, prompts, args.repeats)
            size = images.shape[-1]
            rows.append(
                {"reward": name, "size": size, "images_per_s": ips, "ms_per_image": 1e3 / ips}
            )
            print(f"{name:<22} {size:>5} px  {ips:8.0f} images/s  {1e3 / ips:8.3f} ms/image")
    for size in (int(s) for s in args.sizes.split(",")):
        images, prompts = signs(args.batch, size)
        for name, reward in rewards.items():
            ips = images_per_second(reward, images, prompts, args.repeats)
            rows.append(
                {"reward": name, "size": size, "images_per_s": ips, "ms_per_image": 1e3 / ips}
            )
            print(f"{name:<22} {size:>5} px  {ips:8.2f} images/s  {1e3 / ips:8.1f} ms/image")
    if args.json:
        args.json.write_text(
            json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
