"""Streaming: a run from local parquet shards trains, evaluates and saves; the demo streams; held-out pairs stay out
of training; relative image paths of globbed files resolve against each file's folder, streamed or not; processes
read disjoint data."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from pathlib import Path

import datasets
import pytest
from accelerate.data_loader import prepare_data_loader
from conftest import draw_shape, drop_option, shape_rows, write_shapes_csv
from torch.utils.data import DataLoader
from transformers import CLIPModel

from clip_trainer.arguments import DataArguments
from clip_trainer.captions import image_key
from clip_trainer.data import load_image_text_data
from clip_trainer.run import main

REPO = Path(__file__).resolve().parents[1]

FEATURES = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})


@pytest.fixture(autouse=True)
def _short_parquet_shutdown_wait(monkeypatch):
    """`datasets` waits 5 s for arrow's reader threads whenever a parquet stream is left before its end (apache/arrow
    issue 45214), which these tests do a dozen times; a short wait does here, where the readers are idle."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.1)


def write_parquet_shards(folder: Path, shards: int) -> Path:
    """`shards` parquet files of the 24 shape pairs, images as PNG bytes; each shard draws at its own size, so no
    two rows share an image."""
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        images, captions = [], []
        for color, shape, background, caption in shape_rows():
            buffer = io.BytesIO()
            draw_shape(color, shape, background, size=36 + 4 * shard).save(buffer, format="PNG")
            images.append({"bytes": buffer.getvalue(), "path": None})
            captions.append(caption)
        dataset = datasets.Dataset.from_dict({"image": images, "caption": captions}, features=FEATURES)
        dataset.to_parquet(folder / f"train-{shard:05d}-of-{shards:05d}.parquet")
    return folder


def streaming_args(**kwargs) -> DataArguments:
    # A buffer of a few dozen rows fills at once; the default one would first read ~10,000 rows of the repeated stream.
    return DataArguments(streaming=True, shuffle_buffer_size=64, **kwargs)


def load_streaming_data(data_args: DataArguments, seed: int):
    return load_image_text_data(data_args, seed=seed)


def pair_key(row: dict) -> tuple[str, str]:
    return image_key(row, "image"), row["caption"]


def test_streaming_run_trains_evaluates_and_saves(base_args, tmp_path):
    shards = write_parquet_shards(tmp_path / "shards", shards=3)
    out = tmp_path / "out"
    results = main(
        [
            *drop_option(base_args, "train_file"),
            "--dataset_name", str(shards),
            "--streaming", "true",
            "--max_steps", "6",
            "--max_eval_samples", "16",
            "--shuffle_buffer_size", "64",
            "--gradient_accumulation_steps", "2",  # cached accumulation over a stream
            "--logging_steps", "2",
            "--do_train", "true",
            "--do_eval", "true",
        ]
    )  # fmt: skip
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert results["eval_samples"] == 16 and "eval_loss" in results
    assert any(key.startswith("eval_") and "recall" in key for key in results)
    CLIPModel.from_pretrained(out)


def test_held_out_pairs_are_never_trained_on(tmp_path):
    shards = write_parquet_shards(tmp_path / "shards", shards=2)
    data = load_streaming_data(streaming_args(dataset_name=str(shards), max_eval_samples=10), seed=0)
    assert len(data.validation) == 10 and "_image_id" in data.validation.column_names
    held_out = {pair_key(row) for row in data.validation}
    assert len(held_out) == 10
    # The stream repeats without end; 400 draws of the 38 pairs left include every one of them, and no held-out one.
    trained = [pair_key(row) for row in data.train.take(400)]
    assert not held_out & set(trained)
    assert len(set(trained)) == 38


