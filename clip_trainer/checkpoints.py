"""Checkpoints and the output folder: which checkpoint a run resumes from, whether a checkpoint is complete, and who
may write into `output_dir`.

- [`latest_complete_checkpoint`] finds the newest checkpoint in `output_dir` that a resumed run can load, passing
  over one that a killed process left incomplete; [`resolve_resume_checkpoint`] turns `resume_from_checkpoint`
  (`true` or a path) into that folder, or says why there is none.
- [`claim_output_dir`] makes sure a run does not write over another run's checkpoints unasked, and that two runs
  cannot write into one folder at the same time (a lock file held for the run's duration).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import weakref
import zipfile

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .errors import ConfigError

logger = logging.get_logger(__name__)

# --------------------------------------------------------------------------------------------------------------
# Checkpoints left incomplete by a crash
# --------------------------------------------------------------------------------------------------------------

_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
TRAINER_STATE_NAME = "trainer_state.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# peft's adapter files, which a LoRA run's checkpoints hold in place of the model's weights.
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# The moving average of the weights (`ema_decay`), written with the checkpoint's weights (before the optimizer state and
# `trainer_state.json`) by `CLIPContrastiveTrainer.save_model`.
EMA_WEIGHTS_NAME = "ema.safetensors"
# An FSDP run's checkpoint (accelerate's names): with `SHARDED_STATE_DICT`, the model's and the optimizer's shards in
# two `torch.distributed.checkpoint` folders; with `FULL_STATE_DICT`, two `torch.save` files.
FSDP_SHARDED_FOLDERS = ("pytorch_model_fsdp_0", "optimizer_0")
FSDP_FULL_FILES = ("pytorch_model_fsdp.bin", "optimizer.bin")
# A DeepSpeed run's checkpoint: `latest` names the engine's folder (`global_stepN`), which holds the model's states and
# one file of optimizer states per process.
DEEPSPEED_LATEST = "latest"


def _safetensors_problem(path: str) -> str | None:
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        return f"{os.path.basename(path)} is missing"
    try:
        # Reads only the header; the library checks that the tensors it lists cover the file exactly, so a file cut
        # short (or zero-length) is refused without reading the weights.
        with safe_open(path, framework="pt"):
            pass
    except (SafetensorError, OSError) as error:
        return f"{os.path.basename(path)} is unreadable ({error})"
    return None


def _json_problem(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            json.load(handle)
    except FileNotFoundError:
        return f"{os.path.basename(path)} is missing"
    except (OSError, ValueError) as error:
        return f"{os.path.basename(path)} is unreadable ({error})"
    return None


def _torch_file_problem(path: str) -> str | None:
    if not os.path.isfile(path):
        return f"{os.path.basename(path)} is missing"
    try:
        with zipfile.ZipFile(path) as archive:
            # Every entry against its CRC: a file of the right length with a block of zeros in it (what a power
            # loss can leave of an unsynced write) has an intact directory, and `torch.load` reads the zeros as data.
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"{os.path.basename(path)} is unreadable ({error})"
    if damaged is not None:
        return f"{os.path.basename(path)} is damaged (its entry {damaged} fails its checksum)"
    return None


# The model's and the processor's JSON files a resume reads from a checkpoint, when the checkpoint has them.
_CHECKPOINT_JSON_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "processor_config.json",
)
# The files a tokenizer is built from besides `tokenizer_config.json` (a fast tokenizer's `tokenizer.json`, or a slow
# one's vocabulary).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


def _model_files_problems(folder: str) -> list[str]:
    """The checkpoint's config and processor files that a resume loads: each JSON file present parses, and a
    tokenizer config comes with the tokenizer it describes."""
    problems = [
        problem
        for name in _CHECKPOINT_JSON_FILES
        if os.path.exists(os.path.join(folder, name)) and (problem := _json_problem(os.path.join(folder, name)))
    ]
    has_tokenizer = any(os.path.exists(os.path.join(folder, name)) for name in _TOKENIZER_FILES)
    if os.path.exists(os.path.join(folder, "tokenizer_config.json")) and not has_tokenizer:
        problems.append("tokenizer.json is missing (tokenizer_config.json is there)")
    return problems


def _distributed_checkpoint_problem(path: str) -> str | None:
    """What is wrong with a `torch.distributed.checkpoint` folder: its `.metadata` (written last, once every process
    has written its shard) must load, and every file it points into must hold the bytes it says."""
    from torch.distributed.checkpoint import FileSystemReader

    name = os.path.basename(path)
    if not os.path.isdir(path):
        return f"{name}/ is missing"
    try:
        metadata = FileSystemReader(path).read_metadata()
    except FileNotFoundError:
        return f"{name}/.metadata is missing"
    except Exception as error:  # an unpickling error of a file cut short can be of many types
        return f"{name}/.metadata is unreadable ({error!r})"
    for storage in (metadata.storage_data or {}).values():
        file = os.path.join(path, storage.relative_path)
        if not os.path.isfile(file) or os.path.getsize(file) < storage.offset + storage.length:
            return f"{name}/{storage.relative_path} is missing or cut short"
    return None


def _deepspeed_problems(folder: str) -> list[str]:
    """What is wrong with the DeepSpeed engine's part of a checkpoint: the folder `latest` names, its model states,
    and one optimizer-state file per process (as many as the checkpoint's `rng_state_<rank>.pth`)."""
    with open(os.path.join(folder, DEEPSPEED_LATEST), encoding="utf-8") as handle:
        tag = handle.read().strip()
    engine = os.path.join(folder, tag)
    if not tag or not os.path.isdir(engine):
        return [f"{DEEPSPEED_LATEST} names {tag!r}, which is missing"]
    problems = [
        p for name in ("mp_rank_00_model_states.pt",) if (p := _torch_file_problem(os.path.join(engine, name)))
    ]
    optimizer_files = sorted(name for name in os.listdir(engine) if name.endswith("_optim_states.pt"))
    processes = len([name for name in os.listdir(folder) if re.fullmatch(r"rng_state(_\d+)?\.pth", name)])
    if len(optimizer_files) < processes:
        problems.append(f"{tag}/ holds the optimizer states of {len(optimizer_files)} of {processes} processes")
    problems.extend(f"{tag}/{p}" for name in optimizer_files if (p := _torch_file_problem(os.path.join(engine, name))))
    return problems


def _weight_files(folder: str) -> tuple[list[str], str | None]:
    """The safetensors files of a model saved in `folder`: the shards its index names, else `model.safetensors`;
    and the index's problem when it cannot be read (no files then)."""
    index_path = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if not os.path.isfile(index_path):
        return [SAFE_WEIGHTS_NAME], None
    try:
        with open(index_path, encoding="utf-8") as handle:
            return sorted(set(json.load(handle)["weight_map"].values())), None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return [], f"{SAFE_WEIGHTS_INDEX_NAME} is unreadable ({error!r})"


def _model_and_optimizer_problems(folder: str) -> list[str]:
    """The weights and the optimizer state, in whichever layout the run saved them."""
    if os.path.isfile(os.path.join(folder, DEEPSPEED_LATEST)):
        return _deepspeed_problems(folder)
    if os.path.isdir(os.path.join(folder, FSDP_SHARDED_FOLDERS[0])):
        return [
            p for name in FSDP_SHARDED_FOLDERS if (p := _distributed_checkpoint_problem(os.path.join(folder, name)))
        ]
    if os.path.isfile(os.path.join(folder, FSDP_FULL_FILES[0])):
        return [p for name in FSDP_FULL_FILES if (p := _torch_file_problem(os.path.join(folder, name)))]
    problems = []
    has_index = os.path.isfile(os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME))
    if has_index or not os.path.isfile(os.path.join(folder, ADAPTER_CONFIG_NAME)):
        weights, problem = _weight_files(folder)
        problems.extend([problem] if problem else [])
        problems.extend(p for name in weights if (p := _safetensors_problem(os.path.join(folder, name))))
    else:
        # A LoRA run's checkpoint holds its adapter (peft's files), not the whole model.
        problems.extend(
            p
            for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)
            if (
                p := _json_problem(os.path.join(folder, name))
                if name.endswith(".json")
                else _safetensors_problem(os.path.join(folder, name))
            )
        )
    problem = _torch_file_problem(os.path.join(folder, "optimizer.pt"))
    if problem:
        problems.append(problem)
    return problems


