"""Embeds texts and images with transformers 4.x from a clip-trainer output folder, as a user of 4.x would.

Run by tests/test_consumers.py with the Python of an environment that has transformers 4.57 (`.venv-transformers4`,
made by .ci/run); it imports neither clip_trainer nor anything of the test suite.

    python transformers4_embed.py REQUEST.json

REQUEST.json: {"model_dir": ..., "padding": "longest" | "max_length", "max_length": N, "texts": [...],
"images": [paths]}. Prints one JSON object: transformers_version, tokenizer_class, input_ids, attention_mask,
pixel_values, text_embeds, image_embeds (nested lists).
"""

import json
import sys

import torch
import transformers
from PIL import Image
from transformers import AutoModel, AutoProcessor, AutoTokenizer


def main(path: str) -> None:
    with open(path, encoding="utf-8") as handle:
        request = json.load(handle)
    folder = request["model_dir"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    text = tokenizer(
        request["texts"],
        padding=request["padding"],
        truncation=True,
        max_length=request["max_length"],
        return_tensors="pt",
    )
    images = [Image.open(file).convert("RGB") for file in request["images"]]
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        text_embeds = model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        image_embeds = model.get_image_features(pixel_values=pixel_values)
    json.dump(
        {
            "transformers_version": transformers.__version__,
            "tokenizer_class": type(tokenizer).__name__,
            "input_ids": text["input_ids"].tolist(),
            "attention_mask": text["attention_mask"].tolist(),
            "pixel_values": pixel_values.tolist(),
            "text_embeds": text_embeds.tolist(),
            "image_embeds": image_embeds.tolist(),
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main(sys.argv[1])
