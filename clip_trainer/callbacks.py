"""Trainer callbacks, one job each: freezing towers, clamping the temperature, skipping non-finite steps, and
stopping cleanly on SIGTERM / SIGINT.

- [`NonFiniteLossCallback`] skips the optimizer update of a step whose loss or gradients are NaN or inf (or that had
  no usable pair at all), counts such steps, and stops the run after `max_nonfinite_steps` of them in a row with
  [`NonFiniteTrainingError`].
- [`StopOnSignalCallback`] turns SIGTERM (what clusters send before preemption) and a first Ctrl-C into a checkpoint
  at the end of the current step and a clean stop, which `resume_from_checkpoint=true` continues from.
"""

from __future__ import annotations

import os
import signal

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .checkpoints import latest_complete_checkpoint
from .errors import NonFiniteTrainingError, TrainingInterrupted

logger = logging.get_logger(__name__)


class ClampLogitScaleCallback(TrainerCallback):
    """Clamps `logit_scale` to `[0, log(max_logit_scale)]` after every optimizer step, as CLIP does (at ln 100).

    In place and on the device: no host synchronisation in the training step.
    """

    def __init__(self, max_log_scale: float) -> None:
        self.max_log_scale = max_log_scale

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        logit_scale = getattr(model, "logit_scale", None)
        if logit_scale is None:  # the model is wrapped (DDP, compile): reach the CLIP module
            logit_scale = getattr(getattr(model, "module", model), "logit_scale", None)
        if logit_scale is not None:
            with torch.no_grad():
                logit_scale.clamp_(0.0, self.max_log_scale)


# --------------------------------------------------------------------------------------------------------------
# Non-finite losses and gradients
# --------------------------------------------------------------------------------------------------------------


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Whether every element of every tensor is finite, as a boolean tensor on the first tensor's device.

    On an accelerator, computed without a host synchronisation: one fused `torch._foreach_norm` per device (the
    max-norm, which cannot overflow on its own as a 2-norm of large finite values can, and is NaN or inf exactly when
    an element is), then one reduction. The caller decides when to read it.

    On the CPU, where reading a flag costs nothing but `_foreach_norm` is a loop of one kernel per tensor and the
    max-norm's kernel is slow (2.8 ms a step for the demo's 78 gradients, against 0.2 ms for the 2-norms), the
    2-norms are computed and read first: when all are finite, so is every element. Only when one is not (a NaN or
    inf, or a 2-norm overflowing on large finite values) does the max-norm decide.
    """
    # An empty tensor is finite; `_foreach_norm` has no max-norm of one (FSDP2 leaves some processes an empty shard).
    tensors = [tensor for tensor in tensors if tensor.numel() > 0]
    if not tensors:
        return torch.tensor(True)
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_device.setdefault(tensor.device, []).append(tensor)
    first_device = tensors[0].device
    flags = []
    for device, group in by_device.items():
        if device.type == "cpu" and bool(torch.stack(torch._foreach_norm(group, 2.0)).isfinite().all()):
            flags.append(torch.tensor(True, device=first_device))
            continue
        flags.append(torch.stack(torch._foreach_norm(group, float("inf"))).isfinite().all().to(first_device))
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
        self._pairs: torch.Tensor | None = None
        self.empty_steps = 0
        self.consecutive_empty = 0
        self.fix = ""

    def observe_loss(self, loss: torch.Tensor, pairs: torch.Tensor | None = None) -> None:
        """Notes one micro-batch's loss, and how many usable pairs it had; they count in the next step's check.
        Costs no host synchronisation."""
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        if pairs is not None:
            self._pairs = pairs if self._pairs is None else self._pairs + pairs

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.skipped_steps = 0
        self.consecutive = 0
        self.first_bad_step = None
        self.stop_reason = None
        self._loss_finite = None
        self._pairs = None
        self.empty_steps = 0
        self.consecutive_empty = 0
        self.fix = ""

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
        pairs, self._pairs = self._pairs, None
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
        # One tensor, one reduction, one read: (processes with a non-finite value, usable pairs of the step).
        flags = torch.stack(
            [(~finite).to(torch.int64), torch.as_tensor(1 if pairs is None else pairs).to(finite.device, torch.int64)]
        )
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # The gradients are averaged across processes already, but a loss, or a gradient shard, is not.
            flags = flags.to(args.device)  # NCCL reduces device tensors only
            torch.distributed.all_reduce(flags)
        nonfinite_processes, usable_pairs = flags.tolist()  # the one host synchronisation of the step
        if nonfinite_processes == 0 and usable_pairs > 0:
            self.consecutive = self.consecutive_empty = 0
            return
        if nonfinite_processes == 0:
            # Every sample of the step was unusable (all images corrupt, say): the gradients are zeros, and an
            # update from them would still move the weights through momentum and weight decay.
            for parameter in parameters:
                parameter.grad = None
            step = state.global_step + 1
            self.empty_steps += 1
            self.consecutive_empty += 1
            logger.warning(f"Step {step}: no usable pair in the step's batches; update skipped.")
            if self.max_consecutive and self.consecutive_empty >= self.max_consecutive:
                # One such step is bad luck; this many in a row is the data (or `max_image_pixels`), not luck.
                self.stop_reason = (
                    f"No batch had a usable image-caption pair for {self.consecutive_empty} optimizer steps in a row "
                    f"(to step {step}), so training stopped: every image failed to decode or every caption was empty "
                    "(the warnings above name the samples)."
                )
                self.fix = (
                    " Check the image files and captions, and `max_image_pixels`, which refuses images larger than "
                    "it; or raise `max_nonfinite_steps`."
                )
                control.should_training_stop = True
                control.should_log = True
                control.should_save = args.save_strategy != "no"
            return control
        self.consecutive_empty = 0

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
            self.fix = (
                " Lower `learning_rate` or `max_logit_scale`, add `warmup_steps`, train in bf16 rather than fp16, look "
                "for broken inputs in the data, or raise `max_nonfinite_steps`."
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
        raise NonFiniteTrainingError(self.stop_reason + where + self.fix)


def _parameters(model, optimizer) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates, or the model's: transformers 5.24 passes callbacks `optimizer=None`
    unless one was given to the Trainer (its `CallbackHandler` keeps the constructor's value)."""
    if optimizer is not None:
        return [p for group in optimizer.param_groups for p in group["params"]]
    return list(model.parameters()) if model is not None else []