def checkpoint_problems(folder: str) -> list[str]:
    """Why a Trainer checkpoint folder cannot be resumed from; an empty list when it is complete.

    `Trainer._save_checkpoint` (transformers 5.24) writes straight into `checkpoint-N`, not into a temporary folder
    renamed at the end: the weights, config and processor, then `optimizer.pt`, `scheduler.pt` and `scaler.pt`,
    `rng_state.pth` (`rng_state_<rank>.pth` with several processes), and `trainer_state.json` last. A process killed on
    the way leaves a folder under the final name with some of these missing or cut short. Every file a resume loads is
    checked: the safetensors headers (single file, or index and every shard, and `ema.safetensors` when there is one),
    each `torch.save` file's zip entries against their checksums (which reads them: the optimizer state is about
    twice the weights), and that `trainer_state.json` and the config and processor JSON files parse.

    The layouts checked are the Trainer's for one process or DDP, LoRA's, FSDP's (sharded: each
    `torch.distributed.checkpoint` folder's metadata and the bytes it points to; full: the two `torch.save` files),
    and DeepSpeed's (the engine's folder that `latest` names, with every process's optimizer states).
    """
    problems = []
    state_path = os.path.join(folder, TRAINER_STATE_NAME)
    try:
        with open(state_path, encoding="utf-8") as handle:
            state = json.load(handle)
        if not isinstance(state, dict) or "global_step" not in state:
            problems.append(f"{TRAINER_STATE_NAME} has no global_step")
    except FileNotFoundError:
        problems.append(f"{TRAINER_STATE_NAME} is missing")
    except (OSError, ValueError) as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        problems.append(f"{TRAINER_STATE_NAME} is unreadable ({error})")

    problems.extend(_model_and_optimizer_problems(folder))
    problems.extend(_model_files_problems(folder))

    if os.path.exists(os.path.join(folder, EMA_WEIGHTS_NAME)):
        # A run with `ema_decay` writes it with the weights, under a temporary name renamed when complete, before
        # `trainer_state.json`: a checkpoint of such a run that has its state has it. One damaged since is refused
        # here; whether a run may resume without it (or with it) is the trainer's check of its settings.
        problem = _safetensors_problem(os.path.join(folder, EMA_WEIGHTS_NAME))
        if problem:
            problems.append(problem)
    else:
        # Gone from a checkpoint of a run that kept one (deleted since): the checkpoint is as incomplete as one without
        # its optimizer state, not one of a run "trained without `ema_decay`".
        decay = saved_training_argument(folder, "ema_decay")
        if decay is not None and decay is not UNKNOWN:
            problems.append(f"{EMA_WEIGHTS_NAME} is missing (the run kept a moving average, `ema_decay` {decay:g})")
    problem = _torch_file_problem(os.path.join(folder, "scheduler.pt"))
    if problem:
        problems.append(problem)
    if os.path.exists(os.path.join(folder, "scaler.pt")):  # only written in fp16
        problem = _torch_file_problem(os.path.join(folder, "scaler.pt"))
        if problem:
            problems.append(problem)
    rng_files = [name for name in os.listdir(folder) if name.startswith("rng_state") and name.endswith(".pth")]
    if not rng_files:
        problems.append("rng_state.pth is missing")
    problems.extend(p for name in sorted(rng_files) if (p := _torch_file_problem(os.path.join(folder, name))))
    return problems


