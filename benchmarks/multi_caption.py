"""Several captions per image on the bundled emoji data: per-epoch caption sampling with the same-image mask, against
training on every caption as its own pair with rows of one image as each other's negatives (clip-trainer before).

The multi-caption version of the demo data gives each emoji three captions, all from its bundled columns: its CLDR
name (`thumbs up: medium skin tone`), the name with its Unicode subgroup (`thumbs up: medium skin tone, hand fingers
closed`), and the name with its group (`people & body emoji: thumbs up: medium skin tone`). 15% of the images are
held out (the same ones for every seed); evaluation scores all three captions of each, as clip-trainer always does.
Each arm trains the demo's small CLIP from scratch (`configs/models/clip-tiny-64px.json`, the demo's settings) for
the same number of optimizer steps, so each sees the same number of pairs:

- `sampled + mask`: the default, `caption_sampling uniform`: one row per image, one of its captions drawn per
  epoch; rows of one image are never negatives (here only the 14 emoji whose pictures are identical meet that way);
- `all captions + mask`: `caption_sampling all`: every caption a pair every epoch, the same-image mask on;
- `all captions, no mask`: every caption a pair, and a batch's other captions of the same image count as negatives
  (a loss registered here that drops the image ids: what clip-trainer did before).

Every run is clip-trainer's own command (`clip_trainer.run.main`). It prints one table (median of the seeds, with each
seed's value) and one line of JSON. About an hour on a shared 2-core CPU with the defaults:

    python benchmarks/multi_caption.py [--seeds 0 1 2] [--max_steps 300] [--work_dir DIR]

`--write_data DIR` only writes the multi-caption data (a prepared folder, with a `negatives` column: the names of two
other emoji of the same subgroup, for `hard_negative_column`) and stops:

    python benchmarks/multi_caption.py --write_data data/emoji-captions
    python run_clip.py configs/demo.json --dataset_name data/emoji-captions --hard_negative_column negatives
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

import datasets
from datasets import DatasetDict

from clip_trainer.demo_data import load_emoji_dataset
from clip_trainer.losses import SoftmaxContrastiveLoss
from clip_trainer.run import main as run

REPO = Path(__file__).resolve().parent.parent
METRICS = ("t2i_recall@10", "i2t_recall@10", "t2i_recall@1", "mean_recall")
SETTINGS = ["--config_name", str(REPO / "configs" / "models" / "clip-tiny-64px.json"), "--tokenizer_vocab_size",
            "2048", "--per_device_train_batch_size", "64", "--per_device_eval_batch_size", "256", "--learning_rate",
            "1e-3", "--weight_decay", "0.1", "--warmup_steps", "50", "--lr_scheduler_type", "cosine",
            "--eval_strategy", "no", "--do_train", "--do_eval", "--save_strategy", "no", "--report_to", "none",
            "--logging_steps", "50", "--dataloader_num_workers", "1", "--augment", "true"]  # fmt: skip
ARMS = {
    "sampled + mask": ["--caption_sampling", "uniform"],
    "all captions + mask": ["--caption_sampling", "all"],
    "all captions, no mask": ["--caption_sampling", "all", "--loss_type", "softmax-unmasked"],
}


class UnmaskedSoftmaxLoss(SoftmaxContrastiveLoss):
    """CLIP's loss with the image ids dropped: captions of one image in a batch are each other's negatives."""

    name = "softmax-unmasked"
    card_text = "CLIP's contrastive loss without the same-image mask"

    def __call__(self, image_embeds, text_embeds, *scalars, pad_to=None, valid=None, image_ids=None, **rest):
        return super().__call__(image_embeds, text_embeds, *scalars, pad_to=pad_to, valid=valid, **rest)


def multi_caption_emoji(seed: int = 0) -> DatasetDict:
    """The emoji data with three captions per image and two same-subgroup hard negatives; 15% of images held out."""
    emoji = load_emoji_dataset().cast_column("image", datasets.Image(decode=False))
    names = emoji["caption"]
    by_subgroup: dict[str, list[str]] = {}
    for name, subgroup in zip(names, emoji["subgroup"]):
        by_subgroup.setdefault(subgroup, []).append(name)
    rng = random.Random(seed)

    def captions(row: dict) -> dict:
        name, subgroup, group = row["caption"], row["subgroup"], row["group"]
        others = [other for other in by_subgroup[subgroup] if other != name]
        return {
            "caption": [name, f"{name}, {subgroup.replace('-', ' ')}", f"{group.lower()} emoji: {name}"],
            "negatives": rng.sample(others, min(2, len(others))),
        }

    features = emoji.features.copy()
    features["caption"] = datasets.List(datasets.Value("string"))
    features["negatives"] = datasets.List(datasets.Value("string"))
    multi = emoji.map(captions, features=features, desc="Writing captions")
    split = multi.train_test_split(test_size=0.15, seed=seed)
    return DatasetDict(train=split["train"], validation=split["test"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=300, help="Optimizer steps of every arm.")
    parser.add_argument("--work_dir", default=None, help="Where to write data and models (default: a temp folder).")
    parser.add_argument("--write_data", default=None, help="Only write the multi-caption data to this folder.")
    args = parser.parse_args(argv)
    if args.write_data:
        multi_caption_emoji().save_to_disk(args.write_data)
        print(f"Wrote {args.write_data}: train with --dataset_name {args.write_data}", flush=True)
        return {}
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="multi-caption-"))
    data = work_dir / "data"
    if not data.is_dir():
        multi_caption_emoji().save_to_disk(data)

    values: dict[str, dict[str, list[float]]] = {arm: {metric: [] for metric in METRICS} for arm in ARMS}
    for seed in args.seeds:
        for arm, flags in ARMS.items():
            out = work_dir / f"{arm.replace(' ', '-').replace(',', '').replace('+', 'and')}-{seed}"
            results = run([*SETTINGS, *flags, "--dataset_name", str(data), "--max_steps", str(args.max_steps),
                           "--seed", str(seed), "--output_dir", str(out), "--overwrite_output_dir", "true"])  # fmt: skip
            for metric in METRICS:
                values[arm][metric].append(results[f"eval_{metric}"])
            print(f"seed {seed}, {arm}: " + ", ".join(f"{m} {values[arm][m][-1]:.3f}" for m in METRICS), flush=True)

    print(f"\n{len(args.seeds)} seeds, {args.max_steps} steps of 64 pairs each; held-out emoji, 3 captions each; median "
          "(each seed's value)")  # fmt: skip
    print("| arm | " + " | ".join(METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    rows = {}
    for arm in ARMS:
        rows[arm] = {metric: statistics.median(values[arm][metric]) for metric in METRICS}
        cells = [
            f"{rows[arm][m]:.3f} ({', '.join(f'{v:.3f}' for v in values[arm][m])})" for m in METRICS
        ]  # fmt: skip
        print(f"| {arm} | " + " | ".join(cells) + " |")
    summary = {"seeds": args.seeds, "max_steps": args.max_steps, "median": rows, "values": values}
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1:])
