"""WebDataset tar shards: globs and brace ranges, the image and caption rules, one-line errors for bad shards, training
from shards with DataLoader workers (and with two processes, slow), and every sample read once per pass across
processes and workers, with even and uneven shard counts."""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from conftest import draw_shape, shape_rows
from torch.utils.data import DataLoader

import clip_trainer.trainer
from clip_trainer.arguments import ConfigError, DataArguments
from clip_trainer.data import load_image_text_data
from clip_trainer.run import cli, main
from clip_trainer.sources import expand_braces


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar_shards(
    folder: Path,
    shards: int,
    per_shard: int,
    image: str | list[str] = "jpg",
    members: tuple[str, ...] = ("txt", "json"),
    sizes: list[int] | None = None,
) -> list[str]:
    """`shards` tar files `folder/00000.tar`, ... in WebDataset format: each sample `s<shard>_<i>` has an image
    member (`image`; none if empty; a list gives each shard its own; `"jpg/png"` alternates them sample by sample),
    a `txt` caption and a `json` member `{"caption", "shape"}`; every image is distinct (drawn at the shard's own
    size). `sizes` gives each shard's sample count. Returns every sample key."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = shape_rows()
    keys = []
    for shard in range(shards):
        extensions = (image[shard] if isinstance(image, list) else image).split("/")
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for index in range(sizes[shard] if sizes else per_shard):
                color, shape, background, caption = rows[index % len(rows)]
                key = f"s{shard}_{index:03d}"
                keys.append(key)
                extension = extensions[index % len(extensions)]
                if extension:
                    buffer = io.BytesIO()
                    picture = draw_shape(color, shape, background, size=36 + 2 * shard + index // len(rows))
                    picture.save(buffer, format={"jpg": "JPEG", "jpeg": "JPEG"}.get(extension, extension.upper()))
                    _add_member(tar, f"{key}.{extension}", buffer.getvalue())
                if "txt" in members:
                    _add_member(tar, f"{key}.txt", f"{caption} (txt)".encode())
                if "json" in members:
                    _add_member(tar, f"{key}.json", json.dumps({"caption": caption, "shape": shape}).encode())
    return keys


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wds")
    write_tar_shards(folder, shards=4, per_shard=12)
    return folder


# --------------------------------------------------------------------------------------------------------------
# Patterns and columns
# --------------------------------------------------------------------------------------------------------------


def test_brace_ranges_expand_like_bash():
    assert expand_braces("s/{00008..00011}.tar") == ["s/00008.tar", "s/00009.tar", "s/00010.tar", "s/00011.tar"]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert expand_braces("{9..11}") == ["9", "10", "11"]  # no padding without a leading zero
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_globs_and_brace_ranges_name_the_shards(shards):
    by_glob = load_image_text_data(DataArguments(train_file=str(shards / "*.tar")), seed=0, evaluate=False)
    by_range = load_image_text_data(
        DataArguments(train_file=str(shards / "{00000..00003}.tar")), seed=0, evaluate=False
    )
    one = load_image_text_data(DataArguments(train_file=str(shards / "00002.tar")), seed=0, evaluate=False)
    assert len(by_glob.train) == len(by_range.train) == 48 and len(one.train) == 12
    assert sorted(by_glob.train["__key__"]) == sorted(by_range.train["__key__"])
    assert {Path(url).name for url in one.train["__url__"]} == {"00002.tar"}


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("{00000..00005}.tar", r"2 of the files it names do not exist \(first: .*00004.tar\)"),
        ("nothing-*.tar", "a pattern that matches no file"),
        ("00009.tar", "which does not exist"),
        ("*.zip", "must be a .csv, .json, .jsonl or .parquet file, or .tar WebDataset shards"),
    ],
)
def test_a_pattern_that_names_missing_shards_is_a_one_line_error(shards, pattern, message):
    with pytest.raises(ConfigError, match=message) as error:
        DataArguments(train_file=str(shards / pattern))
    assert "`train_file`" in str(error.value) and "\n" not in str(error.value)


def _first_row(folder: Path, **data_args) -> dict:
    data = load_image_text_data(DataArguments(train_file=str(folder / "*.tar"), **data_args), seed=0, evaluate=False)
    return data.train[0]


def test_the_caption_rule_json_key_then_txt(tmp_path, shards):
    row = _first_row(shards)  # default `caption`: the json member's key
    assert row["caption"] == "a red circle on white" and row["image"]["bytes"][:2] == b"\xff\xd8"
    assert row["__key__"] == "s0_000"
    assert _first_row(shards, caption_column="txt")["txt"] == "a red circle on white (txt)"
    assert _first_row(shards, caption_column="json.shape")["json.shape"] == "circle"
    write_tar_shards(tmp_path / "txt-only", shards=1, per_shard=3, image="png", members=("txt",))
    assert _first_row(tmp_path / "txt-only")["caption"] == "a red circle on white (txt)"  # no json: the txt
    assert _first_row(tmp_path / "txt-only")["image"]["bytes"][1:4] == b"PNG"


def test_a_txt_member_with_a_byte_order_mark_is_read_without_it(tmp_path):
    (tmp_path / "bom").mkdir()
    with tarfile.open(tmp_path / "bom" / "00000.tar", "w") as tar:  # captions as Windows Notepad saves them
        for index, (color, shape, background, caption) in enumerate(shape_rows()[:3]):
            buffer = io.BytesIO()
            draw_shape(color, shape, background).save(buffer, format="PNG")
            _add_member(tar, f"s0_{index:03d}.png", buffer.getvalue())
            _add_member(tar, f"s0_{index:03d}.txt", b"\xef\xbb\xbf" + caption.encode())
    data = load_image_text_data(DataArguments(train_file=str(tmp_path / "bom" / "*.tar")), seed=0, evaluate=False)
    assert sorted(data.train["caption"]) == sorted(caption for *_, caption in shape_rows()[:3])


def test_bad_shards_are_one_line_errors_naming_the_file_and_the_fix(tmp_path, shards):
    write_tar_shards(tmp_path / "no-image", shards=1, per_shard=3, image="")
    with pytest.raises(ConfigError, match=r"no image member \(jpg, jpeg, png or webp\); their members are: txt, json"):
        _first_row(tmp_path / "no-image")
    with pytest.raises(
        ConfigError, match="`caption_column` is 'json.title', but .* no such json key .*caption, shape"
    ):
        _first_row(shards, caption_column="json.title")
    write_tar_shards(tmp_path / "no-caption", shards=1, per_shard=3, members=())
    with pytest.raises(ConfigError, match="neither a json member with a 'caption' key nor a txt member"):
        _first_row(tmp_path / "no-caption")
    (tmp_path / "empty").mkdir()
    tarfile.open(tmp_path / "empty" / "00000.tar", "w").close()
    with pytest.raises(ConfigError, match=r"holds no sample \(an empty tar\?\)"):
        _first_row(tmp_path / "empty")


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


def _train_args(base_args: list[str], train_file: str) -> list[str]:
    args = list(base_args)
    args[args.index("--train_file") + 1] = train_file
    args[args.index("--dataloader_num_workers") + 1] = "2"
    return args


@pytest.mark.parametrize("streaming", ["true", "false"], ids=["streamed", "loaded"])
def test_shards_train_with_two_dataloader_workers(base_args, shards, tmp_path, streaming):
    results = main(
        [
            *_train_args(base_args, str(shards / "{00000..00003}.tar")),
            "--streaming", streaming, "--max_steps", "6", "--shuffle_buffer_size", "16",
            "--eval_strategy", "steps", "--eval_steps", "6", "--max_eval_samples", "12",
        ]
    )  # fmt: skip
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 3 and all(loss == loss for loss in losses)
    assert any(key.startswith("eval_t2i_recall") for entry in state["log_history"] for key in entry)
    # Loaded: 48 pairs less the 15% (8) held out; a stream counts the samples it drew: 6 steps of 8.
    assert results["train_samples"] == (48 - 8 if streaming == "false" else 6 * 8)
    # The card names the shards by their pattern and its folder (the pattern alone does not say which shards).
    assert f"local data `{shards.name}/{{00000..00003}}.tar`" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("streaming", ["true", "false"], ids=["streamed", "loaded"])
def test_each_sample_keeps_whichever_image_it_has_across_and_inside_shards(
    base_args, tmp_path, monkeypatch, streaming
):
    """jpg, png and webp shards, and a shard that alternates png and jpeg: not one image is lost, trained or
    evaluated, whatever the first shard's image extension."""
    from test_stream_resume import KeyedCollator, RecordingTrainer

    from clip_trainer import run

    monkeypatch.chdir(tmp_path)
    keys = write_tar_shards(tmp_path / "shards", shards=4, per_shard=6, image=["jpg", "png", "webp", "png/jpeg"])
    monkeypatch.setattr(clip_trainer.trainer, "ImageTextCollator", KeyedCollator)  # the trainer builds it
    monkeypatch.setattr(run, "CLIPContrastiveTrainer", RecordingTrainer)
    RecordingTrainer.steps = {}
    argv = _train_args(base_args, "shards/*.tar")
    argv[argv.index("--output_dir") + 1] = "out"
    if streaming == "true":  # 8 held out, 16 trained on in passes of 8 per worker: 5 steps of 8 read each twice
        argv += ["--streaming", "true", "--max_steps", "5", "--max_eval_samples", "8", "--shuffle_buffer_size", "8"]
    else:  # 24 pairs: 4 held out (15%), 20 trained on once
        argv += ["--num_train_epochs", "1"]
    results = run.main([*argv, "--do_train", "true", "--do_eval", "true", "--logging_steps", "1"])
    trained = [key for batch in RecordingTrainer.steps.values() for key in batch]
    held_out = 8 if streaming == "true" else 4
    assert results["eval_samples"] == held_out  # every held-out sample has its image
    assert len(set(trained)) == 24 - held_out and set(trained) <= set(keys)
    if streaming == "false":
        assert results["train_samples"] == len(trained) == 20
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert all("skipped_samples" not in entry for entry in history)  # no sample trained without its image


