"""The metric registry: every metric an evaluation reports, with its meaning and direction, in one table.

Argument checks (`metric_for_best_model`, the names of extra evaluation sets), the training curves, the model card and
the manual's metric table all read it, so a metric is named, described and ordered in one place. It imports nothing
heavy (no torch), so that the command line can check names before torch is imported. It is re-exported by
[`clip_trainer.evaluation`], whose functions and [`RetrievalEvaluator`] compute these metrics (the trainer adds
`loss` and the readings of the model's parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "EMA_PREFIX",
    "METRICS",
    "METRICS_BY_NAME",
    "METRIC_KINDS",
    "RECALL_KS",
    "RETRIEVAL_METRIC_NAMES",
    "ZEROSHOT_KS",
    "ZEROSHOT_METRIC_NAMES",
    "HARD_NEGATIVE_METRIC_NAMES",
    "MetricInfo",
    "ema_metric_name",
    "metric_info",
    "render_metric_table",
    "split_metric_key",
]


RECALL_KS: tuple[int, ...] = (1, 5, 10)
"""The cut-offs of the recalls an evaluation reports (`t2i_recall@1`, ...)."""
ZEROSHOT_KS: tuple[int, ...] = (1, 5)
"""The cut-offs of the zero-shot accuracies an evaluation reports (`zeroshot_top1`, ...)."""
METRIC_KINDS = ("recall", "rank", "accuracy", "scalar")


@dataclass(frozen=True)
class MetricInfo:
    """
    One metric an evaluation reports, as `eval_{name}` for the validation split and `eval_{set}_{name}` for an extra
    evaluation set.

    Attributes:
        name (`str`): the key without its prefix (`t2i_recall@1`).
        label (`str`): a short title, for tables and legends (`Text-to-image recall@1`).
        description (`str`): what it measures, one sentence (the manual's metric table).
        greater_is_better (`bool` or `None`): the direction in which the model improves; `None` where there is none:
            a reading of the model's own parameters (the temperature, the bias), or the majority-class baseline.
        needs_labels (`bool`): reported only for an evaluation set with class labels (`label_column`).
        kind (`str`): `recall` or `accuracy` (a fraction in `[0, 1]`), `rank` (1 is best), or `scalar` (any number).
        parameter (`bool`): a reading of a model parameter rather than a measurement on the evaluation data.
        sigmoid_only (`bool`): reported only by a run trained with the sigmoid loss (SigLIP's `logit_bias`).
        by_evaluator (`bool`): computed by [`RetrievalEvaluator`] from the embeddings; the others (`loss` and the
            parameters) are added by the trainer, which has the loss.
        needs_hard_negatives (`bool`): reported only for an evaluation set with hard negatives
            (`hard_negative_column`).
    """

    name: str
    label: str
    description: str
    greater_is_better: bool | None
    needs_labels: bool
    kind: str
    parameter: bool = False
    sigmoid_only: bool = False
    by_evaluator: bool = True
    needs_hard_negatives: bool = False

    def __post_init__(self) -> None:
        if self.kind not in METRIC_KINDS:
            raise ValueError(f"Metric {self.name!r} has kind {self.kind!r}; kinds are {', '.join(METRIC_KINDS)}.")

    @property
    def is_fraction(self) -> bool:
        """Whether the value is a fraction in `[0, 1]` (shown as a percentage)."""
        return self.kind in ("recall", "accuracy")


_DIRECTIONS = {"t2i": "Text-to-image", "i2t": "Image-to-text"}


def _recall(direction: str, k: int) -> MetricInfo:
    best = "the best-scoring" if k == 1 else f"among the {k} best-scoring"
    description = {
        "t2i": f"fraction of captions whose image is {best} image{'s' * (k > 1)}",
        "i2t": f"fraction of images with one of their captions {best} caption{'s' * (k > 1)}",
    }[direction]
    label = f"{_DIRECTIONS[direction]} recall@{k}"
    return MetricInfo(
        f"{direction}_recall@{k}", label, description, greater_is_better=True, needs_labels=False, kind="recall"
    )


def _median_rank(direction: str) -> MetricInfo:
    queries = {"t2i": "captions", "i2t": "images"}[direction]
    return MetricInfo(
        f"{direction}_median_rank",
        f"{_DIRECTIONS[direction]} median rank",
        f"median over the {queries} of the rank of their best-scoring positive (1 = first)",
        greater_is_better=False,
        needs_labels=False,
        kind="rank",
    )


def _zeroshot_top(k: int) -> MetricInfo:
    among = "classified correctly" if k == 1 else f"whose class is among the {k} best-scoring classes"
    return MetricInfo(
        f"zeroshot_top{k}",
        f"Zero-shot top-{k} accuracy",
        f"fraction of the labelled images {among}",
        greater_is_better=True,
        needs_labels=True,
        kind="accuracy",
    )


def _registry() -> tuple[MetricInfo, ...]:
    recalls = [_recall(direction, k) for direction in _DIRECTIONS for k in RECALL_KS]
    return (
        *recalls,
        MetricInfo(
            "mean_recall",
            "Mean recall",
            f"mean of the {len(recalls)} recalls above",
            greater_is_better=True,
            needs_labels=False,
            kind="recall",
        ),
        *(_median_rank(direction) for direction in _DIRECTIONS),
        *(_zeroshot_top(k) for k in ZEROSHOT_KS),
        MetricInfo(
            "zeroshot_balanced_accuracy",
            "Zero-shot balanced accuracy (mean per-class recall)",
            "mean over the classes present of the fraction of each class's images classified correctly",
            greater_is_better=True,
            needs_labels=True,
            kind="accuracy",
        ),
        MetricInfo(
            "zeroshot_majority_baseline",
            "Zero-shot majority-class baseline (top-1)",
            "top-1 accuracy of always answering the most frequent class, which top-1 has to beat (a property of the "
            "labels, not of the model)",
            greater_is_better=None,
            needs_labels=True,
            kind="accuracy",
        ),
        MetricInfo(
            "hard_negative_accuracy",
            "Hard-negative accuracy",
            "fraction of the pairs with hard negatives (`hard_negative_column`) whose image scores its caption above "
            "every one of the pair's hard negatives",
            greater_is_better=True,
            needs_labels=False,
            kind="accuracy",
            needs_hard_negatives=True,
        ),
        MetricInfo(
            "loss",
            "Contrastive loss",
            "the training loss over the evaluation set's batches",
            greater_is_better=False,
            needs_labels=False,
            kind="scalar",
            by_evaluator=False,
        ),
        MetricInfo(
            "inverse_temperature",
            "Inverse temperature",
            "the inverse temperature `t = exp(logit_scale)` (logits are `t x cosine`)",
            greater_is_better=None,
            needs_labels=False,
            kind="scalar",
            parameter=True,
            by_evaluator=False,
        ),
        MetricInfo(
            "temperature",
            "Temperature",
            "the temperature `1/t`",
            greater_is_better=None,
            needs_labels=False,
            kind="scalar",
            parameter=True,
            by_evaluator=False,
        ),
        MetricInfo(
            "logit_bias",
            "Logit bias",
            "SigLIP's learned bias `b` (logits are `t x cosine + b`)",
            greater_is_better=None,
            needs_labels=False,
            kind="scalar",
            parameter=True,
            sigmoid_only=True,
            by_evaluator=False,
        ),
    )


METRICS: tuple[MetricInfo, ...] = _registry()
"""Every metric an evaluation reports, in the order tables list them: the one list that argument checks, the curves,
the model card and the manual read."""
METRICS_BY_NAME: dict[str, MetricInfo] = {metric.name: metric for metric in METRICS}
RETRIEVAL_METRIC_NAMES: tuple[str, ...] = tuple(
    m.name for m in METRICS if m.by_evaluator and not m.needs_labels and not m.needs_hard_negatives
)
"""The keys [`retrieval_metrics`] returns with its default `ks`; the trainer logs them with an `eval_` prefix."""
HARD_NEGATIVE_METRIC_NAMES: tuple[str, ...] = tuple(m.name for m in METRICS if m.needs_hard_negatives)
"""The keys reported for an evaluation set with hard negatives ([`hard_negative_accuracy`])."""
ZEROSHOT_METRIC_NAMES: tuple[str, ...] = tuple(m.name for m in METRICS if m.by_evaluator and m.needs_labels)
"""The keys [`zeroshot_accuracy`] returns with its default `ks`."""


def metric_info(name: str) -> MetricInfo | None:
    """The registry's entry of a metric name without prefix (`t2i_recall@1`), or `None` for another key."""
    return METRICS_BY_NAME.get(name)


def split_metric_key(key: str, prefix: str = "eval") -> tuple[str | None, MetricInfo] | None:
    """
    Reads a logged key: `eval_t2i_recall@1` -> `(None, t2i_recall@1)`, `eval_ref_t2i_recall@1` -> `("ref", ...)`.

    Args:
        key (`str`): a key of an evaluation's metrics.
        prefix (`str`, *optional*, defaults to `"eval"`): the metric key prefix.

    Returns:
        `(set name or None for the validation split, MetricInfo)`, or `None` when the key names no registered metric
        (`eval_runtime`, `learning_rate`, ...). The longest matching metric name wins, so `eval_inverse_temperature`
        is the validation split's `inverse_temperature`, not a set `inverse`'s `temperature` (set names that would
        read so are refused when the sets are given).
    """
    if not key.startswith(f"{prefix}_"):
        return None
    rest = key[len(prefix) + 1 :]
    for name in sorted(METRICS_BY_NAME, key=len, reverse=True):
        if rest == name:
            return None, METRICS_BY_NAME[name]
        if rest.endswith(f"_{name}") and len(rest) > len(name) + 1:
            return rest[: -len(name) - 1], METRICS_BY_NAME[name]
    return None


EMA_PREFIX = "ema"
"""With `ema_decay`, each evaluation also scores the moving average of the weights on the validation split and reports
its metrics as `eval_ema_{name}` (`eval_ema_mean_recall`), the way an extra evaluation set reports `eval_{set}_{name}`:
[`split_metric_key`] reads them as the set `ema`, and no extra evaluation set may take that name."""


def ema_metric_name(key: str | None) -> str | None:
    """
    The metric of the EMA's evaluation that `key` names: `eval_ema_mean_recall` (or `ema_mean_recall`) ->
    `mean_recall`; `None` for any other key (the weights' own `eval_mean_recall`, an extra set's metric).

    A `metric_for_best_model` for which this is not `None` chooses the EMA weights as the model saved at the end.
    """
    rest = (key or "").removeprefix("eval_")
    if not rest.startswith(f"{EMA_PREFIX}_"):
        return None
    name = rest.removeprefix(f"{EMA_PREFIX}_")
    return name if name in METRICS_BY_NAME else None


def render_metric_table() -> str:
    """The manual's metric table (docs/evaluation.md), one row per metric of [`METRICS`]."""

    def better(metric: MetricInfo) -> str:
        return {True: "higher", False: "lower", None: "–"}[metric.greater_is_better]

    def reported(metric: MetricInfo) -> str:
        if metric.needs_labels:
            return "with `label_column`"
        if metric.sigmoid_only:
            return "sigmoid loss only"
        if metric.needs_hard_negatives:
            return "with `hard_negative_column`"
        return "always"

    lines = ["| key | definition | better | reported |", "|---|---|---|---|"]
    for metric in METRICS:
        lines.append(f"| `eval_{metric.name}` | {metric.description} | {better(metric)} | {reported(metric)} |")
    return "\n".join(lines)
