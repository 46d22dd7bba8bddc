"""The built-in "shapes" task: a GenEval-style compositional text-to-image benchmark on a CPU.

* scenes: 1-4 circles, squares and triangles in four colours on a black 16x16 background,
  rendered procedurally for any caption of the grammar (:mod:`.scenes`);
* prompts: five GenEval skills (single object, two objects, counting, colour attribution,
  position); prompts naming a held-out colour-shape pair are held out (:mod:`.grammar`);
* base model: a caption encoder + patch transformer flow model pretrained on rendered scenes
  (``assets/shapes_base.safetensors``, :mod:`.model`, :mod:`.pretraining`);
* rewards (:mod:`.detect`, registered by :mod:`.rewards`): ``shapes_geneval`` (fraction of
  the caption's sub-conditions an exact detector finds satisfied), ``shapes_strict`` (all of
  them: GenEval's binary score) and ``shapes_smoothness`` (a total-variation quality proxy
  that pulls against them).

See ``docs/shapes-task.md``.
"""

from __future__ import annotations

from flowdppo.tasks import register_builtin_task
from flowdppo.tasks.blocks import LORA_TARGETS
from flowdppo.tasks.common import FAST_ROLLOUT
from flowdppo.tasks.shapes.detect import (
    Detection,
    PromptCheck,
    check_images,
    check_prompt,
    detect_objects,
    geneval_soft,
    geneval_strict,
    skill_summary,
    smoothness,
    total_variation,
)
from flowdppo.tasks.shapes.evaluate import euler_sample, evaluate_prompts
from flowdppo.tasks.shapes.grammar import (
    COLOURS,
    HELDOUT_PAIRS,
    HELDOUT_PROMPTS,
    RELATIONS,
    SHAPES,
    SKILLS,
    TRAIN_PROMPTS,
    ObjectGroup,
    PromptError,
    PromptSpec,
    parse_prompt,
    skill_prompts,
    split_prompts,
    tokenize,
)
from flowdppo.tasks.shapes.model import (
    ShapesAssetError,
    ShapesModel,
    ShapesVelocityNet,
    assets_dir,
    load_base_model,
)
from flowdppo.tasks.shapes.pretraining import pretrain, pretrain_base_model
from flowdppo.tasks.shapes.scenes import (
    IMAGE_SIZE,
    PALETTE,
    SceneObject,
    layout,
    relation_holds,
    render,
    sample_scene,
    scene_batch,
)

__all__ = [
    "COLOURS",
    "HELDOUT_PAIRS",
    "HELDOUT_PROMPTS",
    "IMAGE_SIZE",
    "LORA_TARGETS",
    "PALETTE",
    "RELATIONS",
    "SHAPES",
    "SKILLS",
    "TRAIN_PROMPTS",
    "Detection",
    "ObjectGroup",
    "PromptCheck",
    "PromptError",
    "PromptSpec",
    "SceneObject",
    "ShapesAssetError",
    "ShapesModel",
    "ShapesVelocityNet",
    "assets_dir",
    "check_images",
    "check_prompt",
    "detect_objects",
    "euler_sample",
    "evaluate_prompts",
    "geneval_soft",
    "geneval_strict",
    "layout",
    "load_base_model",
    "parse_prompt",
    "pretrain",
    "pretrain_base_model",
    "relation_holds",
    "render",
    "sample_scene",
    "scene_batch",
    "skill_prompts",
    "skill_summary",
    "smoothness",
    "split_prompts",
    "tokenize",
    "total_variation",
]


register_builtin_task(
    "shapes",
    __name__,
    default_rewards=["shapes_geneval"],
    description=(
        "GenEval-style compositional 16x16 scenes (shapes, colours, counts, positions) "
        "from a small caption-conditioned flow transformer; reward: an exact detector's "
        "fraction of satisfied sub-conditions"
    ),
    # The cores other processes leave idle (trainer/threads.py): two threads take 0.6-0.7x
    # one thread's time on an idle 2-core machine, and far longer when a core is busy.
    threads="auto",
    # `flowdppo train --task shapes`: the budget of configs/shapes/dppo.yaml.
    recommended={
        "train": {"iterations": 150, "group_size": 16},
        "log": {"eval_every": 75, "checkpoint_every": 75, "eval_samples_per_prompt": 8},
    },
    # Methods with SDE steps: the fast rollout (tasks/common.py), evaluated with Euler.
    recommended_sde=FAST_ROLLOUT,
)