# --------------------------------------------------------------------------------------------------------------
# One pass: every sample once, across processes and workers
# --------------------------------------------------------------------------------------------------------------


def worker_batch(rows: list[dict]) -> tuple[int, list[str]]:
    """A collate_fn that tells which DataLoader worker made the batch, and its sample keys."""
    info = torch.utils.data.get_worker_info()
    return (info.id if info is not None else 0), [row["__key__"] for row in rows]


def reader_streams(stream, processes: int, workers: int, batches: int) -> dict[tuple[int, int], list[str]]:
    """The keys each (process, worker) reads, in order: the Trainer's DataLoader prepared as `accelerate` prepares
    it for process `rank` of `processes` when batches are not dispatched from process 0."""
    streams: dict[tuple[int, int], list[str]] = defaultdict(list)
    for rank in range(processes):
        loader = DataLoader(stream, batch_size=4, num_workers=workers, collate_fn=worker_batch)
        loader = prepare_data_loader(
            loader, num_processes=processes, process_index=rank, put_on_device=False, dispatch_batches=False
        )
        iterator = iter(loader)
        for _ in range(batches):
            worker, keys = next(iterator)
            streams[rank, worker].extend(keys)
        del iterator
    return streams


def check_passes(streams: dict[tuple[int, int], list[str]], all_keys: list[str]) -> dict[tuple[int, int], int]:
    """Asserts that each reader's stream is whole passes over its own shards, each pass every one of their samples
    once, and that the readers' shards are disjoint and cover every sample. Returns each reader's pass length."""
    owned: dict[tuple[int, int], set[str]] = {}
    for reader, keys in streams.items():
        shards = {key.split("_")[0] for key in keys}
        owned[reader] = {key for key in all_keys if key.split("_")[0] in shards}
        size = len(owned[reader])
        assert len(keys) >= 2 * size, f"{reader} read less than two passes"
        for start in range(0, len(keys) - size + 1, size):
            one_pass = keys[start : start + size]
            assert sorted(one_pass) == sorted(owned[reader]), f"{reader}: pass at {start} is not its shards once"
        assert keys[:size] != keys[size : 2 * size], f"{reader}: the second pass repeats the first one's order"
    readers = list(owned)
    for i, a in enumerate(readers):
        for b in readers[i + 1 :]:
            assert not owned[a] & owned[b], f"{a} and {b} share samples"
    assert set().union(*owned.values()) == set(all_keys)
    return {reader: len(keys) for reader, keys in owned.items()}


