"""The order of a streamed training set, and its position in checkpoints, so that a resumed run sees exactly the
samples, in exactly the order, of a run that was never stopped.

**Order.** Each DataLoader worker of each process reads its own shards (`accelerate` deals the shards out to the
processes, by contiguous blocks, when there are at least as many as processes, else every process reads all and keeps
every n-th batch; `datasets` deals each process's shards out to its workers round-robin). A worker reads its shards
in *passes*: one pass is every sample of its shards exactly once, so one pass of every worker is every sample of the
data exactly once. Within a pass, samples are shuffled in consecutive blocks of `shuffle_buffer_size` rows (each
block permuted with a seed drawn from the run's seed and the block's place in the stream, so each pass has another
order); the shard order is shuffled once with the seed. A block never mixes two passes. When the shards do not
divide evenly among processes x workers, a worker with fewer samples starts its next pass earlier: every pass is
still exact per worker, but samples of the smaller share come round more often in the same number of steps.

Why not `datasets`' `shuffle(buffer_size=...)`: its buffer is not part of `IterableDataset.state_dict()` (resuming
drops the rows it held and refills it, so the order after a resume differs), and over a repeated stream it mixes
consecutive passes. `datasets` has no shuffle whose state is exact and no repeat that reshuffles each repetition;
a batched `map` that permutes its block is exact, because `datasets` records the stream's state at the start of a
map batch and re-reads that batch on resume.

**Position.** `accelerate` loads data with torchdata's `StatefulDataLoader` when asked (every worker reports its
`datasets` state with each batch), but `transformers.Trainer` (5.x) neither asks nor saves the loader's state in its
checkpoints: on resume it replays the stream from the start and throws away the batches already trained on (decoding
every image of them). [`StreamPositionCallback`] saves each process's loader state beside the checkpoint
(`stream_state_<rank>.pt`) and loads it on resume; the replay stays as the fallback for a checkpoint without one.
The position is saved with what it depends on: the layout (processes, workers, batch size, seed) and the data (the
shards, with their sample counts or sizes, and `shuffle_buffer_size`, see [`StreamSource`]); a resume where either
changed replays the stream and says what changed, rather than continuing at a position that now means other samples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging as std_logging
import os
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import datasets
import numpy as np
import torch
from datasets import IterableDataset
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

logger = logging.get_logger(__name__)

PASS_POSITION_COLUMN = "_pass_position"
STREAM_STATE_NAME = "stream_state_{rank}.pt"


class _PassPosition:
    """Batched map with indices: each row's position in its pass (the map restarts at 0 with every repetition)."""

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        return {PASS_POSITION_COLUMN: list(indices)}


