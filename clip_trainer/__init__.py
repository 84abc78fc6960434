"""clip-trainer: train and fine-tune CLIP models on image-caption data, the Hugging Face way.

The public API, in pipeline order: the argument classes, the data loader, the collator, the loss functions and
objects, the trainer, and the evaluator that scores a model alone. `python run_clip.py CONFIG.json [--flag value
...]` runs all of them (see `clip_trainer.run.main`).

Names are imported on first use (PEP 562), so that `run_clip.py` can check its command line, and answer `--help`,
before torch is imported.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from .threads import set_openmp_environment
from .version import __version__

# The CPU thread policy (clip_trainer/threads.py), set before torch loads OpenMP, which reads it only then: importing
# clip_trainer is the first thing `run_clip.py` and the `clip-trainer` command do, and what a script does before
# importing torch gets it too. An `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` already set wins.
if "torch" not in sys.modules:
    set_openmp_environment()

_EXPORTS = {
    "ARGUMENT_CLASSES": ".arguments",
    "CLIPTrainingArguments": ".arguments",
    "DataArguments": ".arguments",
    "ModelArguments": ".arguments",
    "ConfigError": ".errors",
    "parse_arguments": ".command_line",
    "check_arguments": ".validation",
    "ImageTextData": ".data",
    "load_image_text_data": ".data",
    "ImageAugmentation": ".augmentation",
    "ImagePreprocessor": ".preprocessing",
    "ImageTextCollator": ".collator",
    "clip_loss": ".loss",
    "contrastive_loss": ".loss",
    "distributed_clip_loss": ".loss",
    "distillation_loss": ".loss",
    "sigmoid_contrastive_loss": ".loss",
    "ContrastiveLoss": ".losses",
    "SigmoidContrastiveLoss": ".losses",
    "SoftmaxContrastiveLoss": ".losses",
    "DistillationLoss": ".losses",
    "build_loss": ".losses",
    "Teacher": ".distillation",
    "RetrievalEvaluator": ".evaluation",
    "CLIPContrastiveTrainer": ".trainer",
    "CLIPModelCardData": ".model_card",
    "extend_text_positions": ".positions",
}

__all__ = [
    "__version__",
    "ARGUMENT_CLASSES",
    "CLIPContrastiveTrainer",
    "CLIPModelCardData",
    "CLIPTrainingArguments",
    "ConfigError",
    "ContrastiveLoss",
    "DataArguments",
    "DistillationLoss",
    "ImageAugmentation",
    "ImagePreprocessor",
    "ImageTextCollator",
    "ImageTextData",
    "ModelArguments",
    "RetrievalEvaluator",
    "SigmoidContrastiveLoss",
    "SoftmaxContrastiveLoss",
    "Teacher",
    "build_loss",
    "check_arguments",
    "clip_loss",
    "contrastive_loss",
    "distillation_loss",
    "distributed_clip_loss",
    "extend_text_positions",
    "load_image_text_data",
    "parse_arguments",
    "sigmoid_contrastive_loss",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'clip_trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from .arguments import ARGUMENT_CLASSES, CLIPTrainingArguments, DataArguments, ModelArguments
    from .augmentation import ImageAugmentation
    from .collator import ImageTextCollator
    from .command_line import parse_arguments
    from .data import ImageTextData, load_image_text_data
    from .distillation import Teacher
    from .errors import ConfigError
    from .evaluation import RetrievalEvaluator
    from .loss import clip_loss, contrastive_loss, distillation_loss, distributed_clip_loss, sigmoid_contrastive_loss
    from .losses import (
        ContrastiveLoss,
        DistillationLoss,
        SigmoidContrastiveLoss,
        SoftmaxContrastiveLoss,
        build_loss,
    )
    from .model_card import CLIPModelCardData
    from .positions import extend_text_positions
    from .preprocessing import ImagePreprocessor
    from .trainer import CLIPContrastiveTrainer
    from .validation import check_arguments