# What [`saved_training_argument`] returns when a checkpoint has no readable `training_args.bin`.
UNKNOWN = object()


def saved_training_argument(checkpoint: str, name: str):
    """The value of the training argument `name` that the run which wrote `checkpoint` had, read from its
    `training_args.bin` (the pickled arguments `Trainer._save_checkpoint` writes); [`UNKNOWN`] when that file is
    missing or unreadable (written by another version), or has no such argument.

    The Trainer saves its arguments only in this pickle: no readable file records them.
    """
    import torch

    path = os.path.join(checkpoint, "training_args.bin")
    if not os.path.isfile(path):
        return UNKNOWN
    try:
        saved = torch.load(path, weights_only=False)  # our own file, written by `Trainer._save_checkpoint`
    except Exception:  # written by another version (a class since renamed or moved), or cut short
        return UNKNOWN
    return getattr(saved, name, UNKNOWN)


def _newest_complete_checkpoint(output_dir: str) -> tuple[str | None, list[str]]:
    """The newest complete `checkpoint-N` folder in `output_dir` (or `None`), and the newer ones passed over."""
    if not os.path.isdir(output_dir):
        return None, []
    numbered = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_NAME.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            numbered.append((int(match.group(1)), os.path.join(output_dir, name)))
    passed_over = []
    for _, folder in sorted(numbered, reverse=True):
        problems = checkpoint_problems(folder)
        if not problems:
            return folder, passed_over
        logger.warning(f"Passing over incomplete checkpoint {folder}: {'; '.join(problems)}.")
        passed_over.append(folder)
    return None, passed_over


