"""WiSE-FT (Wortsman et al., 2022): weight-space ensembles of a pretrained and a fine-tuned model.

The weights `(1 - a) x pretrained + a x fine_tuned` keep much of what the pretrained model knew (its zero-shot and
retrieval quality elsewhere) while keeping much of the fine-tune's gain on its own data; `a = 0` is the pretrained
model, `a = 1` the fine-tuned one. The WiSE-FT repository does this for classifiers only; here it is for CLIP models,
inside a run (`wise_ft_alphas`: every `a` evaluated on every evaluation set, one chosen and saved) or as a command for
two saved models:

```bash
python -m clip_trainer.wise_ft --pretrained openai/clip-vit-base-patch32 --fine_tuned outputs/my-clip \\
    --alpha 0.5 --output_dir outputs/my-clip-wise
```

What is interpolated: every floating-point tensor of the state dict, `logit_scale` included (so the temperature is
interpolated in log space). Parameters that were frozen during fine-tuning are equal in both models and stay
unchanged (exactly, for any `a`: `(1 - a) x w + a x w` is computed in float64 and rounded back). Integer and boolean
buffers (such as position ids) are copied from the fine-tuned model. The arithmetic is float64, rounded once to the
model's dtype; `a = 0` and `a = 1` return the two models' tensors exactly.

The rule that chooses `a` in a run ([`choose_alpha`]): the best in-domain metric (on the validation split) among the
`a` whose metric on every reference set (`extra_eval_sets`) stays at least `wise_ft_min_retention` (default 90%) of
the pretrained model's. The pretrained model itself (`a = 0`) always qualifies, so the rule always has an answer; it
reads as "keep at least 90% of what the pretrained model did elsewhere, and gain as much as possible here". A mean
of in-domain and reference metrics, the other common rule, would trade a large loss elsewhere for a small gain here
whenever the numbers happen to add up.
"""

from __future__ import annotations

import argparse
import json
import logging as std_logging
import math
import os
import sys
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers.utils import logging

from .arguments import ConfigError, describe_load_error
from .checkpoints import share_saved_weights

# Named, not `__name__`: `python -m clip_trainer.wise_ft` runs this module as `__main__`.
logger = logging.get_logger("clip_trainer.wise_ft")

__all__ = ["WiseFTResult", "choose_alpha", "interpolate_state_dicts", "main", "run_wise_ft"]

WISE_FT_RESULTS_NAME = "wise_ft_results.json"
# The metric the rule compares when `metric_for_best_model` is unset or lower-is-better (a loss, a median rank).
DEFAULT_WISE_FT_METRIC = "mean_recall"


