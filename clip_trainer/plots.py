"""Training curves drawn from `trainer.state.log_history`, for the output folder and the model card.

The Trainer logs to TensorBoard or W&B, but a pushed model has neither: a PNG next to the weights is what a reader of
the Hub page sees. Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas, never through `pyplot`, so
that nothing touches a global figure registry or needs a display, and plotting is safe inside a training process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["TRAINING_CURVES_FILENAME", "save_training_plots"]

TRAINING_CURVES_FILENAME = "training_curves.png"

# Keys the Trainer writes into the final summary entry; they are run-level figures, not points of a curve.
_SUMMARY_KEYS = ("train_runtime", "train_loss", "train_samples_per_second", "train_steps_per_second", "total_flos")

Series = tuple[list[float], list[float]]


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


def _recall_sort_key(key: str) -> tuple[str, int, str]:
    # eval_t2i_recall@5 -> ("t2i", 5): directions stay together and cut-offs run in numeric order, not "1, 10, 5".
    name = key.removeprefix("eval_")
    prefix, _, cutoff = name.partition("@")
    return (prefix, int(cutoff) if cutoff.isdigit() else 0, name)


def _panels(log_history: list[dict]) -> list[tuple[str, str, dict[str, Series]]]:
    """(title, y label, {legend label: (steps, values)}) for each panel that has at least one point."""
    keys = _keys(log_history)
    panels: list[tuple[str, str, dict[str, Series]]] = [
        ("Loss", "loss", {"train": _series(log_history, "loss"), "eval": _series(log_history, "eval_loss")}),
        (
            "Retrieval recall",
            "recall (%)",
            {
                key.removeprefix("eval_"): _series(log_history, key, scale=100.0)
                for key in sorted((k for k in keys if k.startswith("eval_") and "recall" in k), key=_recall_sort_key)
            },
        ),
        (
            "Zero-shot accuracy",
            "accuracy (%)",
            {
                key.removeprefix("eval_"): _series(log_history, key, scale=100.0)
                for key in sorted(k for k in keys if k.startswith("eval_zeroshot_top"))
            },
        ),
        ("Learning rate", "learning rate", {"learning_rate": _series(log_history, "learning_rate")}),
    ]
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
    `eval_*recall*` key, in percent), zero-shot accuracy (`eval_zeroshot_top*`, in percent), learning rate, and
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
    figure = Figure(figsize=(6.0 * columns, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    for position, (title, ylabel, curves) in enumerate(panels, start=1):
        axes = figure.add_subplot(rows, columns, position)
        for label, (steps, values) in curves.items():
            # A single point (one evaluation) draws no line; a marker keeps it visible. The mean of the recalls is
            # dashed so that it does not read as one more direction and cut-off.
            axes.plot(
                steps,
                values,
                label=label,
                marker="o" if len(steps) < 20 else None,
                markersize=3,
                linestyle="--" if label.startswith("mean_") else "-",
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