class _ShuffleBlock:
    """Batched map with indices: the block's rows permuted, each pass's part of the block on its own, with a seed of
    the run's seed and the stream index where the part starts (so the same block in the next pass gets another
    permutation, and a resumed run the same one)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        positions = batch[PASS_POSITION_COLUMN]
        size = len(positions)
        starts = [0] + [i for i in range(1, size) if positions[i] <= positions[i - 1]] + [size]
        order: list[int] = []
        for start, stop in zip(starts, starts[1:]):
            rng = np.random.default_rng([self.seed, indices[start]])
            order.extend(start + int(i) for i in rng.permutation(stop - start))
        return {
            column: [values[i] for i in order] for column, values in batch.items() if column != PASS_POSITION_COLUMN
        }


def _drop_empty_buffer_warning(record: std_logging.LogRecord) -> bool:
    # `shuffle(buffer_size=1)` holds no row between two yields, so there is nothing to lose; `datasets` warns anyway.
    return "shuffle buffer of a dataset without the buffer content" not in record.getMessage()


def shuffled_passes(stream: IterableDataset, seed: int, block_size: int) -> IterableDataset:
    """`stream` repeated without end, one pass after another, each pass shuffled in blocks of `block_size` rows
    (see the module docstring); exact to resume from `state_dict()`."""
    # The shard order, shuffled once with the seed (the same on every process, before `accelerate` deals shards
    # out). A buffer of one row: `datasets`' buffer is the part whose state is not saved.
    datasets_logger = datasets.utils.logging.get_logger("datasets.iterable_dataset")
    if _drop_empty_buffer_warning not in datasets_logger.filters:
        datasets_logger.addFilter(_drop_empty_buffer_warning)
    stream = stream.shuffle(seed=seed, buffer_size=1, max_buffer_input_shards=1)
    features = stream.features
    tagged = None
    if features is not None:
        tagged = features.copy()
        tagged[PASS_POSITION_COLUMN] = datasets.Value("int64")
    stream = stream.map(_PassPosition(), batched=True, with_indices=True, features=tagged)
    stream = stream.repeat(None)
    return stream.map(
        _ShuffleBlock(seed),
        batched=True,
        batch_size=max(1, block_size),
        with_indices=True,
        remove_columns=[PASS_POSITION_COLUMN],
        features=features,
    )


@dataclasses.dataclass
class StreamSource:
    """What a training stream reads, as far as known: its shard files (in order), each shard's sample count (when it
    was cheap to count), and the shuffle block size. Saved with the stream's position, so that a resume over other
    data does not reuse a position that means other samples."""

    shards: list[str]
    samples: list[int] | None = None
    shuffle_buffer_size: int | None = None
    # Per shard, the rows held out of training for validation (the head of the stream, see `data.py`): they are in
    # `samples` (what the shards hold) but never trained on, so they count against their shards' share.
    held_out: list[int] | None = None
    # How the training rows are cut from the stream: the head held out for validation (`max_eval_samples` pairs, 0
    # with a validation file) and `max_train_samples`. Either changed moves every later row to another position.
    held_out_head: int = 0
    max_train_samples: int | None = None

    def training_samples(self) -> list[int] | None:
        """Each shard's samples that training reads: `samples` less the held-out rows; `None` when not counted."""
        if self.samples is None:
            return None
        if self.held_out is None or len(self.held_out) != len(self.samples):
            return list(self.samples)
        return [max(0, count - held) for count, held in zip(self.samples, self.held_out)]

    def identity(self) -> dict[str, Any]:
        """The shards, each with its sample count (else its size in bytes: a replaced shard holds other samples),
        and the shuffle block size, in a form `torch.load(weights_only=True)` reads back. Shards are named relative
        to the folder that holds them all, so that the data can move (to a node's local disk) between runs."""
        local = [os.path.abspath(shard) for shard in self.shards if os.path.isfile(shard)]
        root = os.path.commonpath([os.path.dirname(path) for path in local]) if len(local) == len(self.shards) else ""
        shards = []
        for index, shard in enumerate(self.shards):
            name = os.path.relpath(os.path.abspath(shard), root) if root else shard
            if self.samples is not None:
                shards.append([name, self.samples[index]])
            else:
                shards.append([name, os.path.getsize(shard) if os.path.isfile(shard) else -1])
        return {
            "shards": shards,
            "shuffle_buffer_size": self.shuffle_buffer_size,
            "held_out_head": self.held_out_head,
            "max_train_samples": self.max_train_samples,
        }


# The sources of the streams made by clip-trainer's loaders, looked up by the trainer (a stream carries no such note).
_SOURCES: weakref.WeakKeyDictionary[IterableDataset, StreamSource] = weakref.WeakKeyDictionary()


def record_source(stream: IterableDataset, source: StreamSource) -> None:
    """Notes what `stream` reads (see [`StreamSource`])."""
    _SOURCES[stream] = source


def source_of(stream: Any) -> StreamSource | None:
    """What `stream` reads, when one of clip-trainer's loaders made it."""
    try:
        return _SOURCES.get(stream)
    except TypeError:  # not weakly referable: not one of ours
        return None


# A reader whose samples come round this many times as often as with equal shards is worth a warning.
UNEVEN_SHARDS_FACTOR = 1.1


