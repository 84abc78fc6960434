"""Evaluation through the command: eval-only runs, zero-shot from a label column, metric-driven checkpoints, pipeline."""

from __future__ import annotations

import json

from conftest import draw_shape
from transformers import pipeline

from clip_trainer.evaluation import RETRIEVAL_METRIC_NAMES, ZEROSHOT_METRIC_NAMES
from clip_trainer.run import main


def test_eval_only_run_measures_the_given_model(base_args, tmp_path, tiny_clip_dir):
    out = tmp_path / "out"
    results = main([*base_args, "--do_eval", "--label_column", "shape"])
    written = json.loads((out / "eval_results.json").read_text())
    assert written == {key: value for key, value in results.items() if key in written}
    for name in (*RETRIEVAL_METRIC_NAMES, *ZEROSHOT_METRIC_NAMES, "loss"):
        assert f"eval_{name}" in written
    assert not (out / "model.safetensors").exists()  # nothing was trained
    assert not (out / "train_results.json").exists()


def test_zero_shot_and_recall_drive_the_best_checkpoint(base_args, tmp_path):
    out = tmp_path / "out"
    main([*base_args, "--num_train_epochs", "3", "--label_column", "shape", "--eval_strategy", "epoch",
          "--save_strategy", "epoch", "--load_best_model_at_end", "true",
          "--metric_for_best_model", "eval_t2i_recall@5", "--eval_on_start", "true"])  # fmt: skip
    state = json.loads((out / "trainer_state.json").read_text())
    evaluations = [entry for entry in state["log_history"] if "eval_t2i_recall@5" in entry]
    assert evaluations[0]["step"] == 0  # the baseline before training
    assert all(0 <= entry["eval_zeroshot_top1"] <= entry["eval_zeroshot_top5"] <= 1 for entry in evaluations)
    best = max(entry["eval_t2i_recall@5"] for entry in evaluations[1:])
    assert state["best_metric"] == best


def test_saved_model_works_in_the_zero_shot_pipeline(base_args, tmp_path):
    out = tmp_path / "out"
    main([*base_args, "--max_steps", "2"])
    classifier = pipeline("zero-shot-image-classification", model=str(out))
    predictions = classifier(
        draw_shape("red", "circle"), candidate_labels=["a red circle", "a blue square"], hypothesis_template="{}"
    )
    assert {p["label"] for p in predictions} == {"a red circle", "a blue square"}
    assert abs(sum(p["score"] for p in predictions) - 1) < 1e-4
