"""Write the bundled emoji demo data in CLIP_benchmark's WebDataset layout, to try `--clip_benchmark_dataset` offline.

    python scripts/export_clip_benchmark.py --output data/wds_emoji_groups                      # classification
    python scripts/export_clip_benchmark.py --output data/wds_emoji_captions --task retrieval   # retrieval

Classification: each emoji's image (lossless WebP, as `clip_benchmark_export_wds` writes) with its Unicode group's
index as `.cls`, the 9 group names in `classnames.txt` and the demo's prompts in
`zeroshot_classification_templates.txt`. Retrieval: each image with its CLDR name as `.txt`, and `dataset_type.txt`
saying retrieval. Samples are keyed `s0000000`, ... and written `--shard_size` to a shard as `test/0.tar`, ... with
`test/nshards.txt`, as CLIP_benchmark writes them. Every emoji is written (training rows of the demo included): the
set shows the format, it is no held-out benchmark.
"""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

# The demo's prompts (configs/demo.json), in CLIP_benchmark's `{c}` form.
TEMPLATES = ("{c}", "an emoji of {c}", "a {c} emoji")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def export(output: Path, task: str = "classification", limit: int | None = None, shard_size: int = 1000) -> int:
    """Writes the layout into `output`; returns the number of samples written."""
    from clip_trainer.demo_data import load_emoji_dataset

    dataset = load_emoji_dataset()
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    split = output / "test"
    split.mkdir(parents=True, exist_ok=True)
    if task == "classification":
        names = dataset.features["label"].names
        (output / "classnames.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
        (output / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n", encoding="utf-8")
    else:
        (output / "dataset_type.txt").write_text("retrieval\n", encoding="utf-8")
    shards = 0
    tar = None
    for index, row in enumerate(dataset):
        if index % shard_size == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(split / f"{shards}.tar", "w")
            shards += 1
        image = io.BytesIO()
        row["image"].save(image, format="webp", lossless=True)
        key = f"s{index:07d}"
        _add(tar, f"{key}.webp", image.getvalue())
        if task == "classification":
            _add(tar, f"{key}.cls", str(row["label"]).encode())
        else:
            _add(tar, f"{key}.txt", row["caption"].replace("\n", " ").encode("utf-8"))
    if tar is not None:
        tar.close()
    (split / "nshards.txt").write_text(f"{shards}\n", encoding="utf-8")
    return len(dataset)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, type=Path, help="the dataset folder to write")
    parser.add_argument("--task", choices=["classification", "retrieval"], default="classification")
    parser.add_argument("--limit", type=int, default=None, help="write only the first N emoji")
    parser.add_argument("--shard_size", type=int, default=1000, help="samples per tar shard")
    args = parser.parse_args(argv)
    count = export(args.output, args.task, args.limit, args.shard_size)
    print(f"Wrote {count} samples to {args.output} ({args.task}).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
