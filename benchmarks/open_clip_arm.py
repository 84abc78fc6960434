"""open_clip's side of `benchmarks/compare.py`; runs with the open_clip environment's Python (`.venv-open-clip`).

Two commands, each given a JSON file of settings written by compare.py:

- `train SETTINGS.json`: registers the benchmark's model config (the architecture of the HF config, see
  `open_clip_model_config` in compare.py) with `open_clip.add_model_config`, then runs open_clip's own training script,
  `open_clip_train.main.main(argv)`, unchanged. Its `train_one_epoch` is wrapped with a wall-clock timer (the
  training steps' time, as `train_runtime` is for the Trainer) and the totals written to `timing.json`.
- `embed SETTINGS.json`: loads the saved checkpoint with open_clip's own API and writes the normalised embeddings of
  the held-out images (the pixels compare.py prepared, the same for every arm) and captions (open_clip's tokenizer).

This file imports only open_clip, torch and the standard library: clip_trainer is not installed in that environment.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _train(settings: dict) -> None:
    import open_clip
    import open_clip_train.main as train_main

    open_clip.add_model_config(settings["model_config"])
    timing = {"train_seconds": 0.0, "epochs": 0}
    one_epoch = train_main.train_one_epoch

    def timed_epoch(*args, **kwargs):
        began = time.perf_counter()
        try:
            return one_epoch(*args, **kwargs)
        finally:
            timing["train_seconds"] += time.perf_counter() - began
            timing["epochs"] += 1

    train_main.train_one_epoch = timed_epoch
    train_main.main(settings["argv"])
    Path(settings["timing"]).write_text(json.dumps(timing))


def _embed(settings: dict) -> None:
    import numpy as np
    import open_clip
    import torch

    open_clip.add_model_config(settings["model_config"])
    model = open_clip.create_model(settings["model_name"], pretrained=settings["checkpoint"], device="cpu")
    model.eval()
    tokenizer = open_clip.get_tokenizer(settings["model_name"])
    pixels = torch.from_numpy(np.load(settings["pixels"]))
    captions = json.loads(Path(settings["captions"]).read_text())
    images, texts = [], []
    with torch.no_grad():
        for start in range(0, len(captions), 256):
            images.append(model.encode_image(pixels[start : start + 256], normalize=True))
            texts.append(model.encode_text(tokenizer(captions[start : start + 256]), normalize=True))
    np.save(settings["image_embeds"], torch.cat(images).numpy())
    np.save(settings["text_embeds"], torch.cat(texts).numpy())


if __name__ == "__main__":
    command, path = sys.argv[1], sys.argv[2]
    {"train": _train, "embed": _embed}[command](json.loads(Path(path).read_text()))
