"""Exact mid-epoch resume of streamed data: a streamed run killed with SIGKILL after a checkpoint and resumed with
`resume_from_checkpoint=true` trains on exactly the samples, in exactly the order, that an uninterrupted run trains on
after that step: from the stream position saved in the checkpoint, and (slower) by replaying the stream when a
checkpoint has none."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SLOWED_CLI
from test_faults import checkpoint_problems_or_missing
from test_webdataset import write_tar_shards

import clip_trainer.trainer
from clip_trainer import run
from clip_trainer.collator import ImageTextCollator
from clip_trainer.stream import STREAM_STATE_NAME
from clip_trainer.trainer import CLIPContrastiveTrainer

REPO = Path(__file__).resolve().parent.parent


class KeyedCollator(ImageTextCollator):
    """The run's collator, plus each row's WebDataset sample key (read back by `RecordingTrainer`)."""

    def __call__(self, rows):
        batch = super().__call__(rows)
        batch["sample_keys"] = [row["__key__"] for row in rows]
        return batch


class RecordingTrainer(CLIPContrastiveTrainer):
    """Records, for every optimizer step, the sample keys of the batches it trains on (`steps`, a class attribute
    reset by the test)."""

    steps: dict[int, list[str]] = {}

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, items = super().get_batch_samples(epoch_iterator, num_batches, device)
        step = self.state.global_step + 1
        for batch in batches:
            RecordingTrainer.steps.setdefault(step, []).extend(batch.pop("sample_keys"))
        return batches, items


def _keys(batch: list[dict]) -> list[str]:
    return [row["__key__"] for row in batch]


@pytest.mark.parametrize("stop_after", [3, 7])
def test_a_stream_state_taken_mid_block_continues_the_same_order(tmp_path, stop_after):
    """The data pipeline alone, as the Trainer's DataLoader runs it (torchdata's StatefulDataLoader, 2 workers):
    the state after `stop_after` batches, loaded into a new loader over a newly loaded stream, gives the batches an
    uninterrupted loader gives after them, across the end of a block and of a pass."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    from clip_trainer.arguments import DataArguments
    from clip_trainer.data import load_image_text_data

    write_tar_shards(tmp_path / "shards", shards=4, per_shard=5)

    def loader() -> StatefulDataLoader:
        data_args = DataArguments(train_file=str(tmp_path / "shards" / "*.tar"), streaming=True, shuffle_buffer_size=4)
        stream = load_image_text_data(data_args, seed=5, evaluate=False).train
        return StatefulDataLoader(stream, batch_size=3, num_workers=2, collate_fn=_keys)

    uninterrupted = iter(loader())
    reference = [next(uninterrupted) for _ in range(16)]
    first = loader()
    iterator = iter(first)
    head = [next(iterator) for _ in range(stop_after)]
    state = first.state_dict()
    del iterator, first
    second = loader()
    second.load_state_dict(state)
    iterator = iter(second)
    assert head + [next(iterator) for _ in range(16 - stop_after)] == reference
    # Replaying from the start instead (no state) would give the first batches again.
    assert reference[stop_after] != reference[0]


def test_a_saved_position_is_read_back_only_for_the_same_layout(tmp_path):
    from types import SimpleNamespace

    from clip_trainer.stream import StreamPositionCallback

    args = SimpleNamespace(
        output_dir=str(tmp_path), process_index=0, world_size=1, dataloader_num_workers=2,
        per_device_train_batch_size=4, gradient_accumulation_steps=1, seed=1,
    )  # fmt: skip
    callback = StreamPositionCallback()
    saved = {"_snapshot": {"worker": [1, 2]}, "_num_yielded": 3}
    callback.on_save(
        args, SimpleNamespace(global_step=4), None, train_dataloader=SimpleNamespace(state_dict=lambda: saved)
    )
    checkpoint = str(tmp_path / "checkpoint-4")
    assert callback.read(checkpoint, args) == saved
    assert callback.read(checkpoint, SimpleNamespace(**{**vars(args), "dataloader_num_workers": 1})) is None
    assert callback.read(checkpoint, SimpleNamespace(**{**vars(args), "process_index": 1})) is None  # not its file


