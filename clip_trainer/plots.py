"""Training curves drawn from `trainer.state.log_history`, for the output folder and the model card.

The Trainer logs to TensorBoard or W&B, but a pushed model has neither: a PNG next to the weights is what a reader of
the Hub page sees. Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas, never through `pyplot`, so
that nothing touches a global figure registry or needs a display, and plotting is safe inside a training process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

from transformers.utils import logging

from .metrics import METRICS, METRICS_BY_NAME, MetricInfo, split_metric_key

logger = logging.get_logger(__name__)

__all__ = ["TRAINING_CURVES_FILENAME", "WISE_FT_PLOT_NAME", "save_training_plots", "save_wise_ft_plot"]

TRAINING_CURVES_FILENAME = "training_curves.png"
WISE_FT_PLOT_NAME = "wise_ft.png"

# Keys the Trainer writes into the final summary entry; they are run-level figures, not points of a curve.
_SUMMARY_KEYS = ("train_runtime", "train_loss", "train_samples_per_second", "train_steps_per_second", "total_flos")

Series = tuple[list[float], list[float]]


def _matplotlib():
    """matplotlib's `Figure` and Agg canvas, imported when a figure is drawn: importing matplotlib takes a few tenths
    of a second that a run (and `import clip_trainer.trainer`) should not pay before it draws anything."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


def _as_number(value: object) -> float | None:
    # Logs hold floats, but a callback may log a 0-d tensor or a string; only real numbers become points.
    if isinstance(value, bool):
        return None
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (TypeError, ValueError, RuntimeError):
            return None
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _series(log_history: list[dict], key: str, scale: float = 1.0) -> Series:
    steps: list[float] = []
    values: list[float] = []
    for index, entry in enumerate(log_history):
        if key not in entry or any(summary in entry for summary in _SUMMARY_KEYS):
            continue
        value = _as_number(entry[key])
        if value is None:
            continue
        # An entry without a step (a hand-made history) still gets a place on the axis: its position.
        step = _as_number(entry.get("step"))
        steps.append(step if step is not None else float(index))
        values.append(value * scale)
    return steps, values


