"""What a run learns: classification (a label per image) or segmentation (a label per
pixel).  The roles ask the task for everything that differs -- how splits load, the
training loss and batch transform, evaluation, the test fields of a metrics row -- so the
round modules hold no task-specific branch, and strategies, secure aggregation, resume and
the watchdog, which see only the flat weights, work for both unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping

from fedsilo.errors import ConfigError

if TYPE_CHECKING:
    from fedsilo.config import Config
    from fedsilo.shards import Manifest

#: the test figures of a segmentation metrics row, after classification's acc/auc/loss
SEGMENTATION_FIELDS = ("dice", "iou", "hd95", "dice_per_class", "iou_per_class")


def resolve_task(config: "Config", manifest: "Manifest") -> "Config":
    """``config`` with ``task`` set to the shard set's (``auto``), its checks run again;
    a task that contradicts the shard set is a ConfigError."""
    task = manifest.task if config.task == "auto" else config.task
    if task != manifest.task:
        raise ConfigError(f"task={config.task} but the shard set in {config.data.dir} is for "
                          f"{manifest.task}")
    return config if config.task == task else dataclasses.replace(
        config, task=task)  # type: ignore[arg-type]


def fields_of_test(test: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a metrics row that come from a test evaluation.

    >>> fields_of_test({"acc": 0.9, "auc": 0.8, "loss": 0.3, "num_samples": 4})
    {'acc': 0.9, 'auc': 0.8, 'loss': 0.3}
    """
    fields = {"acc": test["acc"], "auc": test["auc"], "loss": test["loss"]}
    fields.update({k: test[k] for k in SEGMENTATION_FIELDS if k in test})
    return fields


def build_task(config: "Config") -> Any:
    """The task object of a resolved ``config`` (torch is imported here)."""
    if config.task == "segmentation":
        from fedsilo.segmentation.task import SegmentationTask

        return SegmentationTask(config.segmentation)
    from fedsilo.training import ClassificationTask

    return ClassificationTask()