def interpolate_state_dicts(
    pretrained: dict[str, torch.Tensor], fine_tuned: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """`(1 - alpha) x pretrained + alpha x fine_tuned`, tensor by tensor.

    Floating-point tensors are interpolated in float64 and rounded once to the fine-tuned tensor's dtype; `alpha` 0
    and 1 give the pretrained and fine-tuned tensors exactly. Other tensors (integer and boolean buffers) are the
    fine-tuned model's.

    Raises:
        `ValueError`: if `alpha` is outside [0, 1], or the two state dicts do not hold the same tensors (names and
            shapes).
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"`alpha` is {alpha}; it must be in [0, 1].")
    if pretrained.keys() != fine_tuned.keys():
        missing = sorted(set(pretrained) ^ set(fine_tuned))
        raise ValueError(
            f"The two models do not have the same weights ({len(missing)} differ, e.g. {missing[0]}); WiSE-FT needs "
            "two versions of one architecture."
        )
    mixed = {}
    for name, tuned in fine_tuned.items():
        base = pretrained[name]
        if base.shape != tuned.shape:
            raise ValueError(
                f"`{name}` has shape {tuple(base.shape)} in the pretrained model and {tuple(tuned.shape)} in the "
                "fine-tuned one; WiSE-FT needs two versions of one architecture."
            )
        if not tuned.is_floating_point():
            mixed[name] = tuned.clone()
        elif alpha == 0:
            mixed[name] = base.to(device=tuned.device, dtype=tuned.dtype, copy=True)
        elif alpha == 1:
            mixed[name] = tuned.clone()
        else:
            value = (1 - alpha) * base.to(tuned.device, torch.float64) + alpha * tuned.to(torch.float64)
            mixed[name] = value.to(tuned.dtype)
    return mixed


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of `model`'s state dict (on the CPU), e.g. the pretrained weights before training."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------------------
# In a run: evaluate every alpha, choose one
# --------------------------------------------------------------------------------------------------------------


@dataclass
class WiseFTResult:
    """The WiSE-FT table of a run and the choice made from it.

    Attributes:
        metric: the metric the rule compares (`t2i_recall@10`, ...), without its `eval_` prefix.
        reference_sets: the `extra_eval_sets` names whose metric must stay at `min_retention` of the pretrained one.
        min_retention: `wise_ft_min_retention`.
        alpha: the `a` saved.
        reason: why, in a sentence (for the model card and the log).
        rows: one per evaluated `a`: `{"alpha": a, "eval_...": value, ...}`, every set's metrics.
        plot: the path of `wise_ft.png`, when drawn.
    """

    metric: str
    reference_sets: list[str]
    min_retention: float
    alpha: float
    reason: str
    rows: list[dict] = field(default_factory=list)
    plot: str | None = None

    def retention(self, row: dict, name: str) -> float | None:
        """`row`'s metric on reference set `name` as a share of the pretrained model's (`a = 0`)."""
        base = self.rows[0].get(f"eval_{name}_{self.metric}")
        value = row.get(f"eval_{name}_{self.metric}")
        if base is None or value is None or base == 0:
            return None
        return value / base


def wise_ft_metric(metric_for_best_model: str | None, greater_is_better: bool | None, set_names: list[str]) -> str:
    """The metric WiSE-FT's rule compares: `metric_for_best_model` without `eval_` and any set prefix, when greater
    is better; otherwise `mean_recall`. An `eval_ema_*` metric chose the moving average as the weights WiSE-FT starts
    from, and compares its own metric (`eval_ema_t2i_recall@10` -> `t2i_recall@10`)."""
    from .metrics import ema_metric_name

    if metric_for_best_model is None or greater_is_better is False:
        return DEFAULT_WISE_FT_METRIC
    name = ema_metric_name(metric_for_best_model) or metric_for_best_model.removeprefix("eval_")
    for set_name in sorted(set_names, key=len, reverse=True):
        if name.startswith(f"{set_name}_"):
            name = name.removeprefix(f"{set_name}_")
            break
    return DEFAULT_WISE_FT_METRIC if name.endswith(("loss", "median_rank")) else name


def choose_alpha(
    rows: list[dict], metric: str, reference_sets: list[str], min_retention: float, alpha: float | None = None
) -> tuple[float, str]:
    """The `a` to save and why: `alpha` when given; else the best in-domain `eval_{metric}` among the rows whose
    `eval_{set}_{metric}` on every reference set is at least `min_retention` x that of the row with `a = 0`. Ties go
    to the better mean reference metric, then to the smaller `a` (closer to the pretrained model).

    Args:
        rows: `{"alpha": a, "eval_...": value}` per evaluated `a`, one of them with `a = 0`.
    """
    if alpha is not None:
        return alpha, f"a = {alpha:g} was given (`wise_ft_alpha`)."
    base = next(row for row in rows if row["alpha"] == 0)

    def reference(row: dict) -> list[float]:
        return [row[f"eval_{name}_{metric}"] for name in reference_sets]

    admissible = [
        row
        for row in rows
        # With a tolerance of float rounding: 315/515 against 350/515 is exactly 90% kept, and a plain `>=` of the
        # products reads it as just below.
        if all(value >= min_retention * kept - 1e-9 for value, kept in zip(reference(row), reference(base)))
    ]
    best = max(
        admissible,
        key=lambda row: (row[f"eval_{metric}"], sum(reference(row)) / max(len(reference_sets), 1), -row["alpha"]),
    )
    chosen = best["alpha"]
    value = best[f"eval_{metric}"]
    in_domain = (
        f"in-domain {metric} ({value:.1%})" if "recall" in metric or "top" in metric else f"{metric} ({value:.4g})"
    )
    if not reference_sets:
        return chosen, f"a = {chosen:g} has the best {in_domain} (no reference set: `extra_eval_sets` is empty)."
    sets = ", ".join(reference_sets)
    return chosen, (
        f"a = {chosen:g} has the best {in_domain} among the a whose {metric} on {sets} stays at least "
        f"{min_retention:.0%} of the pretrained model's (`wise_ft_min_retention`)."
    )


def run_wise_ft(trainer, pretrained: dict[str, torch.Tensor]) -> WiseFTResult:
    """Evaluates `(1 - a) x pretrained + a x fine-tuned` for `a` in 0, `wise_ft_alphas`, `wise_ft_alpha` and 1 on every
    evaluation set of `trainer`, loads the chosen interpolation into `trainer.model`, and writes
    `wise_ft_results.json` and `wise_ft.png` into `output_dir` (main process).

    Args:
        trainer ([`CLIPContrastiveTrainer`]): after training, with the fine-tuned weights in `trainer.model` (a plain
            model: call `trainer.merge_lora()` first for a LoRA run).
        pretrained: the weights before training ([`weights_of`] the model as loaded).
    """
    from .plots import save_wise_ft_plot

    args = trainer.args
    model = trainer.model
    fine_tuned = weights_of(model)
    set_names = list(trainer.extra_eval_datasets)
    alphas = {0.0, 1.0, *map(float, args.wise_ft_alphas or [])}
    if args.wise_ft_alpha is not None:
        alphas.add(float(args.wise_ft_alpha))
    rows = []
    for alpha in sorted(alphas):
        model.load_state_dict(interpolate_state_dicts(pretrained, fine_tuned, alpha))
        metrics = trainer.evaluate_sets()
        rows.append({"alpha": alpha, **{key: value for key, value in metrics.items() if _is_metric(key)}})
        logger.info(
            f"WiSE-FT a = {alpha:g}: " + ", ".join(f"{k} {v:.4f}" for k, v in rows[-1].items() if k != "alpha")
        )
    metric = wise_ft_metric(args.metric_for_best_model, args.greater_is_better, set_names)
    keys = [f"eval_{metric}", *(f"eval_{name}_{metric}" for name in set_names)]
    if any(key not in row for row in rows for key in keys):
        logger.warning(f"WiSE-FT: not every evaluation set reports {metric}; comparing {DEFAULT_WISE_FT_METRIC}.")
        metric = DEFAULT_WISE_FT_METRIC
    chosen, reason = choose_alpha(rows, metric, set_names, args.wise_ft_min_retention, args.wise_ft_alpha)
    model.load_state_dict(interpolate_state_dicts(pretrained, fine_tuned, chosen))
    logger.info(f"WiSE-FT: saving {reason}")
    result = WiseFTResult(metric, set_names, args.wise_ft_min_retention, chosen, reason, rows)
    if args.should_save:
        os.makedirs(args.output_dir, exist_ok=True)
        result.plot = save_wise_ft_plot(result, args.output_dir)
        record = {key: value for key, value in asdict(result).items() if key != "plot"}
        with open(os.path.join(args.output_dir, WISE_FT_RESULTS_NAME), "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
    trainer.wise_ft_result = result
    return result


def _is_metric(key: str) -> bool:
    # Runtimes and throughputs differ run to run and say nothing about the weights.
    return not key.endswith(("_runtime", "_per_second", "_model_preparation_time"))


# --------------------------------------------------------------------------------------------------------------
# The command: two saved models in, one interpolated model out
# --------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clip_trainer.wise_ft",
        description="WiSE-FT: save the weights (1 - alpha) x pretrained + alpha x fine_tuned of two saved models of "
        "one architecture (every floating-point tensor, logit_scale included; integer buffers from the fine-tuned "
        "model) as a model folder with the fine-tuned model's processor.",
    )
    parser.add_argument("--pretrained", required=True, help="Hub id or folder of the model before fine-tuning.")
    parser.add_argument("--fine_tuned", required=True, help="Folder (or Hub id) of the fine-tuned model.")
    parser.add_argument(
        "--alpha", type=float, required=True, help="The weight of the fine-tuned model, in [0, 1] (0.5: the middle)."
    )
    parser.add_argument("--output_dir", required=True, help="Where to save the interpolated model and processor.")
    parser.add_argument("--cache_dir", default=None, help="Download cache for Hub models.")
    return parser


def _load(source: str, key: str, cache_dir: str | None):
    from transformers import AutoModel

    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        hint = (
            " It holds a LoRA adapter: pass the run's output_dir (the merged model) instead."
            if os.path.isfile(os.path.join(source, "adapter_config.json"))
            else ""
        )
        raise ConfigError(f"`--{key}` {source!r} is not a saved model (no config.json).{hint}")
    try:
        # trust_remote_code=False: a model that needs its own code is refused, never run, and never asked about
        # (left unset, transformers asks on the terminal, which a script cannot answer).
        return AutoModel.from_pretrained(source, cache_dir=cache_dir, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ConfigError(f"Cannot load `--{key}` {source!r}: {describe_load_error(error)}") from None


def interpolate_saved_models(
    pretrained: str, fine_tuned: str, alpha: float, output_dir: str, cache_dir: str | None = None
) -> str:
    """Loads two saved models, saves their interpolation at `alpha` (and the fine-tuned model's processor, else the
    pretrained one's) into `output_dir`; returns `output_dir`.

    Raises:
        [`ConfigError`]: for an `alpha` outside [0, 1], a folder that is not a model, or models of different shapes.
    """
    from transformers import AutoProcessor

    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and 0 <= alpha <= 1):
        raise ConfigError(f"`--alpha` is {alpha}; it must be in [0, 1] (0: the pretrained model, 1: the fine-tuned).")
    base = _load(pretrained, "pretrained", cache_dir)
    tuned = _load(fine_tuned, "fine_tuned", cache_dir)
    if type(base) is not type(tuned):
        raise ConfigError(
            f"`--pretrained` is a {type(base).__name__} and `--fine_tuned` a {type(tuned).__name__}; WiSE-FT needs "
            "two versions of one architecture."
        )
    try:
        mixed = interpolate_state_dicts(weights_of(base), weights_of(tuned), alpha)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    tuned.load_state_dict(mixed)
    tuned.save_pretrained(output_dir)
    share_saved_weights(output_dir)
    processor_from = None
    for source in (fine_tuned, pretrained):
        try:
            processor = AutoProcessor.from_pretrained(source, cache_dir=cache_dir, trust_remote_code=False)
        except (OSError, ValueError, TypeError):
            continue
        processor.save_pretrained(output_dir)
        processor_from = source
        # The files transformers.js, transformers 4.x and sentence-transformers read, as a run's output folder has.
        from .consumers import write_consumer_files
        from .modeling import max_text_positions, model_family

        length = min(max_text_positions(tuned.config), getattr(processor.tokenizer, "model_max_length", 10**6))
        write_consumer_files(output_dir, text_padding=model_family(tuned.config).text_padding, max_length=length)
        break
    else:
        logger.warning("Neither model has a processor; only the weights and config were saved.")
    interpolated = sum(tensor.is_floating_point() for tensor in mixed.values())
    copied = len(mixed) - interpolated
    logger.info(
        f"WiSE-FT: (1 - {alpha:g}) x {pretrained} + {alpha:g} x {fine_tuned}: {interpolated} tensors of a "
        f"{type(tuned).__name__} interpolated{f', {copied} integer buffers copied' if copied else ''}; processor from "
        f"{processor_from or 'neither model'}."
    )
    return output_dir


def _show_the_summary_only() -> None:
    """clip-trainer's own lines at INFO; the libraries' at warnings, without progress bars. At INFO, transformers
    alone writes some 260 lines for two small models (every config it reads, every file it writes)."""
    std_logging.basicConfig(format="%(message)s", handlers=[std_logging.StreamHandler(sys.stdout)])
    std_logging.getLogger("clip_trainer").setLevel(std_logging.INFO)
    logging.set_verbosity_warning()
    logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """`python -m clip_trainer.wise_ft`: 0 when saved, 2 for a mistake (one line, no traceback)."""
    args = build_parser().parse_args(argv)
    _show_the_summary_only()
    try:
        interpolate_saved_models(args.pretrained, args.fine_tuned, args.alpha, args.output_dir, args.cache_dir)
    except ConfigError as error:
        print(f"python -m clip_trainer.wise_ft: error: {error}", file=sys.stderr)
        return 2
    logger.info(f"Saved the WiSE-FT model at alpha {args.alpha:g} to {args.output_dir}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