def uneven_shard_excess(samples: list[int], readers: int) -> tuple[float, int, int]:
    """How much more often, at worst, a sample comes round than with equal shards when `readers` (processes x
    DataLoader workers) each read their own shards and give an equal share of the batches; the fewest samples a
    reader can be dealt (the sum of the `len(samples) // readers` smallest shards: each reader gets at least that
    many) and the most (the sum of the `ceil(len(samples) / readers)` largest). 1.0: uniform. A sample of the reader
    with the fewest comes round `most / fewest` times as often as one of the reader with the most."""
    per_reader = len(samples) // readers
    if readers <= 1 or per_reader == 0:
        return 1.0, sum(samples), sum(samples)
    fewest = sum(sorted(samples)[:per_reader])
    most = sum(sorted(samples, reverse=True)[: -(-len(samples) // readers)])
    if fewest == 0:
        return float("inf"), 0, most
    return sum(samples) / (readers * fewest), fewest, most


def _times(most: int, fewest: int) -> str:
    return f"{most / fewest:.2f}x" if fewest else "infinitely"


def _held_out_cause(source: StreamSource | None, readers: int, layout: str) -> str:
    """The end of the uneven-shards warning: what the rows held out of the stream for validation add to it, and the
    fix (the held-out rows alone, when the shards are even without them)."""
    fix = f"Write shards of equal size, a multiple of {readers} of them ({layout})."
    if source is None or source.samples is None or not source.held_out or not any(source.held_out):
        return fix
    held, shards = sum(source.held_out), sum(1 for count in source.held_out if count)
    first = source.shards[next(index for index, count in enumerate(source.held_out) if count)]
    what = (
        f"the validation set held out of the stream: its {held:,} pairs are the first of the stream, from {shards:,} "
        f"shard(s) (first: {first}), and training leaves them out, so those shards hold fewer training samples"
    )
    even = min(source.samples) == max(source.samples) and uneven_shard_excess(source.samples, readers)[0] == 1.0
    if not even:
        return f"Part of it is {what}. {fix}"
    return (
        f"The cause is {what}: give a `validation_file` to train on every shard whole, or hold out fewer pairs "
        f"(`max_eval_samples`) ({layout})."
    )


def check_shard_split(stream: IterableDataset, world_size: int, num_workers: int) -> None:
    """Warns when the stream's shards are not dealt out evenly: fewer shards than processes, uneven shard sizes
    (when they are known, see [`StreamSource`]; the rows held out of the stream for validation count against the
    shards they came from), or a shard count that is not a multiple of the readers."""
    readers = world_size * max(1, num_workers)
    shards = stream.num_shards
    source = source_of(stream)
    sizes = source.training_samples() if source is not None else None
    layout = 'see "Laying out shards" in docs/data.md'
    if shards < world_size:
        logger.warning(
            f"The training stream has {shards} shard(s) for {world_size} processes: every process reads all of it and "
            "keeps every n-th batch. Give at least as many shards (files) as processes to read each one once."
        )
    elif shards < readers and shards % world_size == 0 and (sizes is None or min(sizes) == max(sizes)):
        # `datasets` stops the DataLoader workers that get no shard ("Too many dataloader workers"): the others read
        # one shard each, evenly, and the stopped ones cost only their start.
        active = shards // world_size
        logger.warning(
            f"The training stream has {shards} shard(s) for {readers} readers ({world_size} process(es) x "
            f"{num_workers} DataLoader workers): `datasets` stops the workers that get no shard, so {active} per "
            f"process read it (evenly). Set `dataloader_num_workers` to {active}, or split the data into a multiple "
            f"of {readers} files to decode images in every worker ({layout})."
        )
    elif sizes is not None and len(sizes) == shards and readers > 1 and min(sizes) < max(sizes):
        excess, fewest, most = uneven_shard_excess(sizes, readers)
        if excess >= UNEVEN_SHARDS_FACTOR:
            total = sum(sizes)
            logger.warning(
                f"The training stream's {shards} shards are uneven ({min(sizes):,} to {max(sizes):,} samples, "
                f"{total:,} in all) for {readers} readers ({world_size} process(es) x {max(1, num_workers)} "
                f"DataLoader worker(s)), each reading its own shards and giving an equal share of the batches: a "
                f"reader dealt the smallest shards starts its next pass sooner, so their samples can come round up "
                f"to {excess:.2f}x as often as with an even split, {_times(most, fewest)} as often as those of the "
                f"reader with the most (at worst {fewest:,} samples make {1 / readers:.0%} of the draws instead of "
                f"{fewest / total:.1%}). {_held_out_cause(source, readers, layout)}"
            )
    elif shards % readers:
        # Equal (or unknown) sizes: only the count is uneven. With known sizes, say how much more often.
        how_often = ""
        if sizes is not None and len(sizes) == shards:
            excess, fewest, most = uneven_shard_excess(sizes, readers)
            if 1.0 < excess < float("inf"):
                how_often = (
                    f" (up to {excess:.2f}x as often as with an even split, {_times(most, fewest)} as often as those "
                    "of the reader with the most)"
                )
        logger.warning(
            f"The training stream's {shards} shards do not divide evenly among {readers} readers ({world_size} "
            f"process(es) x {max(1, num_workers)} DataLoader worker(s)): every sample is still read once per pass of "
            f"its reader, but readers with fewer shards start their next pass sooner, so their samples come round "
            f"more often{how_often}. A multiple of {readers} equal-sized shards samples uniformly ({layout})."
        )


# --------------------------------------------------------------------------------------------------------------
# The loader's state in checkpoints
# --------------------------------------------------------------------------------------------------------------


def stateful_loading_available() -> bool:
    from accelerate.utils import is_torchdata_stateful_dataloader_available

    return is_torchdata_stateful_dataloader_available()


def _layout(args: Any) -> dict[str, int]:
    """What a saved stream position depends on besides the data: a resume with another layout reads other samples."""
    return {
        "world_size": args.world_size,
        "dataloader_num_workers": args.dataloader_num_workers,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "seed": args.seed,
    }


def _data_changes(saved: dict[str, Any] | None, current: dict[str, Any] | None) -> str:
    """What differs between the training data a stream position was saved with and this run's, in words; empty when
    nothing does or either is unknown (a checkpoint from before the data was saved with it)."""
    if saved is None or current is None:
        return ""
    # A checkpoint saved before a key was kept with the position says nothing of it.
    current = {key: value for key, value in current.items() if key in saved}
    if saved == current:
        return ""
    changes = []
    for key, option in (
        ("shuffle_buffer_size", "shuffle_buffer_size"),
        ("held_out_head", "the pairs held out of the stream's head (`max_eval_samples`)"),
        ("max_train_samples", "max_train_samples"),
    ):
        if key in saved and saved.get(key) != current.get(key):
            name = f"`{option}`" if option == key else option
            changes.append(f"{name} was {saved.get(key)} and is {current.get(key)}")
    before = {path: size for path, size in saved.get("shards", [])}
    now = {path: size for path, size in current.get("shards", [])}
    for label, names in (
        ("gone", [path for path in before if path not in now]),
        ("new", [path for path in now if path not in before]),
        ("of another size", [path for path in now if path in before and now[path] != before[path]]),
    ):
        if names:
            changes.append(f"{len(names):,} shard(s) {label} (first: {names[0]})")
    if not changes and [path for path, _ in saved.get("shards", [])] != [
        path for path, _ in current.get("shards", [])
    ]:
        changes.append("the shards are in another order")
    return "; ".join(changes)


class StreamPositionCallback(TrainerCallback):
    """Saves every process's training-stream position with each checkpoint and restores it when the run resumes.

    Each process writes its own file (`stream_state_<rank>.pt`, as the Trainer writes `rng_state_<rank>.pth`): the
    processes read different shards. Needs the training DataLoader to be torchdata's `StatefulDataLoader`, which
    [`enable_stream_resume`] asks `accelerate` for.
    """

    def __init__(self, source: StreamSource | None = None) -> None:
        self.pending: dict[str, Any] | None = None
        # What the stream reads (its shards, their sizes, the shuffle block size), saved beside its position: the
        # same position in other data is other samples.
        self.data = source.identity() if source is not None else None

    def on_save(self, args, state, control, train_dataloader=None, **kwargs):
        if train_dataloader is None or not hasattr(train_dataloader, "state_dict"):
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        payload = {"dataloader": train_dataloader.state_dict(), "layout": _layout(args), "step": state.global_step}
        if self.data is not None:
            payload["data"] = self.data
        path = os.path.join(folder, STREAM_STATE_NAME.format(rank=args.process_index))
        torch.save(payload, path + ".tmp")
        os.replace(path + ".tmp", path)  # a kill mid-write leaves no half file under the real name

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if self.pending is not None and train_dataloader is not None:
            train_dataloader.load_state_dict(self.pending)
        self.pending = None

    def read(self, checkpoint: str, args: Any) -> dict[str, Any] | None:
        """The loader state this process saved in `checkpoint`, or `None` (with the reason logged) when there is none
        or it was saved with another layout or over other data (other shards, `shuffle_buffer_size`)."""
        path = os.path.join(checkpoint, STREAM_STATE_NAME.format(rank=args.process_index))
        if not os.path.isfile(path):
            logger.warning(
                f"{checkpoint} has no saved stream position ({os.path.basename(path)}): the stream is replayed from the "
                "start up to the checkpoint, which decodes every batch already trained on (slow, but the same samples)."
            )
            return None
        try:
            payload = torch.load(path, weights_only=True)
        except Exception as error:  # a damaged file: replaying is slower but still right
            logger.warning(f"Cannot read {path} ({type(error).__name__}: {error}); replaying the stream instead.")
            return None
        if payload.get("layout") != _layout(args):
            logger.warning(
                f"{path} was saved with {payload.get('layout')} and this run has {_layout(args)}: the saved stream "
                "position does not apply. Replaying the stream, which with another layout reads other samples than "
                "the interrupted run would have."
            )
            return None
        changed = _data_changes(payload.get("data"), self.data)
        if changed:
            logger.warning(
                f"{path} was saved while streaming other training data: {changed}. The saved stream position would "
                "point at other samples (some repeated, some never read), so it is not used: the stream is replayed "
                "from the start up to the checkpoint instead."
            )
            return None
        return payload["dataloader"]

    @contextlib.contextmanager
    def resuming(self, trainer: Any, checkpoint: str | bool | None) -> Iterator[None]:
        """Around `Trainer.train`: with a saved position, the Trainer's replay of the stream (`ignore_data_skip`
        off) is turned off for this call and the position is loaded into the DataLoader when training begins."""
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(trainer.args.output_dir)
        saved = self.read(checkpoint, trainer.args) if isinstance(checkpoint, str) else None
        original = trainer.args.ignore_data_skip
        if saved is not None and not original:
            self.pending = saved
            trainer.args.ignore_data_skip = True
            logger.info(f"Resuming the training stream at the position saved in {checkpoint}.")
        try:
            yield
        finally:
            trainer.args.ignore_data_skip = original
            self.pending = None


def enable_stream_resume(trainer: Any) -> StreamPositionCallback | None:
    """Turns on stateful data loading for a trainer whose training data is a stream, and adds the callback that
    keeps the stream's position in checkpoints. Without torchdata, resuming replays the stream (still exact)."""
    if not stateful_loading_available():
        logger.info(
            "torchdata is not installed: a resumed streaming run replays the stream up to its checkpoint instead of "
            "restoring its position (`pip install torchdata`)."
        )
        return None
    # `TrainingArguments.accelerator_config` has no field for it (transformers 5.x), so it is set on the
    # accelerator's data loader configuration, which `accelerator.prepare` reads when it wraps the DataLoader.
    trainer.accelerator.dataloader_config.use_stateful_dataloader = True
    # torchdata 0.11 calls a torch function that torch 2.9+ deprecates, at every `iter()`; nothing for a user to do.
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
    callback = StreamPositionCallback(source_of(trainer.train_dataset))
    trainer.add_callback(callback)
    return callback
