"""Surviving faults: non-finite losses and gradients during training, and checkpoints left half-written by a crash.

- [`NonFiniteLossCallback`] skips the optimizer update of a step whose loss or gradients are NaN or inf, counts such
  steps, and stops the run after `max_nonfinite_steps` of them in a row with [`NonFiniteTrainingError`].
- [`latest_complete_checkpoint`] finds the newest checkpoint in `output_dir` that a resumed run can load, passing
  over one that a killed process left incomplete.
"""

from __future__ import annotations

import json
import os
import re
import zipfile

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

logger = logging.get_logger(__name__)

# --------------------------------------------------------------------------------------------------------------
# Non-finite losses and gradients
# --------------------------------------------------------------------------------------------------------------


class NonFiniteTrainingError(RuntimeError):
    """Training stopped because the loss or the gradients stayed NaN or inf for too many optimizer steps in a row."""


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Whether every element of every tensor is finite, as a boolean tensor on the first tensor's device.

    Computed without a host synchronisation: one fused `torch._foreach_norm` per device (the max-norm, which cannot
    overflow on its own as a 2-norm of large finite values can, and is NaN or inf exactly when an element is), then
    one reduction. The caller decides when to read it.
    """
    if not tensors:
        return torch.tensor(True)
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_device.setdefault(tensor.device, []).append(tensor)
    first_device = tensors[0].device
    flags = [
        torch.stack(torch._foreach_norm(group, float("inf"))).isfinite().all().to(first_device)
        for group in by_device.values()
    ]
    return torch.stack(flags).all()


class NonFiniteLossCallback(TrainerCallback):
    """Skips optimizer updates whose loss or gradients are NaN or inf; stops the run when they keep coming.

    Before every optimizer step (after gradient clipping, whose pre-clip norm is NaN or inf in exactly this case and
    has then spread the fault to every gradient) the gradients of the model's parameters, and every loss the trainer
    reported through [`observe_loss`] since the last step, are checked in one fused device computation and one host
    synchronisation. When anything is not finite, every gradient is set to `None`: `torch.optim` optimizers
    (AdamW, Adam, SGD, in their for-loop, foreach and fused forms) leave a parameter without a gradient untouched, its
    moments and step count included, so the weights stay bit-identical. The learning-rate schedule still advances,
    which keeps it in line with `global_step`, as a resumed run expects.

    After `max_consecutive` such steps in a row, the callback asks the Trainer to stop, to log, and (unless
    `save_strategy` is `"no"`) to save a checkpoint; the weights in it never took a bad update, so it is the last
    good state. When the Trainer has finished (logs flushed, reporters closed), `on_train_end` raises
    [`NonFiniteTrainingError`] so that the run does not look like a success and the caller writes no final model.

    With `fp16` the gradient scaler owns this job: overflowing steps are the normal way it finds its scale, so they
    are neither counted nor stopped on here; nor under DeepSpeed, whose engine keeps the gradients. Under distributed
    training (DDP, FSDP) every process takes the same decision.

    `transformers`' own `logging_nan_inf_filter` only keeps NaN out of the logged loss; it does not skip updates.

    Args:
        max_consecutive (`int`, *optional*, defaults to 5):
            Non-finite steps in a row after which the run stops. 0: never stop, keep skipping.

    Attributes:
        skipped_steps (`int`): optimizer steps skipped so far in this `train()` call (the trainer logs it as
            `nonfinite_steps_skipped`).
        consecutive (`int`): the current run of skipped steps.
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 0:
            raise ValueError(f"`max_consecutive` is {max_consecutive}; it must be 0 (never stop) or more.")
        self.max_consecutive = max_consecutive
        self.skipped_steps = 0
        self.consecutive = 0
        self.first_bad_step: int | None = None
        self.stop_reason: str | None = None
        self._loss_finite: torch.Tensor | None = None

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Notes one micro-batch's loss; it counts in the next step's check. Costs no host synchronisation."""
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.skipped_steps = 0
        self.consecutive = 0
        self.first_bad_step = None
        self.stop_reason = None
        self._loss_finite = None

    def on_pre_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model=None,
        optimizer=None,
        **kwargs,
    ):
        loss_finite, self._loss_finite = self._loss_finite, None
        if args.fp16 or args.deepspeed:
            # fp16: the gradient scaler skips overflowing steps itself. DeepSpeed keeps the gradients in its own
            # (partitioned) buffers, out of reach of `parameter.grad`, and its engine handles overflow.
            return
        parameters = _parameters(model, optimizer)
        # A sharded gradient (FSDP2's DTensor) is checked through its local shard; the processes then agree below.
        grads = [
            p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in parameters if p.grad is not None
        ]
        finite = all_finite(grads)
        if loss_finite is not None:
            finite = finite & loss_finite.to(finite.device)
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # The gradients are averaged across processes already, but a loss, or a gradient shard, is not.
            flag = finite.to(device=args.device, dtype=torch.int32)  # NCCL reduces device tensors only
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = flag.bool()
        if finite.item():  # the one host synchronisation of the step
            self.consecutive = 0
            return

        for parameter in parameters:
            parameter.grad = None
        step = state.global_step + 1  # the step being taken
        self.skipped_steps += 1
        self.consecutive += 1
        if self.consecutive == 1:
            self.first_bad_step = step
        logger.warning(
            f"Step {step}: the loss or the gradients are NaN or inf; the update is skipped ({self.consecutive} in a "
            f"row, {self.skipped_steps} in this run)."
        )
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            self.stop_reason = (
                f"The loss or the gradients were NaN or inf for {self.consecutive} optimizer steps in a row (steps "
                f"{self.first_bad_step}-{step}; `max_nonfinite_steps` is {self.max_consecutive}), so training "
                f"stopped. Those updates were skipped: the weights are those after step {self.first_bad_step - 1}."
            )
            control.should_training_stop = True
            control.should_log = True
            if args.save_strategy != "no":
                control.should_save = True
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.stop_reason is None:
            return
        stop_checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        newest = latest_complete_checkpoint(args.output_dir)
        if newest is not None and os.path.abspath(newest) == os.path.abspath(stop_checkpoint):
            where = f" They are saved in {newest}."
        elif newest is not None:  # e.g. `load_best_model_at_end` with `save_total_limit=1` kept only the best
            where = f" The newest complete checkpoint is {newest}."
        else:
            where = " No checkpoint holds them" + (" (`save_strategy` is no)." if args.save_strategy == "no" else ".")
        raise NonFiniteTrainingError(
            self.stop_reason + where + " Lower `learning_rate` or `max_logit_scale`, add `warmup_steps`, train in "
            "bf16 rather than fp16, look for broken inputs in the data, or raise `max_nonfinite_steps`."
        )


def _parameters(model, optimizer) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates, or the model's: transformers 5.24 passes callbacks `optimizer=None`
    unless one was given to the Trainer (its `CallbackHandler` keeps the constructor's value)."""
    if optimizer is not None:
        return [p for group in optimizer.param_groups for p in group["params"]]
    return list(model.parameters()) if model is not None else []


