"""Data loading throughput: decoded and collated samples per second per DataLoader worker, by storage format and source
image size, against what one GPU step needs.

Three formats hold the same JPEGs, each read the way a run reads it (`load_image_text_data`):

  tar      WebDataset shards (`--train_file "shards/*.tar" --streaming true`), JPEG bytes read from the tar;
  parquet  a prepared folder (`--prepare_only` writes it: `save_to_disk` with the image bytes), loaded;
  files    a CSV of image paths, the JPEG files on disk, loaded.

Each batch goes through clip-trainer's real `ImageTextCollator` (decode, resize the short side to 224, centre-crop
224x224 as ViT-B/32's `CLIPImageProcessorPil`, uint8 pixels; tokenize the captions) in a torch DataLoader with 1 and
2 workers. Samples/s is wall time from the first timed batch to the last (after warm-up batches that start the
workers); per worker is that over the workers. The last columns compare with the rate one GPU trains ViT-B/32 at
(6,300 samples/s, the throughput target of `benchmarks/throughput.py`) and the workers that implies.

Usage:
    python benchmarks/data_loading.py                 # about a minute on 2 CPU cores
    python benchmarks/data_loading.py --jpeg-draft    # JPEG draft decoding (reduced-size DCT), as --jpeg_draft true
    python benchmarks/data_loading.py --images 1024 --batches 12 --workers 1,2,4

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import math
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from clip_trainer.threads import set_openmp_environment

# The project's CPU thread policy (clip_trainer/threads.py), before torch loads OpenMP: the benchmark measures what a run
# gets.
set_openmp_environment()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import CLIPImageProcessorPil  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clip_trainer.arguments import DataArguments  # noqa: E402
from clip_trainer.collator import ImageTextCollator  # noqa: E402
from clip_trainer.data import load_image_text_data  # noqa: E402
from clip_trainer.preprocessing import ImagePreprocessor  # noqa: E402
from clip_trainer.tokenization import train_caption_tokenizer  # noqa: E402

GPU_SAMPLES_PER_SECOND = 6300  # ViT-B/32 on one H100/H200, bf16 (benchmarks/throughput.py's target)
SHARDS = 4
BATCH_SIZE = 64
FORMATS = ("tar", "parquet", "files")


def photo_like(rng: np.random.Generator, size: int) -> PIL.Image.Image:
    """A `size`-px image with smooth gradients, shapes and grain, so that its JPEG is about as large as a photo's."""
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(x * rng.uniform(2, 9)), np.cos(y * rng.uniform(2, 9)), np.sin((x + y) * 5)], -1)
    pixels = (base * 0.5 + 0.5) * 200 + rng.normal(0, 12, (size, size, 3))
    return PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_sources(folder: Path, images: int, size: int, seed: int) -> dict[str, DataArguments]:
    """The same JPEGs (4:3, short side `size`) as tar shards, a prepared parquet folder and a CSV of files."""
    rng = np.random.default_rng(seed)
    (folder / "files").mkdir(parents=True)
    (folder / "shards").mkdir()
    rows = []
    tars = [tarfile.open(folder / "shards" / f"{shard:05d}.tar", "w") for shard in range(SHARDS)]
    for index in range(images):
        image = photo_like(rng, size).resize((size * 4 // 3, size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        data, caption, key = buffer.getvalue(), f"a synthetic photo number {index}", f"{index:06d}"
        (folder / "files" / f"{key}.jpg").write_bytes(data)
        for name, payload in ((f"{key}.jpg", data), (f"{key}.txt", caption.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tars[index % SHARDS].addfile(info, io.BytesIO(payload))
        rows.append({"image": f"files/{key}.jpg", "caption": caption, "bytes": data})
    for tar in tars:
        tar.close()
    with (folder / "pairs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows([row["image"], row["caption"]] for row in rows)
    features = datasets.Features({"image": datasets.Image(decode=False), "caption": datasets.Value("string")})
    prepared = datasets.Dataset.from_dict(
        {"image": [{"bytes": row["bytes"], "path": None} for row in rows], "caption": [r["caption"] for r in rows]},
        features=features,
    )
    datasets.DatasetDict({"train": prepared}).save_to_disk(str(folder / "prepared"))
    return {
        "tar": DataArguments(train_file=str(folder / "shards" / "*.tar"), streaming=True, shuffle_buffer_size=256),
        "parquet": DataArguments(dataset_name=str(folder / "prepared")),
        "files": DataArguments(train_file=str(folder / "pairs.csv")),
    }


def measure(dataset, collator: ImageTextCollator, workers: int, warmup: int, batches: int) -> float:
    """Samples per second of `batches` collated batches after `warmup` ones, from a DataLoader with `workers`."""
    loader = DataLoader(
        dataset,
        batch_size=BATCH_SIZE,
        num_workers=workers,
        collate_fn=collator,
        persistent_workers=False,
        prefetch_factor=2,
        shuffle=False,
    )
    done, start, iterator = 0, None, iter(loader)
    while done < warmup + batches:
        try:
            batch = next(iterator)
        except StopIteration:  # a loaded split shorter than the run: go round again
            iterator = iter(loader)
            continue
        done += 1
        if done == warmup:
            start = time.perf_counter()
    elapsed = time.perf_counter() - start
    del iterator
    return batches * batch["pixel_values"].shape[0] / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="images per source size")
    parser.add_argument("--sizes", default="256,640", help="source short-side sizes in px")
    parser.add_argument("--workers", default="1,2", help="DataLoader worker counts")
    parser.add_argument("--batches", type=int, default=4, help=f"timed batches of {BATCH_SIZE}, per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="batches before timing (workers starting)")
    parser.add_argument("--jpeg-draft", action="store_true", help="decode JPEGs at reduced scale (--jpeg_draft)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    worker_counts = [int(count) for count in args.workers.split(",")]

    tokenizer = train_caption_tokenizer([f"a synthetic photo number {i}" for i in range(200)], vocab_size=300)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    collator = ImageTextCollator(
        tokenizer=tokenizer,
        image_preprocessor=ImagePreprocessor.from_image_processor(processor),
        max_seq_length=77,
        jpeg_draft=args.jpeg_draft,
    )
    results = []
    with tempfile.TemporaryDirectory() as root:
        for size in sizes:
            sources = write_sources(Path(root) / str(size), args.images, size, args.seed)
            for name in FORMATS:
                data = load_image_text_data(sources[name], seed=args.seed, evaluate=False)
                for workers in worker_counts:
                    rate = measure(data.train, collator, workers, args.warmup, args.batches)
                    per_worker = rate / workers
                    results.append(
                        {
                            "format": name,
                            "source_px": size,
                            "workers": workers,
                            "samples_per_second": round(rate, 1),
                            "per_worker": round(per_worker, 1),
                            "workers_for_gpu": math.ceil(GPU_SAMPLES_PER_SECOND / per_worker),
                        }
                    )
                    print(f"{name:8s} {size:4d} px  {workers} worker(s): {rate:7.1f} samples/s", flush=True)

    machine = f"{os.cpu_count()}-core {platform.machine()} CPU"
    print(
        f"\n{datetime.date.today().isoformat()}, {machine}, batch {BATCH_SIZE}, 224 px crop, "
        f"jpeg_draft={args.jpeg_draft}; one GPU step of ViT-B/32 needs {GPU_SAMPLES_PER_SECOND:,} samples/s\n"
    )
    print("| format | source | workers | samples/s | per worker | workers for 6,300/s |")
    print("|---|---|---|---|---|---|")
    for row in results:
        print(
            f"| {row['format']} | {row['source_px']} px | {row['workers']} | {row['samples_per_second']:,.0f} | "
            f"{row['per_worker']:,.0f} | {row['workers_for_gpu']:,} |"
        )
    print(
        json.dumps({"machine": machine, "jpeg_draft": args.jpeg_draft, "batch_size": BATCH_SIZE, "results": results})
    )


if __name__ == "__main__":
    main()
