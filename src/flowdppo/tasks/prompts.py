"""The "prompts" task: a diffusers model trained on prompts from text files.

Unlike the built-in tasks, this one is made from the run's config rather than looked up by
name: ``model.kind`` and ``model.path`` say which pipeline to load, ``data.train_prompts``
and ``data.heldout_prompts`` are text files with one prompt per line, and the rewards are
whatever ``reward.names`` lists (there is no default reward for arbitrary prompts).

Everything a user can get wrong (no model path, a missing or empty prompt file, a
directory that holds another pipeline or a pipeline class no adapter takes, a resolution or
frame count the pipeline cannot take) is reported here, before any weight is read.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from flowdppo.config import DIFFUSERS_KINDS, Config, ConfigError
from flowdppo.tasks import Task


def _visible(line: str) -> str:
    """``line`` without the invisible characters at either end: whitespace, and format and
    control characters (a zero-width space, a byte-order mark, a soft hyphen) that editors
    and copied web text leave in. Those inside a prompt (a zero-width joiner in an emoji)
    stay."""
    start, end = 0, len(line)
    while start < end and _invisible(line[start]):
        start += 1
    while end > start and _invisible(line[end - 1]):
        end -= 1
    return line[start:end]


def _invisible(char: str) -> bool:
    return char.isspace() or unicodedata.category(char) in ("Cf", "Cc")


def read_prompts(path: str, key: str) -> list[str]:
    """Lines of ``path`` that show something, stripped of invisible characters at their
    ends (a UTF-8 byte-order mark included); ``key`` names the config key in errors."""
    return [prompt for _, prompt in read_prompt_lines(path, key)]


def read_prompt_lines(path: str, key: str) -> list[tuple[int, str]]:
    """(line number, prompt) of the lines of ``path`` that show something, as
    :func:`read_prompts` reads them."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(
            f"{key}: prompt file {path!r} does not exist; write one prompt per line there or "
            "fix the path"
        )
    try:
        text = p.read_text(encoding="utf-8-sig")  # a byte-order mark is not the prompt
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}: cannot read prompt file {path!r} as UTF-8 text: {exc}") from exc
    lines = enumerate(map(_visible, text.splitlines()), 1)
    prompts = [(n, line) for n, line in lines if line]
    if not prompts:
        raise ConfigError(f"{key}: prompt file {path!r} holds no prompts (one per line)")
    return prompts


def grammar_prompts(task: Task, cfg: Config) -> None:
    """Replace a built-in task's prompt lists with ``data.train_prompts`` /
    ``data.heldout_prompts``, each line parsed by the task's grammar (``extra["parse_prompt"]``)
    before any work: the first line it cannot parse is one error naming the file, the line
    number, the prompt and the word not understood."""
    parse = task.extra.get("parse_prompt")
    for key in ("train_prompts", "heldout_prompts"):
        path = getattr(cfg.data, key)
        if path is None:
            continue
        if parse is None:
            raise ConfigError(
                f"data.{key}: task {task.name!r} has no prompt grammar to read a prompt file "
                "with; prompt files are for task prompts and the tasks with a grammar (motion)"
            )
        lines = read_prompt_lines(path, f"data.{key}")
        for number, prompt in lines:
            try:
                parse(prompt)
            except ValueError as exc:
                raise ConfigError(f"data.{key}: {path} line {number}: {exc}") from None
        setattr(task, key, [prompt for _, prompt in lines])


def prompts_task(cfg: Config) -> Task:
    """The task for a run with ``task: prompts``; checks every input before loading."""
    from flowdppo.models.diffusers_adapters import (
        PipelineInputError,
        build_diffusers_model,
        check_pipeline,
    )
    from flowdppo.models.diffusers_adapters.base import directory_configs

    m, d = cfg.model, cfg.data
    if m.kind not in DIFFUSERS_KINDS:  # the config validator already refuses this
        raise ConfigError(f"task 'prompts' needs model.kind in {DIFFUSERS_KINDS}, got {m.kind!r}")
    if m.path is None:
        raise ConfigError(
            f"model.path is not set: model.kind {m.kind!r} loads a diffusers pipeline from a "
            "local directory; add model.path=/path/to/pipeline (see docs/real-models.md)"
        )
    if d.train_prompts is None:
        raise ConfigError(
            "data.train_prompts is not set: task 'prompts' trains on the prompts of a text "
            "file, one per line; add data.train_prompts=prompts.txt"
        )
    if not cfg.reward.names:
        raise ConfigError(
            "reward.names is empty: task 'prompts' has no default reward; name one or more, "
            "e.g. reward.names=[pickscore] reward.options.pickscore.path=/models/PickScore_v1"
        )
    train = read_prompts(d.train_prompts, "data.train_prompts")
    heldout = read_prompts(d.heldout_prompts, "data.heldout_prompts") if d.heldout_prompts else []
    extra_kwargs = {}
    try:
        adapter, resolution = check_pipeline(
            m.kind, m.path, resolution=m.resolution, frames=m.frames, adapter=m.adapter
        )
        if cfg.sampler.guidance_scale_2 is not None:
            # Only a two-expert Wan 2.2 pipeline has a second guidance weight.
            check = getattr(adapter, "check_guidance_scale_2", None)
            if check is None:
                raise PipelineInputError(
                    "sampler.guidance_scale_2",
                    f"sampler.guidance_scale_2: {adapter.__name__} has one guidance weight; "
                    "drop it",
                )
            check(directory_configs(m.path))
            extra_kwargs["guidance_scale_2"] = cfg.sampler.guidance_scale_2
    except PipelineInputError as exc:
        message = str(exc)
        raise ConfigError(
            message if message.startswith(exc.key) else f"{exc.key}: {message}"
        ) from exc

    task = Task(
        name="prompts",
        build_model=lambda weights: None,  # replaced below
        default_rewards=[],
        train_prompts=train,
        heldout_prompts=heldout,
        description=f"{adapter.__name__} on the pipeline at {m.path}, {len(train)} prompts",
        extra={"eval_prompts": d.eval_prompts},
    )

    def build(weights: str | None):
        model = build_diffusers_model(
            "auto",  # the adapter checked above
            m.path,
            adapter=adapter,
            resolution=resolution,
            frames=m.frames,
            dtype=m.dtype,
            gradient_checkpointing=m.gradient_checkpointing,
            device=None if m.device == "auto" else m.device,
            max_sequence_length=m.max_sequence_length,
            negative_prompt=m.negative_prompt,
            offload_text_encoders=m.offload_text_encoders,
            **extra_kwargs,
        )
        # Full module names of the attention projections: unambiguous for peft, and they
        # exist in this network by construction (the last SD3 block has no text output).
        task.extra["lora_targets"] = model.default_lora_targets()
        return model

    task.build_model = build
    return task
