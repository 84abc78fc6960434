"""clip-trainer: train and fine-tune CLIP models on image-caption data, the Hugging Face way.

The public API, in pipeline order: the argument classes, the data loader, the collator, the loss functions and
objects, and the trainer. `python run_clip.py CONFIG.json [--flag value ...]` runs all of them (see
`clip_trainer.run.main`).
"""

from .arguments import CLIPTrainingArguments, ConfigError, DataArguments, ModelArguments, parse_arguments
from .augmentation import ImageAugmentation
from .collator import ImageTextCollator
from .data import ImageTextData, load_image_text_data
from .loss import clip_loss, contrastive_loss, distributed_clip_loss, sigmoid_contrastive_loss
from .losses import ContrastiveLoss, SigmoidContrastiveLoss, SoftmaxContrastiveLoss, build_loss
from .model_card import CLIPModelCardData
from .preprocessing import ImagePreprocessor
from .trainer import CLIPContrastiveTrainer
from .version import __version__

__all__ = [
    "__version__",
    "CLIPContrastiveTrainer",
    "CLIPModelCardData",
    "CLIPTrainingArguments",
    "ConfigError",
    "ContrastiveLoss",
    "DataArguments",
    "ImageAugmentation",
    "ImagePreprocessor",
    "ImageTextCollator",
    "ImageTextData",
    "ModelArguments",
    "SigmoidContrastiveLoss",
    "SoftmaxContrastiveLoss",
    "build_loss",
    "clip_loss",
    "contrastive_loss",
    "distributed_clip_loss",
    "load_image_text_data",
    "parse_arguments",
    "sigmoid_contrastive_loss",
]