@pytest.mark.parametrize("sizes", [[6, 6, 6, 6], [6, 6, 6, 6, 6]], ids=["4-shards", "5-shards-uneven"])
def test_every_sample_once_per_pass_across_two_processes_and_two_workers(tmp_path, sizes):
    keys = write_tar_shards(tmp_path / "shards", shards=len(sizes), per_shard=0, sizes=sizes)
    data_args = DataArguments(train_file=str(tmp_path / "shards" / "*.tar"), streaming=True, shuffle_buffer_size=5)
    data = load_image_text_data(data_args, seed=3, evaluate=False)
    pass_sizes = check_passes(reader_streams(data.train, processes=2, workers=2, batches=14), keys)
    assert len(pass_sizes) == 4  # every reader got shards
    if len(sizes) == 4:
        assert set(pass_sizes.values()) == {6}
    else:
        # 5 shards: process 0 gets 3 (2 + 1 for its workers), process 1 gets 2: one reader's pass is twice as long,
        # so in the same steps the others' samples come round twice as often (as documented in stream.py).
        assert sorted(pass_sizes.values()) == [6, 6, 6, 12]


@pytest.mark.parametrize("sizes", [[200, 2, 3, 1], [5, 5, 5, 5]], ids=["uneven", "even"])
def test_uneven_shards_are_reported_with_how_uneven_and_how_to_lay_them_out(
    base_args, tmp_path, monkeypatch, caplog, sizes
):
    monkeypatch.chdir(tmp_path)
    write_tar_shards(tmp_path / "shards", shards=4, per_shard=0, sizes=sizes)
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    argv = _train_args(base_args, "shards/*.tar")
    argv[argv.index("--output_dir") + 1] = "out"
    main([*argv, "--streaming", "true", "--max_steps", "1", "--validation_split_percentage", "0",
          "--shuffle_buffer_size", "8"])  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if "shards are uneven" in r.getMessage()]
    if sizes[0] == 5:
        assert warnings == []  # 2 workers with 2 shards of 5 each: uniform
        return
    [message] = warnings
    assert "(1 to 200 samples, 206 in all) for 2 readers (1 process(es) x 2 DataLoader worker(s))" in message
    # The fewest samples a worker can be dealt: its 2 shards the smallest, 1 + 2; they make half of the draws.
    assert (
        "up to 34.33x as often as with an even split, 67.67x as often" in message
        and "at worst 3 samples make 50% of the draws instead of 1.5%" in message
    )
    assert 'a multiple of 2 of them (see "Laying out shards" in docs/data.md)' in message
    docs = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    assert "## Laying out shards" in docs

    # Counted from what two DataLoader workers draw (the run's seed deals the worst case: the shards of 2 and 1
    # samples to one worker): each worker gives half of the batches, so those 3 samples are half of the draws.
    data_args = DataArguments(train_file="shards/*.tar", streaming=True, shuffle_buffer_size=8)
    stream = load_image_text_data(data_args, seed=1, evaluate=False).train
    streams = reader_streams(stream, processes=1, workers=2, batches=60)
    small = min(streams.values(), key=lambda keys: len(set(keys)))
    share = len(small) / sum(len(keys) for keys in streams.values())
    assert (len(set(small)), share) == (3, 0.5)
    assert f"up to {share / (len(set(small)) / 206):.2f}x as often as with an even split" in message
    # The other worker holds the other 203 samples: each of the 3 comes round 203 / 3 times as often as one of them.
    assert f"{(206 - len(set(small))) / len(set(small)):.2f}x as often as those of the reader with the most" in message


