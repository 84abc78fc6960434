"""Write the emoji demo's held-out pairs as two CLIP_benchmark WebDataset folders, offline.

CLIP_benchmark reads a local WebDataset with `--dataset wds/NAME --dataset_root DIR`: `DIR/test/nshards.txt` and
`DIR/test/0.tar`, plus `classnames.txt` and `zeroshot_classification_templates.txt` (`{c}` stands for the class
name) for zero-shot classification, or `dataset_type.txt` saying `retrieval` for image-text retrieval. This writes

- `OUTPUT/emoji_groups/`: each distinct held-out image (`.png`) once, with its emoji group as class index (`.cls`),
  the demo's nine group names and its three templates (an image that several held-out emoji share is one sample with
  the class of its first row, as clip-trainer's own zero-shot evaluation counts it);
- `OUTPUT/emoji_captions/`: each distinct held-out image with its captions (`.txt`, one a line: some emoji share a
  picture), for retrieval, as clip-trainer's own retrieval evaluation groups them.

The held-out pairs are those `configs/demo.json` evaluates on (`validation_split_percentage` 15, `seed` 42), so
CLIP_benchmark's numbers can be set beside `outputs/demo/eval_results.json`:

    python scripts/clip_benchmark_data.py --output clip_benchmark_data
"""

from __future__ import annotations

import argparse
import io
import logging
import tarfile
from pathlib import Path

import datasets
import torch

from clip_trainer import DataArguments, load_image_text_data
from clip_trainer.evaluation import zeroshot_rows

logger = logging.getLogger(__name__)

# configs/demo.json's zero-shot templates, in CLIP_benchmark's spelling.
TEMPLATES = ["{c}", "an emoji of {c}", "a {c} emoji"]


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_shard(folder: Path, samples: list[dict[str, bytes]]) -> None:
    """`folder/test/0.tar` holding `samples` (extension -> bytes, keyed by position) and `nshards.txt`."""
    (folder / "test").mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "test" / "0.tar", "w") as archive:
        for index, sample in enumerate(samples):
            for extension, data in sample.items():
                _add(archive, f"{index:06d}.{extension}", data)
    (folder / "test" / "nshards.txt").write_text("1\n")


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="folder to write emoji_groups/ and emoji_captions/ into.")
    parser.add_argument(
        "--seed", type=int, default=42, help="the training run's seed, which draws the held-out pairs."
    )
    parser.add_argument("--validation_split_percentage", type=float, default=15)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    data_args = DataArguments(
        dataset_name="emoji", label_column="label", validation_split_percentage=args.validation_split_percentage
    )
    validation = load_image_text_data(data_args, seed=args.seed, evaluate=True).validation
    validation = validation.cast_column("image", datasets.Image())  # clip-trainer keeps the bytes undecoded
    classnames = validation.features["label"].names
    images = [png_bytes(image) for image in validation["image"]]
    output = Path(args.output)

    groups = output / "emoji_groups"
    # One sample per image, chosen by the rule of clip-trainer's zero-shot accuracy, so that both score the same images.
    rows, labels = zeroshot_rows(torch.tensor(validation["label"]), validation["_image_id"])
    write_shard(
        groups,
        [{"png": images[row], "cls": str(label).encode()} for row, label in zip(rows.tolist(), labels.tolist())],
    )
    (groups / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (groups / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")

    captions = output / "emoji_captions"
    by_image: dict[int, list[int]] = {}
    for row, image_id in enumerate(validation["_image_id"]):
        by_image.setdefault(image_id, []).append(row)
    texts = validation["caption"]
    samples = [
        {"png": images[rows[0]], "txt": "\n".join(texts[row] for row in rows).encode()} for rows in by_image.values()
    ]
    write_shard(captions, samples)
    (captions / "dataset_type.txt").write_text("retrieval\n")
    logger.info(
        f"Wrote the {len(rows)} distinct images of the {len(images)} held-out pairs to {groups} ({len(classnames)} "
        f"classes) and, with their captions, to {captions}."
    )


if __name__ == "__main__":
    main()