def latest_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-N` folder in `output_dir` that is complete, or `None` when there is none.

    `transformers.trainer_utils.get_last_checkpoint` returns the highest-numbered folder whatever its state, so after
    a crash during a save it names the half-written one, and resuming from it fails (or, worse, loads a model whose
    optimizer state is missing). Incomplete folders are passed over with a warning saying what is wrong; they are
    not deleted, since what to do with them is the user's call.
    """
    return _newest_complete_checkpoint(output_dir)[0]


# --------------------------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------------------------


def resolve_resume_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | None:
    """`resume_from_checkpoint`: a path, or `true` for the newest complete checkpoint in `output_dir`.

    A checkpoint a crash left half-written is passed over (`true`) or refused (a path), never loaded.
    """
    value = resume_from_checkpoint
    if value is None or str(value).lower() in ("false", ""):
        return None
    if str(value).lower() != "true":
        if not os.path.isdir(value):
            raise ConfigError(f"`resume_from_checkpoint` is {value!r}, which is not a folder.")
        problems = checkpoint_problems(value)
        if problems:
            newest = latest_complete_checkpoint(os.path.dirname(os.path.abspath(value)))
            earlier = f" (the newest complete one beside it is {newest!r})" if newest else ""
            raise ConfigError(
                f"`resume_from_checkpoint` is {value!r}, which is incomplete ({'; '.join(problems)}). Resume from an "
                f"earlier checkpoint{earlier}, or pass --resume_from_checkpoint true to take the newest complete one "
                "in `output_dir`."
            )
        return value
    last, passed_over = _newest_complete_checkpoint(output_dir)
    if last is None:
        if passed_over:
            # A run stopped while writing its first checkpoint: nothing to resume, and its folders would stop a
            # new run in this `output_dir` (see `claim_output_dir`), so the way out is to delete them.
            raise ConfigError(
                f"`resume_from_checkpoint` is true but {output_dir!r} holds only incomplete checkpoints "
                f"({len(passed_over)}, named in the warnings above: a run stopped while saving its first one), so "
                "there is nothing to resume. Start over with --overwrite_output_dir true (it deletes them) and "
                "without --resume_from_checkpoint, or choose another --output_dir."
            )
        raise ConfigError(
            f"`resume_from_checkpoint` is true but {output_dir!r} holds no checkpoint-* folder; start without it, "
            "or give a checkpoint path."
        )
    logger.info(f"Resuming from {last}.")
    return last


# --------------------------------------------------------------------------------------------------------------
# Who writes into output_dir
# --------------------------------------------------------------------------------------------------------------

# Named with a leading underscore: `Trainer.push_to_hub` uploads `output_dir` without `_*` files.
LOCK_FILE_NAME = "_clip-trainer.lock"


def _checkpoint_folders(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    return sorted(name for name in os.listdir(output_dir) if _CHECKPOINT_NAME.match(name))


# The locks this process holds. A forked child (a DataLoader worker) shares each through its copy of the descriptor,
# and would hold it past a killed run until it noticed and exited itself; each child closes its copies at once, so a
# lock ends with the run's own process. (The parent's lock stays: it goes only when every copy is closed.)
_HELD_LOCKS: weakref.WeakSet[OutputDirLock] = weakref.WeakSet()


def _close_held_locks_in_child() -> None:
    for lock in list(_HELD_LOCKS):
        if not lock._handle.closed:
            lock._handle.close()
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_held_locks_in_child)


class OutputDirLock:
    """An exclusive `flock` on `output_dir/_clip-trainer.lock`, held until [`release`] or the process ends.

    The kernel drops the lock when the process dies, however it dies, so a crashed run never leaves a stale lock
    behind (its file stays, harmless, and the next run takes it over). A run that ends removes the file, so that a
    finished folder holds only what the run wrote for its users (`hf upload` of the folder would upload the file).
    It records the holder's pid for the message a second run shows.
    """

    def __init__(self, output_dir: str) -> None:
        self.path = os.path.join(output_dir, LOCK_FILE_NAME)
        # A run that ends removes the file after it took the lock: a process that opened the file just before then
        # holds a lock on a file no longer in the folder, so it opens the file again until the two are one.
        for _ in range(100):
            self._handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the run's lifetime
            try:
                fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._handle.seek(0)
                holder = self._handle.read().strip() or "another process"
                self._handle.close()
                raise ConfigError(
                    f"Another run ({holder}) is writing into {output_dir!r}; wait for it to finish, or choose another "
                    "`output_dir`."
                ) from None
            if self._is_the_file_in_the_folder():
                break
            self._handle.close()
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(f"pid {os.getpid()}")
        self._handle.flush()
        _HELD_LOCKS.add(self)

    def _is_the_file_in_the_folder(self) -> bool:
        try:
            return os.path.samestat(os.fstat(self._handle.fileno()), os.stat(self.path))
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if not self._handle.closed:
            if self._is_the_file_in_the_folder():
                os.remove(self.path)  # still locked: whoever opens it now finds it gone (see `__init__`)
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
        _HELD_LOCKS.discard(self)


def check_writable_folder(folder: str, key: str = "output_dir") -> None:
    """Checks, before any work, that `folder` is (or can be created as) a folder this process can write into.

    As root, permission bits do not stop a write, so the check writes and removes a probe file rather than asking
    `os.access`; what stops it is a path through a file, a read-only file system or a full disk.
    """
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"`{key}` {folder!r} is a file; give a folder (it is created if missing).")
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, ".clip-trainer-write-test")
        with open(probe, "w", encoding="utf-8") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as error:
        reason = "the file system is read-only" if error.errno == errno.EROFS else (error.strerror or str(error))
        raise ConfigError(f"Cannot write into `{key}` {folder!r}: {reason}; choose another folder.") from None


def claim_output_dir(
    output_dir: str, resuming: bool = False, overwrite: bool = False, training: bool = True, evaluating: bool = False
):
    """Checks that a run may write into `output_dir`, and locks it against a concurrent run.

    - `output_dir` must be a folder this process can create and write (not a file, not on a read-only file system);
    - for a training run, if it holds another run's checkpoints, the run resumes from them (`resuming`), or deletes
      them first (`overwrite`, i.e. `--overwrite_output_dir`), or stops and says so: the Trainer would otherwise mix
      the two runs' checkpoints and then rotate the older run's away without a word; `overwrite` also removes what
      the earlier run wrote that this one may not write again (`EARLIER_RUN_OUTPUTS`: `onnx/`, `adapter/`, ...);
    - a training run without checkpoints to resume, and an evaluation-only run (`evaluating`), stop when the folder
      holds a saved model, unless `overwrite`: the final save would replace it, and an evaluation would replace its
      tokenizer, processor files and results (for the evaluated model's own folder, its training run's results,
      while its card keeps the old ones).

    Call it on the main process only. Returns the lock: the caller keeps it for the whole run (the lock is released
    when the object is garbage-collected or released, and in any case when the process ends).
    """
    check_writable_folder(output_dir)
    lock = OutputDirLock(output_dir)
    existing = _checkpoint_folders(output_dir) if training else []
    if existing and not resuming:
        if not overwrite:
            lock.release()
            named = f"{', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}"
            if latest_complete_checkpoint(output_dir) is None:  # a run stopped while saving its first checkpoint
                raise ConfigError(
                    f"`output_dir` {output_dir!r} holds only incomplete checkpoints of an earlier run ({named}, "
                    "stopped while saving), so there is nothing to resume. Pass --overwrite_output_dir true to delete "
                    "them and start over, or choose another --output_dir."
                )
            raise ConfigError(
                f"`output_dir` {output_dir!r} holds checkpoints of an earlier run ({named}). Continue it with "
                "--resume_from_checkpoint true, choose another --output_dir, or pass --overwrite_output_dir true to "
                "delete them and start over."
            )
        for name in existing:
            shutil.rmtree(os.path.join(output_dir, name))
        logger.warning(f"`overwrite_output_dir`: deleted {len(existing)} checkpoint(s) of an earlier run.")
    if overwrite and training and not resuming:
        _remove_earlier_outputs(output_dir)
    if ((training and not resuming) or evaluating) and not overwrite and _holds_saved_model(output_dir):
        lock.release()
        replaced = (
            "which this run's final save would replace"
            if training
            else "and an evaluation writes its results and the evaluated model's tokenizer and processor files there, "
            "replacing that model's own and its training run's results"
        )
        instead = "another --output_dir" if training else f"--output_dir {os.path.normpath(output_dir)}-eval, say"
        raise ConfigError(
            f"`output_dir` {output_dir!r} holds a saved model, {replaced}. Choose {instead}, or pass "
            "--overwrite_output_dir true to write there anyway."
        )
    return lock


# What a training run writes into `output_dir` that a later run may not write again (an option it does not set,
# weights saved in one file where the earlier run's were sharded), so that with `overwrite_output_dir` an earlier
# run's leftovers never sit beside the new model looking like its own (an `onnx/` of other weights). Only these
# names go: anything else in the folder is the user's. The files every run rewrites (the model's, the card, the
# results, `trainer_state.json`) are replaced by the new run itself; `runs/` keeps each run's TensorBoard events in a
# folder of its own.
EARLIER_RUN_OUTPUTS = (
    "onnx",
    "adapter",
    "open_clip_config.json",
    "open_clip_model.safetensors",
    "wise_ft_results.json",
    "wise_ft.png",
    "dropped_rows.jsonl",
    "clip_benchmark_results.json",
    "retrieval_examples.png",
    "training_curves.png",
    "model.safetensors.index.json",
)
_WEIGHT_SHARD = re.compile(r"^model-\d+-of-\d+\.safetensors$")


def _remove_earlier_outputs(output_dir: str) -> None:
    """Removes what an earlier training run left in `output_dir` (see `EARLIER_RUN_OUTPUTS`), naming it."""
    removed = []
    for name in sorted(os.listdir(output_dir)):
        if name not in EARLIER_RUN_OUTPUTS and not _WEIGHT_SHARD.match(name):
            continue
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        removed.append(name)
    if removed:
        logger.warning(
            f"`overwrite_output_dir`: removed what an earlier run left in {output_dir}: {', '.join(removed)}."
        )


# The files that make a folder a saved model (transformers' `save_pretrained`).
_MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _holds_saved_model(folder: str) -> bool:
    """Whether `folder` holds a model saved with `save_pretrained` (a config and weights)."""
    has_config = os.path.isfile(os.path.join(folder, "config.json"))
    return has_config and any(os.path.isfile(os.path.join(folder, name)) for name in _MODEL_WEIGHTS)


def saved_model_problems(folder: str, since: float) -> list[str]:
    """What keeps `folder` from holding a whole model saved at `since` (a `time.time()`) or later: its config and
    weights (one file, or the shards its index names) must read, and the weights be newer (an earlier run's are not
    this run's). Empty: the model is there."""
    weights, index_problem = _weight_files(folder)
    problems = [problem for problem in (index_problem, _json_problem(os.path.join(folder, "config.json"))) if problem]
    for name in weights:
        path = os.path.join(folder, name)
        if problem := _safetensors_problem(path):
            problems.append(problem)
        elif os.path.getmtime(path) < since - 2:  # two seconds: the coarsest clock of a file system (FAT's)
            problems.append(f"{name} is older than this run's training")
    return problems


def share_saved_weights(path: str) -> None:
    """Gives the safetensors files at `path` (a file, or every one under a folder) the mode the process's umask gives
    a new file, as the JSON files beside them have.

    safetensors 0.8 writes each file through a temporary file that it creates with mode 0600 and renames into place,
    so `model.safetensors` could be read by its owner alone (a teammate, a serving container running as another user,
    a Docker image built as root could not load the model). Only files left at 0600 are changed: a mode the user set
    stays, and a umask of 077 keeps them private."""
    umask = os.umask(0o077)  # reading the umask sets it: restore it at once (never through a permissive 0)
    os.umask(umask)
    mode = 0o666 & ~umask
    if os.path.isdir(path):
        files = [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
    else:
        files = [path]
    for file in files:
        if file.endswith(".safetensors") and os.path.isfile(file) and os.stat(file).st_mode & 0o777 == 0o600:
            os.chmod(file, mode)


# Errors of the file system that a save can meet hours into a run.
_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EIO}
# What the writers that raise no `OSError` say when the disk refuses a write: torch.save's zip writer
# (`RuntimeError: PytorchStreamWriter failed writing file ...: file write failed`, or `unexpected pos`) and
# safetensors (`SafetensorError: Error while serializing: IoError(Os { code: 28, kind: StorageFull, ... })`).
_WRITE_FAILURE = re.compile(
    r"file write failed|unexpected pos|No space left|StorageFull|IoError|Read-only file system"
)


def is_save_failure(error: BaseException) -> bool:
    """Whether `error`, raised while a run saves, is the disk refusing a write (and not a bug to show in full)."""
    if isinstance(error, OSError):
        return error.errno in _DISK_ERRNOS
    from safetensors import SafetensorError

    return isinstance(error, SafetensorError | RuntimeError) and bool(_WRITE_FAILURE.search(str(error)))


def describe_save_error(error: BaseException, output_dir: str) -> str:
    """One line for a failed save: what happened, and where the last complete checkpoint is.

    The checkpoint a save leaves half-written is passed over by `--resume_from_checkpoint true`; a run whose last
    checkpoint is its end trains nothing when resumed and only writes the final model.
    """
    newest = latest_complete_checkpoint(output_dir)
    errno_of = getattr(error, "errno", None)
    said_full = errno_of == errno.ENOSPC or re.search(r"No space left|StorageFull", str(error))
    unspecific = re.search(r"file write failed|unexpected pos", str(error))  # torch's writer gives no errno
    free = _free_bytes(output_dir)
    if said_full or (unspecific and free < _NEARLY_FULL):
        what = f"The disk is full: saving into {output_dir!r} failed"
        fix = "Free space or choose another `output_dir`"
    elif unspecific or errno_of == errno.EFBIG:
        what = (
            f"Saving into {output_dir!r} failed ({str(error).strip().splitlines()[0]}) although the disk has "
            f"{free / 2**30:.1f} GiB free: a limit on the size of a file (`ulimit -f`, a FAT32 "
            "or exFAT drive's 4 GiB) is the likely cause"
        )
        fix = "Lift the limit or choose an `output_dir` on another file system"
    else:
        reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[0]
        what = f"Saving into {output_dir!r} failed ({reason})"
        fix = "Free space or choose another `output_dir`"
    if newest:
        return f"{what}. The newest complete checkpoint is {newest}. {fix}, then resume with --resume_from_checkpoint true."
    return (
        f"{what}. No complete checkpoint was written, so there is nothing to resume: {fix[0].lower()}{fix[1:]}, then "
        "start over with --overwrite_output_dir true (it deletes the incomplete checkpoints)."
    )


# Free space under which a write that failed without saying why is taken for a full disk.
_NEARLY_FULL = 64 * 2**20


def _free_bytes(folder: str) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0
