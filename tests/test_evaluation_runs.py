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


def test_an_evaluation_does_not_write_into_a_models_folder(base_args, tmp_path, tiny_clip_dir, monkeypatch):
    """The folder of a saved model as an evaluation's `output_dir` (another model's, or the evaluated model's own):
    refused before anything is read or written, since the run would replace its tokenizer, processor and results."""
    import shutil

    import pytest

    from clip_trainer.arguments import ConfigError

    monkeypatch.chdir(tmp_path)
    trained = tmp_path / "trained"
    shutil.copytree(tiny_clip_dir, trained)
    before = {path.name: path.stat().st_mtime_ns for path in trained.iterdir()}
    argv = list(base_args)
    argv[argv.index("--output_dir") + 1] = "trained"
    for model in (str(tiny_clip_dir), "trained"):
        argv[argv.index("--model_name_or_path") + 1] = model
        with pytest.raises(
            ConfigError, match=r"`output_dir` 'trained' holds a saved model.*--output_dir trained-eval"
        ):
            main([*argv, "--do_eval"])
    assert {path.name: path.stat().st_mtime_ns for path in trained.iterdir()} == before

    # Its own folder beside it: evaluated.
    argv[argv.index("--output_dir") + 1] = "trained-eval"
    results = main([*argv, "--do_eval"])
    assert (tmp_path / "trained-eval" / "eval_results.json").is_file() and "eval_t2i_recall@1" in results

    # Asked for: into the model's own folder.
    argv[argv.index("--output_dir") + 1] = "trained"
    main([*argv, "--do_eval", "--overwrite_output_dir", "true"])
    assert (trained / "eval_results.json").is_file()
