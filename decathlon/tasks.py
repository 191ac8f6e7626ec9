"""The ten Visual Decathlon tasks: a registry of their fixed facts.

Each :class:`TaskSpec` holds what the rest of the pipeline needs to know about one task
without reading any data: the id prefix ``P`` used by every image and category id of the
task, the class count, the RGB normalisation (0-1 scale) and whether a horizontal flip is
a label-preserving augmentation.  Everything else (split sizes, image shapes) is read from
the annotation files at run time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from common.errors import DataError, UsageError

__all__ = ["TaskSpec", "TASKS", "TASK_NAMES", "MASK_TASKS", "SOURCE_TASK", "get_task",
           "task_of_id"]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    prefix: int
    num_classes: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    hflip: bool

    def category_id(self, class_index: int) -> int:
        """The challenge's category id of 0-based class ``class_index`` (P + c + 1)."""
        if not 0 <= class_index < self.num_classes:
            raise UsageError(f"class index {class_index} is outside task {self.name!r} "
                             f"(expected 0..{self.num_classes - 1})")
        return self.prefix + class_index + 1

    def class_index(self, category_id: int) -> int:
        """0-based class index of a category id.  Category names sort as strings
        (omniglot: '1', '10', '100', ...), so the id is the only reliable source."""
        c = int(category_id) - self.prefix - 1
        if not 0 <= c < self.num_classes:
            raise DataError(f"category_id {category_id} is outside task {self.name!r} "
                             f"(expected {self.prefix + 1}..{self.prefix + self.num_classes})")
        return c


# name: (prefix, classes, mean, std, hflip).  P is (alphabetical position + 1) * 1e7.
# Flips are off where mirroring changes the meaning (signs, characters, digits).
_TABLE = {
    "aircraft": (100, (0.4798, 0.5107, 0.5344), (0.2107, 0.2051, 0.2373), True),
    "cifar100": (100, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), True),
    "daimlerpedcls": (2, (0.4820,) * 3, (0.2361,) * 3, True),
    "dtd": (47, (0.5270, 0.4703, 0.4240), (0.2523, 0.2409, 0.2499), True),
    "gtsrb": (43, (0.3392, 0.3118, 0.3205), (0.2756, 0.2658, 0.2709), False),
    "imagenet12": (1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), True),
    "omniglot": (1623, (0.0810,) * 3, (0.2705,) * 3, False),
    "svhn": (10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), False),
    "ucf101": (101, (0.4995, 0.4988, 0.4998), (0.1090, 0.1081, 0.1068), True),
    "vgg-flowers": (102, (0.4341, 0.3831, 0.2971), (0.2851, 0.2384, 0.2640), True),
}

TASK_NAMES: Tuple[str, ...] = tuple(sorted(_TABLE))
TASKS: Dict[str, TaskSpec] = {
    name: TaskSpec(name, (i + 1) * 10_000_000, c, mean, std, flip)
    for i, (name, (c, mean, std, flip)) in enumerate(sorted(_TABLE.items()))
}
SOURCE_TASK = "imagenet12"
# The nine tasks that get a piggyback mask on the imagenet12 backbone.
MASK_TASKS: Tuple[str, ...] = tuple(n for n in TASK_NAMES if n != SOURCE_TASK)


def get_task(name: str) -> TaskSpec:
    """The spec of task ``name``; an unknown name is refused with the valid ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise UsageError(f"unknown decathlon task {name!r}; valid tasks: "
                         f"{', '.join(TASK_NAMES)}") from None


def task_of_id(any_id: int) -> TaskSpec:
    """The task an image or category id belongs to, from its prefix."""
    index = int(any_id) // 10_000_000 - 1
    if not 0 <= index < len(TASK_NAMES):
        raise DataError(f"id {any_id} carries no decathlon task prefix")
    return TASKS[TASK_NAMES[index]]