def test_equal_shards_that_do_not_divide_among_the_readers_are_not_called_uneven(
    base_args, tmp_path, monkeypatch, caplog
):
    """3 shards of 5 samples for 2 DataLoader workers: the sizes are equal, the count is what is uneven."""
    monkeypatch.chdir(tmp_path)
    write_tar_shards(tmp_path / "shards", shards=3, per_shard=0, sizes=[5, 5, 5])
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    argv = _train_args(base_args, "shards/*.tar")
    argv[argv.index("--output_dir") + 1] = "out"
    main([*argv, "--streaming", "true", "--max_steps", "1", "--validation_split_percentage", "0",
          "--shuffle_buffer_size", "8"])  # fmt: skip
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "shards are uneven" in m]
    [message] = [m for m in messages if "do not divide evenly" in m]
    # One worker reads 2 shards, the other 1 (10 and 5 samples, each giving half of the batches): the single
    # shard's samples come round (15 / 2) / 5 = 1.5 times as often as with an even split, and 10 / 5 = 2 times as
    # often as the other worker's.
    assert "3 shards do not divide evenly among 2 readers (1 process(es) x 2 DataLoader worker(s))" in message
    assert (
        "(up to 1.50x as often as with an even split, 2.00x as often as those of the reader with the most)" in message
    )
    assert "A multiple of 2 equal-sized shards" in message