# --------------------------------------------------------------------------------------------------------------
# Checkpoints left incomplete by a crash
# --------------------------------------------------------------------------------------------------------------

_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
TRAINER_STATE_NAME = "trainer_state.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# Written with `torch.save`, a zip archive: one cut short has no central directory at its end.
TRAINING_STATE_FILES = ("optimizer.pt", "scheduler.pt")


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


def _torch_file_problem(path: str) -> str | None:
    if not os.path.isfile(path):
        return f"{os.path.basename(path)} is missing"
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        return f"{os.path.basename(path)} is unreadable ({error})"
    return None


def checkpoint_problems(folder: str) -> list[str]:
    """Why a Trainer checkpoint folder cannot be resumed from; an empty list when it is complete.

    `Trainer._save_checkpoint` (transformers 5.24) writes straight into `checkpoint-N`, not into a temporary folder
    renamed at the end: the weights, config and processor, then `optimizer.pt`, `scheduler.pt` and `scaler.pt`,
    `rng_state.pth` (`rng_state_<rank>.pth` with several processes), and `trainer_state.json` last. A process killed on
    the way leaves a folder under the final name with some of these missing or cut short. Every file a resume loads is
    checked cheaply: the safetensors headers (single file, or index and every shard), the zip directory of each
    `torch.save` file, and that `trainer_state.json` parses.

    The layout checked is the Trainer's for one process or DDP; DeepSpeed and FSDP checkpoints store the model and
    optimizer differently and are reported as incomplete.
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

    index_path = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            problems.append(f"{SAFE_WEIGHTS_INDEX_NAME} is unreadable ({error!r})")
            shards = []
        problems.extend(p for shard in shards if (p := _safetensors_problem(os.path.join(folder, shard))))
    else:
        problem = _safetensors_problem(os.path.join(folder, SAFE_WEIGHTS_NAME))
        if problem:
            problems.append(problem)

    problems.extend(p for name in TRAINING_STATE_FILES if (p := _torch_file_problem(os.path.join(folder, name))))
    if os.path.exists(os.path.join(folder, "scaler.pt")):  # only written in fp16
        problem = _torch_file_problem(os.path.join(folder, "scaler.pt"))
        if problem:
            problems.append(problem)
    rng_files = [name for name in os.listdir(folder) if name.startswith("rng_state") and name.endswith(".pth")]
    if not rng_files:
        problems.append("rng_state.pth is missing")
    problems.extend(p for name in sorted(rng_files) if (p := _torch_file_problem(os.path.join(folder, name))))
    return problems


def latest_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-N` folder in `output_dir` that is complete, or `None` when there is none.

    `transformers.trainer_utils.get_last_checkpoint` returns the highest-numbered folder whatever its state, so after
    a crash during a save it names the half-written one, and resuming from it fails (or, worse, loads a model whose
    optimizer state is missing). Incomplete folders are passed over with a warning saying what is wrong; they are
    not deleted, since what to do with them is the user's call.
    """
    if not os.path.isdir(output_dir):
        return None
    numbered = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_NAME.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            numbered.append((int(match.group(1)), os.path.join(output_dir, name)))
    for _, folder in sorted(numbered, reverse=True):
        problems = checkpoint_problems(folder)
        if not problems:
            return folder
        logger.warning(f"Passing over incomplete checkpoint {folder}: {'; '.join(problems)}.")
    return None