def _keys(log_history: Iterable[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for entry in log_history:
        for key in entry:
            seen.setdefault(key, None)
    return list(seen)


def _validation_metric(key: str) -> MetricInfo | None:
    # `eval_t2i_recall@1` is the validation split's; `eval_{set}_t2i_recall@1` is an extra evaluation set's.
    split = split_metric_key(key)
    return split[1] if split is not None and split[0] is None else None


def _metric_order(key: str) -> int:
    # The registry's order: directions together, cut-offs in numeric order (not "1, 10, 5").
    return METRICS.index(METRICS_BY_NAME[key.removeprefix("eval_")])


def _set_names(keys: list[str]) -> list[str]:
    """The extra evaluation sets of a history, from their `eval_{set}_{metric}` keys, in order of appearance."""
    return list(dict.fromkeys(split[0] for key in keys if (split := split_metric_key(key)) and split[0] is not None))


def _panels(log_history: list[dict]) -> list[tuple[str, str, dict[str, Series]]]:
    """(title, y label, {legend label: (steps, values)}) for each panel that has at least one point."""
    keys = _keys(log_history)
    sets = _set_names(keys)
    validation = {key: info for key in keys if (info := _validation_metric(key)) is not None}
    recall_keys = [key for key, info in validation.items() if info.kind == "recall"]
    # Top-k, balanced accuracy and the majority-class baseline: a top-1 means little without the baseline beside it.
    zeroshot_keys = [key for key, info in validation.items() if info.needs_labels]
    # One curve per extra set: its mean recall, and its zero-shot top-1 when it has labels.
    per_set = {"validation": _series(log_history, "eval_mean_recall", scale=100.0)}
    per_set.update({name: _series(log_history, f"eval_{name}_mean_recall", scale=100.0) for name in sets})
    zeroshot_per_set = {
        f"{name} zeroshot_top1": _series(log_history, f"eval_{name}_zeroshot_top1", scale=100.0) for name in sets
    }
    panels: list[tuple[str, str, dict[str, Series]]] = [
        ("Loss", "loss", {"train": _series(log_history, "loss"), "eval": _series(log_history, "eval_loss")}),
        (
            "Retrieval recall",
            "recall (%)",
            {
                key.removeprefix("eval_"): _series(log_history, key, scale=100.0)
                for key in sorted(recall_keys, key=_metric_order)
            },
        ),
        (
            "Zero-shot accuracy",
            "accuracy (%)",
            {
                **{
                    key.removeprefix("eval_"): _series(log_history, key, scale=100.0)
                    for key in sorted(zeroshot_keys, key=_metric_order)
                },
                **zeroshot_per_set,
            },
        ),
        ("Learning rate", "learning rate", {"learning_rate": _series(log_history, "learning_rate")}),
    ]
    if sets:
        panels.insert(2, ("Mean recall per evaluation set", "mean recall (%)", per_set))
    # The temperature, 1 / exp(logit_scale): the trainer also logs its inverse, which would say the same again.
    panels.append(("Temperature", "temperature", {"temperature": _series(log_history, "temperature")}))
    return [
        (title, ylabel, {label: series for label, series in curves.items() if series[0]})
        for title, ylabel, curves in panels
        if any(series[0] for series in curves.values())
    ]


def save_training_plots(log_history: list[dict], output_dir: str) -> list[str]:
    """
    Draws the training curves of a run into one PNG in `output_dir`.

    Panels, each drawn only when the history has points for it: loss (train and eval), retrieval recall (every
    `eval_*recall*` key, in percent), zero-shot accuracy (`eval_zeroshot_*`: top-k, balanced accuracy and the
    majority-class baseline, in percent), learning rate, and
    temperature (`temperature`). The x axis is the optimizer step.

    Args:
        log_history (`list[dict]`):
            `trainer.state.log_history`: train entries (`loss`, `learning_rate`, `grad_norm`, `step`, ...), eval
            entries (`eval_loss`, `eval_t2i_recall@1`, ...) and the final summary (`train_runtime`, ...), which is
            skipped. Values that are not finite numbers are skipped too.
        output_dir (`str`):
            Folder to write into; created if missing.

    Returns:
        `list[str]`: the absolute paths written, `[]` when the history has nothing to draw (no file is written then, so a model
        card never links an empty image).
    """
    panels = _panels(list(log_history or []))
    if not panels:
        logger.info("No loss, recall, learning rate or temperature in the log history; no training curves drawn.")
        return []

    columns = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / columns)
    Figure, FigureCanvasAgg = _matplotlib()
    figure = Figure(figsize=(6.0 * columns, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    for position, (title, ylabel, curves) in enumerate(panels, start=1):
        axes = figure.add_subplot(rows, columns, position)
        for label, (steps, values) in curves.items():
            # A single point (one evaluation) draws no line; a marker keeps it visible. The mean of the recalls is
            # dashed so that it does not read as one more direction and cut-off, and so is the zero-shot baseline,
            # which is no result of the model.
            axes.plot(
                steps,
                values,
                label=label,
                marker="o" if len(steps) < 20 else None,
                markersize=3,
                linestyle="--" if label.startswith("mean_") or label.endswith("_baseline") else "-",
            )
        if title == "Learning rate":
            axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.set_ylabel(ylabel)
        axes.grid(True, alpha=0.3)
        if len(curves) > 1:
            axes.legend(fontsize="small")

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.abspath(os.path.join(output_dir, TRAINING_CURVES_FILENAME))
    figure.savefig(path, dpi=100)
    return [path]


def save_wise_ft_plot(result, output_dir: str) -> str | None:
    """
    Draws WiSE-FT's trade-off into `output_dir/wise_ft.png`: the in-domain (validation) metric on the x axis against
    each reference set's metric on the y axis, one curve per set through the evaluated `a`, each point labelled
    with its `a` and the saved one circled.

    Args:
        result ([`clip_trainer.wise_ft.WiseFTResult`]): the table (`rows`), `metric`, `reference_sets` and `alpha`.

    Returns:
        `str`: the absolute path written, or `None` when the table has no reference set to draw.
    """
    if not result.reference_sets or not result.rows:
        return None
    Figure, FigureCanvasAgg = _matplotlib()
    figure = Figure(figsize=(5.5, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    # Fractions (recalls, accuracies) in percent, other metrics as they are.
    info = METRICS_BY_NAME.get(result.metric)
    scale, unit = (100.0, " (%)") if info is None or info.is_fraction else (1.0, "")
    x = [scale * row[f"eval_{result.metric}"] for row in result.rows]
    for name in result.reference_sets:
        y = [scale * row[f"eval_{name}_{result.metric}"] for row in result.rows]
        (line,) = axes.plot(x, y, marker="o", markersize=4, label=name)
        for row, px, py in zip(result.rows, x, y):
            axes.annotate(f"{row['alpha']:g}", (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7)
            if row["alpha"] == result.alpha:
                axes.plot([px], [py], marker="o", markersize=11, fillstyle="none", color=line.get_color())
    axes.set_title(f"WiSE-FT: {result.metric}, a = 0 (pretrained) to 1 (fine-tuned)", fontsize="medium")
    axes.set_xlabel(f"in-domain {result.metric}{unit}")
    axes.set_ylabel(f"reference {result.metric}{unit}")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small", title="reference set", title_fontsize="small")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.abspath(os.path.join(output_dir, WISE_FT_PLOT_NAME))
    figure.savefig(path, dpi=80)
    return path
