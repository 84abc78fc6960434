"""clip-trainer: train and fine-tune CLIP models on image-caption data, the Hugging Face way."""

__version__ = "0.1.0"
