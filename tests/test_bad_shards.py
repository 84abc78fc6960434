"""Tar shards that cannot be read, among good ones: a truncated tar, a 0-byte file and an HTML error page saved as
`.tar`. A run (streamed or loaded) leaves out what it cannot read, names each shard and the counts in the log, and
trains on every sample it can read; with `on_bad_rows error` it stops before training with one line naming the bad
shard and the fix."""

from __future__ import annotations

import logging
import re
import tarfile
from pathlib import Path

import pytest
from test_stream_resume import KeyedCollator, RecordingTrainer
from test_webdataset import write_tar_shards

from clip_trainer import run
from clip_trainer.arguments import DataArguments
from clip_trainer.data import load_image_text_data

HTML = b"<!DOCTYPE html>\n<html><head><title>503 Service Unavailable</title></head><body>Try again.</body></html>\n"


def truncate_inside_sample(path: Path, sample: str) -> None:
    """Cuts `path` in the middle of the data of `sample`'s first member (its image), as an interrupted download."""
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith(sample + "."))
    path.write_bytes(path.read_bytes()[: member.offset_data + member.size // 2])


def spoil(folder: Path, kind: str, shard: int) -> str:
    """Turns `folder/<shard>.tar` into a bad shard of `kind`; returns its file name."""
    path = folder / f"{shard:05d}.tar"
    if kind == "truncated":
        truncate_inside_sample(path, f"s{shard}_003")  # samples 0-2 are whole, 3 is cut, 4-5 are gone
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(HTML)
    return path.name


@pytest.fixture
def bad_shards(tmp_path, monkeypatch) -> list[str]:
    """`shards/00000.tar` ... `00005.tar` of 6 samples each, in the working folder: 00001 truncated inside its 4th
    sample, 00002 a 0-byte file, 00003 an HTML page. Returns the keys of the samples that can be read."""
    monkeypatch.chdir(tmp_path)
    keys = write_tar_shards(tmp_path / "shards", shards=6, per_shard=6)
    for kind, shard in (("truncated", 1), ("empty", 2), ("html", 3)):
        spoil(tmp_path / "shards", kind, shard)
    readable = [key for key in keys if key.split("_")[0] in ("s0", "s4", "s5")]
    return readable + ["s1_000", "s1_001", "s1_002"]


def run_args(base_args: list[str], *extra: str) -> list[str]:
    argv = list(base_args)
    argv[argv.index("--train_file") + 1] = "shards/{00000..00005}.tar"  # relative, as typed in the working folder
    argv[argv.index("--output_dir") + 1] = "out"
    return [*argv, "--validation_split_percentage", "0", *extra]


def recorded_run(monkeypatch, argv: list[str]) -> tuple[dict, list[str]]:
    import clip_trainer.trainer

    monkeypatch.setattr(clip_trainer.trainer, "ImageTextCollator", KeyedCollator)  # the trainer builds the collator
    monkeypatch.setattr(run, "CLIPContrastiveTrainer", RecordingTrainer)
    RecordingTrainer.steps = {}
    results = run.main(argv)
    return results, [key for keys in RecordingTrainer.steps.values() for key in keys]


def logged(caplog) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


def check_named(log: str) -> None:
    for name, reason in (
        ("00001.tar", "is truncated"),
        ("00002.tar", "is an empty file (0 bytes)"),
        ("00003.tar", "is not a tar file (it starts like an HTML page"),
    ):
        assert f"shards/{name} {reason}" in log, name
    assert "left out 2 of 6 shard(s) that cannot be read" in log
    assert "read 1 truncated shard(s) up to the cut, leaving out 1 incomplete sample(s)" in log


def test_a_streamed_run_skips_bad_shards_names_them_and_trains_on_every_readable_sample(
    base_args, bad_shards, monkeypatch, caplog
):
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    argv = run_args(
        base_args, "--streaming", "true", "--max_steps", "12", "--per_device_train_batch_size", "4",
        "--shuffle_buffer_size", "8", "--dataloader_num_workers", "2",
    )  # fmt: skip
    results, trained = recorded_run(monkeypatch, argv)
    assert len(trained) == 48
    # The run's summary (train_results.json) counts what was left out: 2 shards whole, 1 read to its cut.
    assert (results["skipped_shards"], results["truncated_shards"], results["skipped_shard_samples"]) == (2, 1, 1)
    # 21 readable samples; 48 draws by 2 workers make at least two passes of each worker's shards.
    assert set(trained) == set(bad_shards)
    check_named(logged(caplog))


def test_a_loaded_run_skips_bad_shards_and_trains_on_every_readable_sample(base_args, bad_shards, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    results, trained = recorded_run(monkeypatch, run_args(base_args, "--num_train_epochs", "1"))
    assert results["train_samples"] == len(bad_shards) == 21
    assert (results["skipped_shards"], results["truncated_shards"]) == (2, 1)
    assert sorted(trained) == sorted(bad_shards)  # one epoch: each readable sample once
    check_named(logged(caplog))


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "loaded"])
def test_the_counts_are_there_for_the_runs_summary(bad_shards, streaming):
    data_args = DataArguments(
        train_file="shards/*.tar", streaming=streaming, shuffle_buffer_size=8, validation_split_percentage=0
    )
    report = load_image_text_data(data_args, seed=0, evaluate=False).shard_report
    assert (report.checked, report.skipped_shards, report.skipped_samples) == (6, 2, 1)
    assert sorted(report.unreadable) == ["shards/00002.tar", "shards/00003.tar"]
    assert list(report.truncated) == ["shards/00001.tar"]


def test_a_shard_cut_between_the_members_of_a_sample_counts_that_sample_as_left_out(
    base_args, tmp_path, monkeypatch, caplog
):
    """A download cut after the image of `s1_003` and before its caption: the tar headers end cleanly there, so only
    the missing end-of-archive blocks and the sample's missing members tell. The run's report counts the sample as
    left out before training, and the run trains on every other sample of the shard."""
    monkeypatch.chdir(tmp_path)
    keys = write_tar_shards(tmp_path / "shards", shards=2, per_shard=6)
    path = tmp_path / "shards" / "00001.tar"
    with tarfile.open(path) as tar:
        caption = next(m for m in tar.getmembers() if m.name == "s1_003.txt")
    path.write_bytes(path.read_bytes()[: caption.offset])  # up to the caption's header: whole members only
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    argv = list(base_args)
    argv[argv.index("--train_file") + 1] = "shards/*.tar"
    argv[argv.index("--output_dir") + 1] = "out"
    results, trained = recorded_run(
        monkeypatch, [*argv, "--validation_split_percentage", "0", "--num_train_epochs", "1"]
    )
    assert "read 1 truncated shard(s) up to the cut, leaving out 1 incomplete sample(s)" in logged(caplog)
    assert (results["truncated_shards"], results["skipped_shard_samples"]) == (1, 1)
    expected = [key for key in keys if key.startswith("s0_") or key in ("s1_000", "s1_001", "s1_002")]
    assert sorted(trained) == sorted(expected)


@pytest.mark.parametrize("streaming", ["true", "false"], ids=["streamed", "loaded"])
def test_an_empty_tar_as_img2dataset_writes_it_is_left_out_without_stopping_the_run(
    base_args, tmp_path, monkeypatch, caplog, streaming
):
    # img2dataset writes a whole tar with no member for a shard whose downloads all failed: nothing to lose, so even
    # `on_bad_rows error` trains on the other shards.
    import tarfile

    monkeypatch.chdir(tmp_path)
    write_tar_shards(tmp_path / "shards", shards=6, per_shard=6)
    tarfile.open(tmp_path / "shards" / "00003.tar", "w").close()
    results = run.main(run_args(base_args, "--on_bad_rows", "error", "--streaming", streaming, "--max_steps", "2"))
    assert results["skipped_shards"] == 1
    assert "00003.tar holds no sample (an empty tar?)" in logged(caplog)


@pytest.mark.parametrize("streaming", ["true", "false"], ids=["streamed", "loaded"])
@pytest.mark.parametrize(
    "kind, reason",
    [
        ("truncated", "is truncated"),
        ("empty", r"is an empty file \(0 bytes\)"),
        ("html", r"is not a tar file \(it starts like an HTML page"),
    ],
)
def test_on_bad_rows_error_stops_with_one_line_naming_the_bad_shard(
    base_args, tmp_path, monkeypatch, capsys, kind, reason, streaming
):
    monkeypatch.chdir(tmp_path)
    write_tar_shards(tmp_path / "shards", shards=6, per_shard=6)
    name = spoil(tmp_path / "shards", kind, 2)
    status = run.cli(run_args(base_args, "--on_bad_rows", "error", "--streaming", streaming, "--max_steps", "2"))
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.strip()]
    assert line.startswith(f"run_clip.py: error: `train_file` shard 'shards/{name}' ")
    assert re.search(reason, line)
    assert "Re-download or re-create it" in line and "`on_bad_rows` to `skip`" in line
    assert not (tmp_path / "out" / "trainer_state.json").exists()