RECORDING_CLI = """
import os, sys
import torch
from clip_trainer import run
from clip_trainer.collator import ImageTextCollator


class KeyLoggingCollator(ImageTextCollator):
    # Appends the keys of every batch to keys-<rank>-<worker>.txt, in the order the worker reads them.
    def __call__(self, rows):
        worker = torch.utils.data.get_worker_info().id
        path = os.path.join(os.environ["KEYS_DIR"], f"keys-{os.environ['RANK']}-{worker}.txt")
        with open(path, "a") as handle:
            handle.write("".join(row["__key__"] + "\\n" for row in rows))
        return super().__call__(rows)


import clip_trainer.trainer
clip_trainer.trainer.ImageTextCollator = KeyLoggingCollator  # the trainer builds the collator
sys.exit(run.cli(sys.argv[1:]))
"""


@pytest.mark.slow
def test_torchrun_two_processes_two_workers_read_every_sample_once_per_pass(base_args, tmp_path):
    import os
    import subprocess
    import sys

    from test_distributed_run import _free_port, check_run

    keys = write_tar_shards(tmp_path / "shards", shards=4, per_shard=6)
    script = tmp_path / "record_keys.py"
    script.write_text(RECORDING_CLI)
    (tmp_path / "keys").mkdir()
    args = list(base_args)
    args[args.index("--train_file") + 1] = str(tmp_path / "shards" / "{00000..00003}.tar")
    args[args.index("--dataloader_num_workers") + 1] = "2"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), *args,
        "--streaming", "true", "--max_steps", "6", "--per_device_train_batch_size", "4", "--ddp_backend", "gloo",
        "--shuffle_buffer_size", "4", "--logging_steps", "2",
    ]  # fmt: skip
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "KEYS_DIR": str(tmp_path / "keys"),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    check_run(result, tmp_path / "out", steps=6)
    streams = {}
    for path in (tmp_path / "keys").glob("keys-*-*.txt"):
        _, rank, worker = path.stem.split("-")
        streams[int(rank), int(worker)] = path.read_text().split()
    # 6 steps of 4 pairs per process, dealt to 2 workers: 12 per worker, two passes of its one 6-sample shard (the
    # workers may have read ahead of the last step).
    assert check_passes(streams, keys) == {reader: 6 for reader in streams} and len(streams) == 4


def test_a_bad_sample_is_named_by_its_key_and_shard(tmp_path, caplog):
    """Row numbers alone do not find a sample among many shards: the up-front report names its key and its tar."""
    import logging

    folder = tmp_path / "wds"
    write_tar_shards(folder, shards=2, per_shard=12, members=("txt",))
    with tarfile.open(folder / "00002.tar", "w") as tar:  # a third shard whose second sample has an empty caption
        for index, caption in enumerate(["a red circle on white", "   ", "a blue square on black"]):
            buffer = io.BytesIO()
            draw_shape("red", "circle", "white", size=40 + index).save(buffer, format="PNG")
            _add_member(tar, f"bad_{index}.png", buffer.getvalue())
            _add_member(tar, f"bad_{index}.txt", caption.encode())
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    load_image_text_data(DataArguments(train_file=str(folder / "{00000..00002}.tar"), caption_column="txt"), seed=0,
                         evaluate=False)  # fmt: skip
    report = next(r.getMessage() for r in caplog.records if "skipped 1 of 27 rows" in r.getMessage())
    assert "empty caption" in report and "(sample bad_1 of " in report and "00002.tar)" in report