@pytest.mark.parametrize(
    "change",
    ["deleted shard", "added shard", "replaced shard", "shuffle_buffer_size", "max_eval_samples", "max_train_samples"],
)
def test_a_position_saved_over_other_data_is_not_loaded(tmp_path, caplog, change):
    """The position is saved with the stream's shards, block size and cut (the head held out for validation,
    `max_train_samples`); a resume over other shards (one deleted, as in the 30 repeated samples of a user's run),
    another `shuffle_buffer_size` or another cut replays the stream and says why."""
    from types import SimpleNamespace

    from clip_trainer.arguments import DataArguments
    from clip_trainer.data import load_image_text_data
    from clip_trainer.stream import StreamPositionCallback, source_of

    shards = tmp_path / "shards"
    write_tar_shards(shards, shards=4, per_shard=5)

    def callback(buffer: int = 4, held_out: int = 3, max_train_samples: int | None = None) -> StreamPositionCallback:
        data_args = DataArguments(train_file=str(shards / "*.tar"), streaming=True, shuffle_buffer_size=buffer,
                                  max_eval_samples=held_out, max_train_samples=max_train_samples)  # fmt: skip
        return StreamPositionCallback(source_of(load_image_text_data(data_args, seed=5, evaluate=True).train))

    args = SimpleNamespace(
        output_dir=str(tmp_path), process_index=0, world_size=1, dataloader_num_workers=2,
        per_device_train_batch_size=4, gradient_accumulation_steps=1, seed=5,
    )  # fmt: skip
    saved = {"_snapshot": {"worker": [1, 2]}, "_num_yielded": 3}
    loader = SimpleNamespace(state_dict=lambda: saved)
    callback().on_save(args, SimpleNamespace(global_step=4), None, train_dataloader=loader)
    checkpoint = str(tmp_path / "checkpoint-4")
    assert callback().read(checkpoint, args) == saved  # the same data: the position applies

    buffer, expected = (
        4,
        {
            "deleted shard": "1 shard(s) gone (first: 00003.tar)",
            "added shard": "1 shard(s) new (first: 00004.tar)",
            "replaced shard": "1 shard(s) of another size (first: 00002.tar)",
            "shuffle_buffer_size": "`shuffle_buffer_size` was 4 and is 8",
            "max_eval_samples": "the pairs held out of the stream's head (`max_eval_samples`) was 3 and is 5",
            "max_train_samples": "`max_train_samples` was None and is 12",
        }[change],
    )
    changed = {"max_eval_samples": {"held_out": 5}, "max_train_samples": {"max_train_samples": 12}}.get(change, {})
    if change == "deleted shard":
        (shards / "00003.tar").unlink()
    elif change == "added shard":
        write_tar_shards(tmp_path / "more", shards=5, per_shard=5)
        (tmp_path / "more" / "00004.tar").rename(shards / "00004.tar")
    elif change == "replaced shard":
        write_tar_shards(tmp_path / "other", shards=3, per_shard=7)
        (tmp_path / "other" / "00002.tar").replace(shards / "00002.tar")
    elif change == "shuffle_buffer_size":
        buffer = 8
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    assert callback(buffer, **changed).read(checkpoint, args) is None
    [message] = [
        r.getMessage() for r in caplog.records if "saved while streaming other training data" in r.getMessage()
    ]
    assert expected in message and "replayed from the start" in message


def _recorded_run(monkeypatch, argv: list[str]) -> dict[int, list[str]]:
    monkeypatch.setattr(clip_trainer.trainer, "ImageTextCollator", KeyedCollator)  # the trainer builds it
    monkeypatch.setattr(run, "CLIPContrastiveTrainer", RecordingTrainer)
    RecordingTrainer.steps = {}
    run.main(argv)
    return dict(RecordingTrainer.steps)


def _stream_args(base_args: list[str], shards: Path, output_dir: Path) -> list[str]:
    argv = list(base_args)
    argv[argv.index("--train_file") + 1] = str(shards / "{00000..00003}.tar")
    argv[argv.index("--output_dir") + 1] = str(output_dir)
    argv[argv.index("--dataloader_num_workers") + 1] = "2"
    return [
        *argv,
        "--streaming", "true", "--max_steps", "8", "--save_strategy", "steps", "--save_steps", "4",
        "--save_total_limit", "5", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
        # Blocks of 10 rows in passes of 10 per worker (4 shards of 5, 2 per worker): the steps after the checkpoint
        # cross into the second pass and a new block, both mid-batch.
        "--shuffle_buffer_size", "10", "--validation_split_percentage", "0",
    ]  # fmt: skip