def test_a_shard_cut_on_a_header_boundary_is_read_to_the_cut(tmp_path, caplog):
    """A cut the first and last blocks do not show (the tar ends after a whole member, with zero padding beyond it
    from a copy that stopped at a block) is met while reading: the samples before it are read and the shard named."""
    keys = write_tar_shards(tmp_path / "shards", shards=2, per_shard=6)
    path = tmp_path / "shards" / "00001.tar"
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith("s1_004."))
    # Everything up to sample 4's header, then a garbage header, then the end-of-archive blocks.
    path.write_bytes(path.read_bytes()[: member.offset] + b"\x01" * 512 + b"\x00" * 1024)
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    data = load_image_text_data(
        DataArguments(train_file=str(tmp_path / "shards" / "*.tar"), validation_split_percentage=0),
        seed=0,
        evaluate=False,
    )
    assert sorted(data.train["__key__"]) == sorted(keys[:10])  # shard 0, and samples 0-3 of shard 1
    assert f"shard {str(path)!r} of `train_file` cannot be read after 4 sample(s)" in logged(caplog)
    assert "invalid tar header" in logged(caplog)


def test_optional_members_do_not_make_a_whole_last_sample_count_as_cut(tmp_path):
    """A shard without its end-of-archive blocks whose first sample has an extra `.json`: a last sample with the
    members every earlier sample has is whole; one without its caption is cut."""
    import io

    from clip_trainer.sources import count_shard_samples

    def shard(samples: list[tuple[str, ...]]) -> Path:
        path = tmp_path / "cut.tar"
        with tarfile.open(path, "w") as tar:
            for index, members in enumerate(samples):
                for extension in members:
                    info = tarfile.TarInfo(f"{index:03d}.{extension}")
                    info.size = 3
                    tar.addfile(info, io.BytesIO(b"abc"))
        data = path.read_bytes()
        last_block_end = -(-len(data.rstrip(b"\0")) // 512) * 512  # the end of the last member's data
        path.write_bytes(data[:last_block_end])  # without the end-of-archive blocks
        return path

    whole = shard([("jpg", "txt", "json"), ("jpg", "txt"), ("jpg", "txt")])
    assert count_shard_samples(str(whole), truncated=True) == (3, False)
    cut = shard([("jpg", "txt", "json"), ("jpg", "txt"), ("jpg",)])
    assert count_shard_samples(str(cut), truncated=True) == (2, True)