def _write_dotted_shard(path: Path, good: int, dotted: list[str]) -> None:
    """A shard of `good` samples `k0000`, ... and then one sample per name of `dotted` (`IMG_2021.05.01`), each a
    `.jpg` and a `.txt`: file names with dots before the extension, as cameras and exports write them."""
    rows = shape_rows()
    with tarfile.open(path, "w") as tar:
        for index, name in enumerate([f"k{index:04d}" for index in range(good)] + dotted):
            color, shape, background, caption = rows[index % len(rows)]
            buffer = io.BytesIO()
            draw_shape(color, shape, background, size=36 + index // len(rows)).save(buffer, format="JPEG")
            _add_member(tar, f"{name}.jpg", buffer.getvalue())
            _add_member(tar, f"{name}.txt", caption.encode())


def _shard_args(base_args: list[str]) -> list[str]:
    args = list(base_args)
    args[args.index("--train_file") + 1] = "photos.tar"
    return args


def test_member_names_with_dots_are_named_as_the_cause(base_args, tmp_path, monkeypatch, capsys):
    """WebDataset's key is the name up to the first dot: `IMG_2021.05.00.txt` is sample `IMG_2021`'s member
    `05.00.txt`, and no sample has a `txt` member, although `caption_column` names it."""
    monkeypatch.chdir(tmp_path)
    _write_dotted_shard(tmp_path / "photos.tar", 0, [f"IMG_2021.05.{day:02d}" for day in range(8)])
    status = cli([*_shard_args(base_args), "--caption_column", "txt"])
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("run_clip.py: error:")]
    assert status == 2
    assert "`caption_column` is 'txt', but the samples of `train_file` 'photos.tar' have no txt member" in line
    assert "file names with dots before the extension (IMG_2021.05.00.txt)" in line
    assert "WebDataset's sample key is the name up to the first dot (IMG_2021)" in line
    assert "rename the files so that the only dots are before the extension(s), e.g. IMG_2021_05_00.txt" in line
    assert "Set `caption_column`" not in line  # it names the member already


def test_a_later_sample_with_dots_in_its_names_is_a_bad_row_naming_them(base_args, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    _write_dotted_shard(tmp_path / "photos.tar", 16, ["photo.2021.05"])
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    results = main([*_shard_args(base_args), "--caption_column", "txt", "--max_steps", "1"])
    assert results["train_samples"] == 16
    logged = "\n".join(record.getMessage() for record in caplog.records)
    dots = "file names with dots before the extension (photo.2021.05.{}): WebDataset's sample key is the name up to"
    # The shard's warning, which the bad row points to, is there, and both name the cause and the fix.
    assert "`train_file` shard 'photos.tar': sample photo has no txt member: " + dots.format("txt") in logged
    assert "e.g. photo_2021_05.txt" in logged
    assert "skipped 1 of 17 rows (1 no caption): row 16: no caption: " + dots.format("jpg") in logged
    assert "e.g. photo_2021_05.jpg (sample photo of photos.tar)" in logged


def test_img2datasets_output_folder_given_whole_points_to_its_shards(tmp_path, monkeypatch):
    # img2dataset writes 00000.tar with 00000.parquet (urls, status) and 00000_stats.json beside it: `datasets`, given
    # the folder, would read the .parquet metadata as the pairs.
    import pandas as pd

    monkeypatch.chdir(tmp_path)
    write_tar_shards(tmp_path / "shards", shards=2, per_shard=4)
    for shard in ("00000", "00001"):
        pd.DataFrame({"url": ["http://x/1.jpg"], "key": [f"{shard}0000"], "status": ["success"]}).to_parquet(
            tmp_path / "shards" / f"{shard}.parquet"
        )
        (tmp_path / "shards" / f"{shard}_stats.json").write_text("{}")
    with pytest.raises(ConfigError, match=re.escape("img2dataset's output: its .parquet files are the download's "
                                                    "metadata (urls and status), not the pairs")):  # fmt: skip
        load_image_text_data(DataArguments(dataset_name="shards"), 1)
    data = load_image_text_data(DataArguments(train_file="shards/*.tar", validation_split_percentage=25), 1)
    assert len(data.train) + len(data.validation) == 8
