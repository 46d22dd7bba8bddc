"""What a run writes: metrics.jsonl, TensorBoard events, wandb, console progress.

The sample grids themselves are drawn by ``media.py``; the loggers here send them on."""

from __future__ import annotations

import json
import math
import netrc
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from flowdppo.trainer.checkpoint import write_text_atomic
from flowdppo.trainer.media import GridPage
from flowdppo.units import kl_inline
from flowdppo.verbosity import echo, format_duration

if TYPE_CHECKING:
    from flowdppo.config import Config

METRICS = "metrics.jsonl"


def _clean(value: float) -> float | None:
    # JSON has no NaN / inf; write null so every line stays valid JSON.
    return value if math.isfinite(value) else None


class Logger:
    """One destination of a run's log. A new destination is one subclass: override what it
    takes (scalars every iteration, the sample grid of every evaluation) and ``close``;
    ``where`` is the file or folder it writes, which a failed write is reported with."""

    where: Path | None = None

    def scalars(self, iteration: int, metrics: dict[str, float]) -> None:
        pass

    def grid(self, iteration: int, pages: list[GridPage]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlLogger(Logger):
    """metrics.jsonl: one JSON line per iteration (the file the report and compare read)."""

    def __init__(self, run_dir: Path, start_iteration: int):
        self.path = self.where = Path(run_dir) / METRICS
        truncate_metrics(self.path, start_iteration)

    def scalars(self, iteration: int, metrics: dict[str, float]) -> None:
        record = {"iteration": iteration, **{k: _clean(float(v)) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class TensorBoardLogger(Logger):
    """Scalars, grid pages as images, and videos as animated GIF images."""

    def __init__(self, run_dir: Path, start_iteration: int):
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run continues after the iteration of its checkpoint: the events a killed
        # run wrote past it (steps > start_iteration) are purged, the checkpoint's own step
        # is kept, as metrics.jsonl keeps its lines through it.
        purge = start_iteration + 1 if start_iteration > 0 else None
        self.where = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(str(self.where), purge_step=purge)

    def scalars(self, iteration: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            if math.isfinite(float(v)):
                self.writer.add_scalar(k, float(v), iteration)

    def grid(self, iteration: int, pages: list[GridPage]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        for k, page in enumerate(pages, 1):
            with Image.open(page.png) as img:
                self.writer.add_image(
                    f"samples/page{k}", np.asarray(img.convert("RGB")), iteration, dataformats="HWC"
                )
            if page.gif is not None:
                # TensorBoard's image dashboard plays an animated GIF (as add_video writes).
                with Image.open(page.gif) as gif:
                    w, h = gif.size
                encoded = Summary.Image(
                    height=h, width=w, colorspace=3, encoded_image_string=page.gif.read_bytes()
                )
                summary = Summary(value=[Summary.Value(tag=f"videos/page{k}", image=encoded)])
                self.writer._get_file_writer().add_summary(summary, iteration)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger(Logger):
    """Weights & Biases: the same scalars, grid pages as images, videos as MP4 (or GIF).

    The run's wandb id is kept in ``RUN_DIR/wandb_id``, so ``--resume`` continues the same
    wandb run. ``log.wandb_mode=offline`` (or WANDB_MODE=offline) needs no account and no
    network; ``wandb sync`` uploads such a run later.
    """

    ID_FILE = "wandb_id"

    def __init__(self, cfg: Config, run_dir: Path, start_iteration: int):
        wandb = import_wandb()
        id_file = Path(run_dir) / self.ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        log = cfg.log
        self.wandb = wandb
        self.run = wandb.init(
            project=log.wandb_project,
            name=log.wandb_name or cfg.run_name,
            mode=log.wandb_mode,
            id=run_id,
            resume="allow",
            config=cfg.model_dump(mode="json"),
            # Its files go into the run directory (WANDB_DIR, when set, wins), never into
            # the working directory.
            dir=os.environ.get("WANDB_DIR") or str(run_dir),
            settings=wandb.Settings(console="off", silent=True),
        )
        if run_id is None:
            write_text_atomic(id_file, self.run.id + "\n")

    def scalars(self, iteration: int, metrics: dict[str, float]) -> None:
        finite = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        self.run.log(finite, step=iteration)

    def grid(self, iteration: int, pages: list[GridPage]) -> None:
        media = {}
        for k, page in enumerate(pages, 1):
            media[f"samples/page{k}"] = self.wandb.Image(str(page.png))
            video = page.mp4 or page.gif
            if video is not None:
                media[f"videos/page{k}"] = self.wandb.Video(str(video), format=video.suffix[1:])
        self.run.log(media, step=iteration)

    def close(self) -> None:
        self.run.finish()


def import_wandb():
    try:
        import wandb
    except ImportError as exc:
        from flowdppo.config import ConfigError

        raise ConfigError(
            "log.wandb=true needs the wandb package: pip install 'flowdppo[wandb]' "
            "(or set log.wandb=false)"
        ) from exc
    return wandb


def wandb_mode(cfg: Config) -> str:
    """The mode wandb will run in: ``log.wandb_mode``, else WANDB_MODE, else online."""
    return cfg.log.wandb_mode or os.environ.get("WANDB_MODE") or "online"


def check_wandb(cfg: Config) -> None:
    """Refuse ``log.wandb=true`` before any work when wandb cannot start a run.

    Online mode needs credentials (WANDB_API_KEY or a ``wandb login`` entry in the netrc
    file); without them wandb would prompt, or fail deep inside its own start-up.
    """
    import_wandb()
    if wandb_mode(cfg) != "online" or os.environ.get("WANDB_API_KEY"):
        return
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        found = path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        found = False
    if not found:
        from flowdppo.config import ConfigError

        raise ConfigError(
            f"log.wandb=true in online mode needs a wandb login for {host} (WANDB_API_KEY, "
            "or `wandb login`); set log.wandb_mode=offline to log without an account or "
            "network (`wandb sync` uploads the run later)"
        )


class RunLog:
    """Fans each iteration's scalars and each evaluation's grid out to the run's loggers."""

    def __init__(self, run_dir: Path, loggers: list[Logger]):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS
        self.loggers = loggers

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            with _naming(logger):
                logger.scalars(iteration, metrics)

    def grid(self, iteration: int, pages: list[GridPage]) -> None:
        for logger in self.loggers:
            with _naming(logger):
                logger.grid(iteration, pages)

    def close(self) -> None:
        """Close every logger, even after one fails; the first failure is raised, unless an
        error is already on its way out (TensorBoard re-raises its writer thread's error
        here, which would hide the account of what stopped the run)."""
        failed = None
        for logger in self.loggers:
            try:
                with _naming(logger):
                    logger.close()
            except OSError as exc:
                failed = failed or exc
        if failed is not None and sys.exc_info()[1] is None:
            raise failed


@contextmanager
def _naming(logger: Logger) -> Iterator[None]:
    """An OSError of ``logger`` that names no file (TensorBoard's writer thread, a write
    into an open file) names the logger's."""
    try:
        yield
    except OSError as exc:
        if exc.filename or logger.where is None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(logger.where)) from exc


def open_run_log(cfg: Config, run_dir: Path, start_iteration: int = 0) -> RunLog:
    """The loggers ``cfg.log`` asks for; metrics.jsonl always."""
    loggers: list[Logger] = [JsonlLogger(run_dir, start_iteration)]
    if cfg.log.tensorboard:
        loggers.append(TensorBoardLogger(run_dir, start_iteration))
    if cfg.log.wandb:
        loggers.append(WandbLogger(cfg, run_dir, start_iteration))
    return RunLog(run_dir, loggers)


def truncate_metrics(path: Path, keep_through: int) -> None:
    """Keep metric lines of iterations ``<= keep_through`` (the resumed checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["iteration"] <= keep_through:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a line cut by a kill: everything after it is stale too
    # Atomic: a kill during this rewrite must not lose the lines being kept.
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict]:
    """The rows of ``metrics.jsonl``; a line that is not a JSON object (the last one cut by
    a kill while it was written) is a ValueError naming the file, the line and the fix."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            row, why = None, str(exc)
        else:
            why = "not a JSON object"
        if not isinstance(row, dict):
            raise ValueError(
                f"{path}, line {n}, is not a metrics row ({why}): a run killed while writing "
                f"it leaves its last line cut. `flowdppo train --resume {Path(path).parent}` "
                "drops it (and redoes that iteration), or delete that line"
            )
        rows.append(row)
    return rows


class Progress:
    """A live bar on a terminal; one plain line per iteration otherwise (a log file, a
    cluster job), with the bar's elapsed time and ETA: both take the mean time per
    iteration since this start (tqdm with ``smoothing=0``), so they agree."""

    def __init__(self, total: int, start: int, clock=time.monotonic):
        self.tty = sys.stderr.isatty()
        self.bar = None
        self.start, self.clock = start, clock
        self.began = clock()
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True, smoothing=0)

    def update(self, iteration: int, total: int, metrics: dict[str, float]) -> None:
        reward = metrics.get("reward/mean", float("nan"))
        kl = metrics.get("kl_ref/mean", float("nan"))
        # The fraction of step terms whose gradient the objective removed, whatever the
        # objective (a ratio-clip window fraction would overstate it, docs/method.md).
        extra = metrics.get("grad_blocked_fraction", float("nan"))
        label = "blocked"
        if self.bar is not None:
            self.bar.set_postfix(
                reward=f"{reward:.3f}", kl_ref=kl_inline(kl), **{label: f"{extra:.2f}"}
            )
            self.bar.update(1)
        else:
            elapsed = self.clock() - self.began
            done = iteration + 1 - self.start
            eta = elapsed / done * (total - iteration - 1) if done > 0 else float("nan")
            echo(
                f"iter {iteration + 1}/{total} reward {reward:.4f} kl_ref {kl_inline(kl)} "
                f"{label} {extra:.3f} time {metrics.get('time/iteration', 0):.2f}s "
                f"elapsed {format_duration(elapsed)} eta {format_duration(eta)}"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