def _killed_after_checkpoint_4(argv: list[str], output_dir: Path) -> None:
    """Runs `argv` in its own process (steps after the 4th slowed down, numbers unchanged) and SIGKILLs it once
    checkpoint-4 and its stream position are on disk."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        [sys.executable, "-c", SLOWED_CLI, *argv], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    checkpoint = output_dir / "checkpoint-4"
    try:
        deadline = time.monotonic() + 240
        while process.poll() is None and (
            checkpoint_problems_or_missing(checkpoint) or not (checkpoint / STREAM_STATE_NAME.format(rank=0)).exists()
        ):
            assert time.monotonic() < deadline, "checkpoint-4 never appeared"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        _, err = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{err.decode()[-3000:]}"
    assert not (output_dir / "checkpoint-8").exists()


@pytest.mark.slow
def test_a_killed_streamed_run_resumes_at_the_sample_where_its_checkpoint_was_taken(
    base_args, tmp_path, monkeypatch, caplog
):
    shards = tmp_path / "shards"
    write_tar_shards(shards, shards=4, per_shard=5)
    reference = _recorded_run(monkeypatch, _stream_args(base_args, shards, tmp_path / "reference"))
    assert sorted(reference) == list(range(1, 9)) and all(len(keys) == 8 for keys in reference.values())

    crashed = tmp_path / "crashed"
    _killed_after_checkpoint_4(_stream_args(base_args, shards, crashed), crashed)
    replayed = tmp_path / "replayed"
    shutil.copytree(crashed, replayed)
    (replayed / "checkpoint-4" / STREAM_STATE_NAME.format(rank=0)).unlink()  # as a checkpoint from before this

    caplog.set_level(logging.INFO, logger="clip_trainer")
    resumed = _recorded_run(
        monkeypatch, [*_stream_args(base_args, shards, crashed), "--resume_from_checkpoint", "true"]
    )
    assert any(r.getMessage().startswith("Resuming the training stream at the position saved") for r in caplog.records)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert {step: reference[step] for step in resumed} == resumed  # the same samples in the same order

    caplog.clear()
    again = _recorded_run(
        monkeypatch, [*_stream_args(base_args, shards, replayed), "--resume_from_checkpoint", "true"]
    )
    assert any("has no saved stream position" in r.getMessage() for r in caplog.records)
    assert {step: reference[step] for step in again} == again and sorted(again) == [5, 6, 7, 8]


@pytest.mark.slow
@pytest.mark.parametrize(
    "change", ["dataloader_num_workers", "seed", "shuffle_buffer_size", "train_file", "max_train_samples"]
)
def test_a_position_saved_with_another_layout_is_not_loaded(base_args, tmp_path, monkeypatch, caplog, change):
    shards = tmp_path / "shards"
    write_tar_shards(shards, shards=4, per_shard=5)
    out = tmp_path / "out"
    argv = _stream_args(base_args, shards, out)
    _recorded_run(monkeypatch, [*argv, "--max_steps", "4"])
    assert (out / "checkpoint-4" / STREAM_STATE_NAME.format(rank=0)).is_file()
    changed = list(argv)
    value = {"dataloader_num_workers": "1", "train_file": str(shards / "{00000..00002}.tar")}.get(change, "7")
    if f"--{change}" in changed:
        changed[changed.index(f"--{change}") + 1] = value
    else:  # a cut the first run did not make
        changed += [f"--{change}", "18"]
    if change == "train_file":
        (shards / "00003.tar").unlink()  # a shard deleted between the runs
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    resumed = _recorded_run(monkeypatch, [*changed, "--resume_from_checkpoint", "true"])
    assert sorted(resumed) == [5, 6, 7, 8]
    expected = {
        "shuffle_buffer_size": "saved while streaming other training data: `shuffle_buffer_size` was 10 and is 7",
        "train_file": "saved while streaming other training data: 1 shard(s) gone (first: 00003.tar)",
        "max_train_samples": "saved while streaming other training data: `max_train_samples` was None and is 18",
    }.get(change, "the saved stream position does not apply")
    assert any(expected in r.getMessage() for r in caplog.records)
