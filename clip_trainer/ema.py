"""An exponential moving average (EMA) of a run's trainable weights (`ema_decay`).

- **What is averaged.** The parameters that can train in the run (`ema_parameter_names`): with LoRA the adapters,
  with partial locking the layers that are not locked, with a tower frozen until `unfreeze_after_steps` its weights
  too (they stay constant until then, so their average is exact); weights that never train need no average. The
  average is kept in float32 on the parameters' device, whatever their dtype.
- **When.** After every optimizer step (`on_optimizer_step`, after the clamp of the temperature), on the device with
  no host synchronisation: `ema = d x ema + (1 - d) x weights`, starting from the weights training starts from. A step
  whose update the non-finite guard skipped counts too (the weights did not move, the average moves towards them), as
  it counts for the learning-rate schedule. Every process of a `torchrun` run holds the same average: DDP keeps the
  weights equal, and every process averages them alike.
- **Checkpoints.** `ema.safetensors` in every `checkpoint-N` (written with the weights, before the optimizer state and
  `trainer_state.json`), loaded back exactly on resume; a resume with another `ema_decay` (or none) is refused.
- **Evaluation.** Each evaluation scores the average on the validation split beside the weights, in the same round:
  `eval_ema_{metric}` (see [`clip_trainer.metrics.EMA_PREFIX`]). The average is copied into the model for that and
  the weights copied back bit for bit.
- **What is saved.** When `metric_for_best_model` is an `eval_ema_*` metric, the average is the model saved at the end
  (with `load_best_model_at_end`, the average of the best checkpoint, the one chosen by that metric); otherwise the
  weights themselves are. That choice comes first; a LoRA merge and WiSE-FT then work on the weights chosen.

Why not `torch.optim.swa_utils.AveragedModel`: it copies the whole module (frozen weights too) in the model's dtype, and
reads its update count on the host at every step. Its update rule, `get_ema_multi_avg_fn`, is what is used here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn
from transformers import TrainerCallback
from transformers.utils import logging

from .checkpoints import EMA_WEIGHTS_NAME, UNKNOWN, saved_training_argument
from .errors import ConfigError
from .metrics import ema_metric_name

logger = logging.get_logger(__name__)

__all__ = ["EMA_WEIGHTS_NAME", "EMACallback", "ExponentialMovingAverage", "ema_parameter_names", "ema_resume_problem"]

# The safetensors metadata key that records the decay an average was kept with.
_DECAY_KEY = "ema_decay"


def ema_parameter_names(model: nn.Module, policy=None) -> list[str]:
    """The names (in `model.named_parameters()`) of the parameters the EMA averages: those that can train at some
    step of the run. A parameter qualifies when it requires a gradient now (LoRA's base weights and a `logit_bias` the
    softmax loss leaves out do not) and the trainable-parameter policy lets it train at the start or once its tower
    unfreezes.

    Args:
        model: the model as the trainer holds it (a peft `PeftModel` for LoRA).
        policy ([`TrainableParameters`], *optional*): the run's policy; `None`: every parameter that requires a
            gradient.
    """
    steps = [0]
    if policy is not None and policy.unfreeze_after_steps is not None:
        steps.append(policy.unfreeze_after_steps)
    return [
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and (policy is None or any(policy.trains(name, step) for step in steps))
    ]


class ExponentialMovingAverage:
    """float32 moving averages of some parameters of a model, updated in place on their device.

    Args:
        named_parameters: `(name, parameter)` pairs to average; the averages start at their current values.
        decay (`float`): `d` in `ema = d x ema + (1 - d) x weights`, in (0, 1).
    """

    def __init__(self, named_parameters: list[tuple[str, nn.Parameter]], decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"`decay` is {decay}; it must be in (0, 1).")
        self.decay = decay
        self.names = [name for name, _ in named_parameters]
        self.parameters = [parameter for _, parameter in named_parameters]
        self.averages = [parameter.detach().to(torch.float32, copy=True) for parameter in self.parameters]
        self._update = get_ema_multi_avg_fn(decay)

    def update(self) -> None:
        """One step of the average towards the parameters' current values (no host synchronisation)."""
        if not self.averages:
            return
        # `lerp` needs one dtype: float32 parameters are used as they are, others are read as float32.
        current = [parameter.detach().to(torch.float32) for parameter in self.parameters]
        self._update(self.averages, current, None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages by parameter name (the tensors themselves, on their device)."""
        return dict(zip(self.names, self.averages))

    def load_state_dict(self, averages: dict[str, torch.Tensor], source: str = "the given averages") -> None:
        """Replaces the averages by `averages` (exactly: copied, not recomputed).

        Raises:
            [`ConfigError`]: when `averages` does not hold exactly this run's averaged parameters, in their shapes.
        """
        if set(averages) != set(self.names):
            differ = sorted(set(averages) ^ set(self.names))
            raise ConfigError(
                f"{source} averages other weights than this run trains ({len(differ)} differ, e.g. {differ[0]}): "
                "resume with the settings that decide which weights train (LoRA, locking, freezing) unchanged."
            )
        for name, average in zip(self.names, self.averages):
            value = averages[name]
            if value.shape != average.shape:
                raise ConfigError(
                    f"{source} has `{name}` of shape {tuple(value.shape)}, and this model's is {tuple(average.shape)}."
                )
            average.copy_(value.to(average.device, torch.float32))

    def save(self, path: str) -> None:
        """Writes the averages to the safetensors file `path`, with the decay in its metadata, under a temporary name
        renamed once complete (a kill mid-write leaves no half file under the real name)."""
        from safetensors.torch import save_file

        tensors = {name: average.detach().to("cpu").contiguous() for name, average in self.state_dict().items()}
        save_file(tensors, path + ".tmp", metadata={_DECAY_KEY: repr(self.decay)})
        os.replace(path + ".tmp", path)

    def load(self, path: str) -> None:
        """Loads the averages saved by [`save`] in `path`."""
        from safetensors.torch import load_file

        self.load_state_dict(load_file(path), source=path)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Writes the averages into the parameters (rounded to their dtype), for good."""
        for parameter, average in zip(self.parameters, self.averages):
            parameter.copy_(average)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averages in the parameters inside the block; the parameters' own values back, bit for bit, after it,
        whatever happens inside."""
        with torch.no_grad():
            kept = [parameter.detach().clone() for parameter in self.parameters]
            try:
                self.copy_to_model()
                yield
            finally:
                for parameter, value in zip(self.parameters, kept):
                    parameter.copy_(value)


def _saved_decay(path: str) -> float | None:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        value = (handle.metadata() or {}).get(_DECAY_KEY)
    return float(value) if value is not None else None


def ema_resume_problem(checkpoint: str, decay: float | None) -> str | None:
    """Why a run with `ema_decay` `decay` cannot resume from `checkpoint`'s average, or `None` when it can: the
    checkpoint must hold an average exactly when the run keeps one, kept with the same decay (an average of another
    decay, continued with this one, is neither)."""
    path = os.path.join(checkpoint, EMA_WEIGHTS_NAME)
    fix = (
        "Resume with the same `ema_decay`, or start a new run from the checkpoint's weights (`model_name_or_path` "
        "pointing at it)."
    )
    if not os.path.isfile(path):
        kept = saved_training_argument(checkpoint, _DECAY_KEY)
        if kept is not None and kept is not UNKNOWN:
            # The run kept an average, and its file is gone (deleted or lost since): not a run without one.
            return (
                f"{checkpoint} is incomplete: its moving average ({EMA_WEIGHTS_NAME}) is missing, and the run that "
                f"wrote it kept one (`ema_decay` {kept:g}). Resume from an earlier checkpoint, or pass "
                "--resume_from_checkpoint true to take the newest complete one."
            )
        if decay is None:
            return None
        return (
            f"{checkpoint} has no moving average ({EMA_WEIGHTS_NAME}; it was trained without `ema_decay`), and this "
            f"run sets `ema_decay` {decay:g}. {fix}"
        )
    before = _saved_decay(path)
    if decay is not None and before == decay:
        return None
    now = f"{decay:g}" if decay is not None else "none"
    was = f"{before:g}" if before is not None else "an unknown value"
    return f"{checkpoint} was trained with `ema_decay` {was}, and this run sets {now}. {fix}"


class EMACallback(TrainerCallback):
    """Keeps a [`ExponentialMovingAverage`] of the trainer's model: built when training begins (loaded from the
    checkpoint a run resumes from, [`resume_from`]), updated after every optimizer step.

    Args:
        decay (`float`): `ema_decay`.
        names (`list[str]`): the parameters to average ([`ema_parameter_names`]).

    Attributes:
        ema ([`ExponentialMovingAverage`] or `None`): the average while the run trains and until the weights to save
            are chosen ([`choose_saved_weights`]); `None` before and after.
        resume_from (`str` or `None`): a checkpoint whose `ema.safetensors` the next `on_train_begin` loads.
        saved_weights (`str` or `None`): after [`choose_saved_weights`], a sentence for the model card saying which
            weights were saved.
    """

    def __init__(self, decay: float, names: list[str]) -> None:
        self.decay = decay
        self.names = list(names)
        self.ema: ExponentialMovingAverage | None = None
        self.resume_from: str | None = None
        self.saved_weights: str | None = None

    def build(self, model: nn.Module) -> ExponentialMovingAverage:
        """A new average of `model`'s averaged parameters, starting at their current values."""
        parameters = dict(model.named_parameters())  # the trainer's model, as `ema_parameter_names` read it
        return ExponentialMovingAverage([(name, parameters[name]) for name in self.names], self.decay)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.ema = self.build(model)
        if self.resume_from is not None:
            self.ema.load(os.path.join(self.resume_from, EMA_WEIGHTS_NAME))
            logger.info(f"Moving average of the weights loaded from {self.resume_from}.")
        self.resume_from = None
        self.saved_weights = None

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.ema is not None:
            self.ema.update()

    def save(self, folder: str) -> None:
        """Writes the average into `folder` (a checkpoint) while the run keeps one."""
        if self.ema is not None:
            self.ema.save(os.path.join(folder, EMA_WEIGHTS_NAME))

    def choose_saved_weights(
        self, model: nn.Module, metric_for_best_model: str | None, best_checkpoint: str | None, checkpoint: str | None
    ) -> bool:
        """After training: puts the average into `model` when `metric_for_best_model` is an `eval_ema_*` metric, and
        ends the average (the model is now what is saved, evaluated and interpolated). Returns whether it did.

        Args:
            best_checkpoint: the checkpoint `load_best_model_at_end` loaded back, whose average is then the one
                saved (it is the one chosen by the `eval_ema_*` metric).
            checkpoint: the checkpoint whose average to use when this call trained nothing (a run resumed at its
                end), and there is no best checkpoint.
        """
        metric = ema_metric_name(metric_for_best_model)
        ema, self.ema = self.ema, None
        if metric is None:
            self.saved_weights = (
                f"These are the trained weights themselves: the exponential moving average of them (decay "
                f"{self.decay:g}) was evaluated beside them (`eval_ema_*`), and `metric_for_best_model` "
                f"(`{metric_for_best_model or 'unset'}`) is not one of its metrics, so it was not saved."
            )
            return False
        source = best_checkpoint or (checkpoint if ema is None else None)
        if ema is None or source is not None:
            ema = self.build(model)
            if source is None:
                raise ConfigError("No moving average of the weights to save: this run trained nothing.")
            ema.load(os.path.join(source, EMA_WEIGHTS_NAME))
        ema.copy_to_model()
        where = f" of {os.path.basename(os.path.normpath(source))}" if best_checkpoint else ""
        self.saved_weights = (
            f"These are the exponential moving average (decay {self.decay:g}) of the trained weights{where}, not the "
            f"weights themselves: `metric_for_best_model` is `eval_ema_{metric}`, the average's {metric}."
        )
        logger.info(f"Saving the moving average of the weights{where} (`metric_for_best_model` eval_ema_{metric}).")
        return True