@pytest.mark.slow
def test_the_demo_streams(tmp_path, monkeypatch):
    """The documented command, from another working folder: the streamed demo keeps its label column for zero-shot."""
    monkeypatch.chdir(tmp_path)
    results = main(
        [str(REPO / "configs" / "demo.json"), "--streaming", "true", "--max_steps", "50",
         "--output_dir", str(tmp_path / "demo"), "--report_to", "none", "--dataloader_num_workers", "0",
         "--dataloader_persistent_workers", "false"]
    )  # fmt: skip
    # 50 steps of the demo's batch 64; the held-out 15% of its images (547), with their 550 captions at seed 42
    assert results["train_samples"] == 50 * 64 and results["eval_samples"] == 550
    assert "eval_zeroshot_top1" in results and "eval_t2i_recall@10" in results


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "loaded"])
def test_a_glob_of_csvs_in_several_folders_resolves_each_against_its_own(tmp_path, monkeypatch, streaming):
    # Each folder has its own images/ with the same file names but other pictures (drawn at other sizes).
    for index, name in enumerate(("a", "b")):
        write_shapes_csv(tmp_path / "data" / name, repeats=1 + index, name="pairs.csv")
    for color, shape, background, _ in shape_rows():  # b's first 24 would be a's pictures (one image each)
        draw_shape(color, shape, background, size=36).save(
            tmp_path / f"data/a/images/{color}_{shape}_{background}_0.png"
        )
    monkeypatch.chdir(tmp_path)  # a relative glob, as a user types it
    data_args = DataArguments(
        train_file="data/*/pairs.csv",
        streaming=streaming,
        shuffle_buffer_size=64,
        max_eval_samples=8 if streaming else None,
    )
    data = load_image_text_data(data_args, seed=0)
    rows = list(data.train.take(200)) if streaming else list(data.train)
    rows += list(data.validation)
    paths = {row["image"] for row in rows}
    assert all(Path(path).is_absolute() and Path(path).is_file() for path in paths)
    assert {Path(path).parts[-3] for path in paths} == {"a", "b"}  # each file's images, from its own folder
    assert not any("*" in path for path in paths)
    assert len(paths) == 24 + 48  # every image of both folders


def _rank_rows(stream: datasets.IterableDataset, rank: int, batches: int) -> list[dict]:
    """The rows process `rank` of 2 trains on: the Trainer's DataLoader, prepared as accelerate prepares it when
    batches are not dispatched from process 0."""
    loader = DataLoader(stream, batch_size=4, collate_fn=list)
    loader = prepare_data_loader(
        loader, num_processes=2, process_index=rank, put_on_device=False, dispatch_batches=False
    )
    iterator = iter(loader)
    return [row for _ in range(batches) for row in next(iterator)]


def test_two_processes_read_disjoint_shards(tmp_path):
    folder = write_parquet_shards(tmp_path / "shards", shards=3)
    data = load_streaming_data(streaming_args(dataset_name=str(folder), max_eval_samples=4), seed=3)
    seen = [{pair_key(row) for row in _rank_rows(data.train, rank, batches=10)} for rank in range(2)]
    assert seen[0] and seen[1]
    assert not seen[0] & seen[1]


def test_two_processes_split_a_single_shard_by_examples(tmp_path):
    """One file and two processes: both read the same shuffled stream and take alternate batches of it."""
    folder = write_parquet_shards(tmp_path / "shards", shards=1)
    data = load_streaming_data(streaming_args(dataset_name=str(folder), max_eval_samples=4), seed=3)
    stream = [pair_key(row) for row in data.train.take(32)]
    ranks = [[pair_key(row) for row in _rank_rows(data.train, rank, batches=4)] for rank in range(2)]
    for step in range(4):
        assert ranks[0][4 * step : 4 * step + 4] == stream[8 * step : 8 * step + 4]
        assert ranks[1][4 * step : 4 * step + 4] == stream[8 * step + 4 : 8 * step + 8]


def test_a_copy_of_a_held_out_picture_under_another_name_is_not_trained_on(tmp_path, monkeypatch):
    """The stream's held-out rows are recognised by their pictures, as a loaded set's are: a training row naming a
    copy of a held-out image under another file name (or another caption of it) is left out of training too."""
    monkeypatch.chdir(tmp_path)
    write_shapes_csv(tmp_path, repeats=1, name="pairs.csv")  # 24 shapes, one file each
    rows = list(csv.DictReader(open("pairs.csv")))
    Path("copies").mkdir()
    with open("stream.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "caption", "shape"])
        writer.writeheader()
        writer.writerows(rows)
        for number, row in enumerate(rows):  # every picture again, under another name, with another caption
            copy = Path("copies") / f"copy-{number}.png"
            shutil.copyfile(row["image"], copy)
            writer.writerow({**row, "image": str(copy), "caption": f"the same picture: {row['caption']}"})
    data = load_streaming_data(streaming_args(train_file="stream.csv", max_eval_samples=6), seed=0)
    held_out = {hashlib.sha256(Path(row["image"]).read_bytes()).hexdigest() for row in data.validation}
    assert len(held_out) == 6
    trained = {hashlib.sha256(Path(row["image"]).read_bytes()).hexdigest(): row for row in data.train.take(300)}
    # Independently, by the files' bytes: none of the 6 held-out pictures is trained on, the other 18 are.
    assert not held_out & set(trained)
    assert len(trained) == 18