# --------------------------------------------------------------------------------------------------------------
# SIGTERM and Ctrl-C
# --------------------------------------------------------------------------------------------------------------


class StoppedAtOnce(KeyboardInterrupt):
    """A second SIGINT or SIGTERM while a run waits for its step to end: it stops where it is, saving nothing."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal_number)
        self.signal_number = signal_number


class StopOnSignalCallback(TrainerCallback):
    """Saves a checkpoint and stops at the end of the current step when the process gets SIGTERM or SIGINT.

    The Trainer has no such handler: SIGTERM kills it wherever it is (often mid-save, leaving a half-written
    checkpoint) and Ctrl-C raises `KeyboardInterrupt` with a traceback and nothing saved. Here the handler only sets a
    flag; at the next step end the callback asks the Trainer to save (even with `save_strategy=no`) and to stop, and
    `on_train_end` raises [`TrainingInterrupted`] so that the caller does not take the run for a finished one. A
    second Ctrl-C (or SIGTERM) while waiting for the step to end interrupts at once, as users expect.

    Under several processes every one gets the signal from the launcher (torchrun forwards it), but not necessarily
    before the same step; they must agree on the step to save at (the save has collectives). They agree through an
    all-reduce of the flag at the steps that log, save or evaluate, which synchronise anyway, so that the other
    steps stay free of host synchronisation: the stop comes at the next such step (`logging_steps`).
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signal_number: int, frame) -> None:
        if self.received is not None:
            # A second signal of either kind stops at once: a step that never ends (a DataLoader worker that died
            # or hangs) would otherwise keep a scheduler's SIGTERM waiting for ever.
            raise StoppedAtOnce(signal_number)
        self.received = signal_number
        logger.warning(
            f"Got {signal.Signals(signal_number).name}: saving a checkpoint at the end of this step, then stopping "
            "(Ctrl-C, or the same signal again, to stop at once)."
        )

    def on_train_begin(self, args, state, control, **kwargs):
        self.received = None
        if not _is_main_thread():
            return
        for number in (signal.SIGTERM, signal.SIGINT):
            self._previous[number] = signal.signal(number, self._handle)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        received = self.received is not None
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            if not (control.should_log or control.should_save or control.should_evaluate):
                return control
            flag = torch.tensor(int(received), device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            received = bool(flag.item())
            if received and self.received is None:
                self.received = signal.SIGTERM
        if received:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}
        if self.received is None:
            return
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        name = signal.Signals(self.received).name
        raise TrainingInterrupted(
            f"Stopped by {name} at step {state.global_step}; the checkpoint is {checkpoint}. Continue with "
            "--resume_from_checkpoint true.",
            self.received,
        )


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
