"""Several evaluation sets in one run (`extra_eval_sets`): names, values, one round per evaluation, selection."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import write_shapes_csv

from clip_trainer.arguments import ConfigError
from clip_trainer.command_line import parse_arguments
from clip_trainer.evaluation import RETRIEVAL_METRIC_NAMES, ZEROSHOT_METRIC_NAMES
from clip_trainer.run import main

QUIET = ["--report_to", "none", "--dataloader_num_workers", "0", "--use_cpu", "true"]
PER_SET_METRICS = ("loss", "inverse_temperature", *RETRIEVAL_METRIC_NAMES)


def colour_csv(folder: Path) -> Path:
    """A set with its own column names (`picture`, `text`) and label column (`colour`)."""
    source = write_shapes_csv(folder, repeats=1, name="source.csv")
    path = folder / "colours.csv"
    with source.open() as handle, path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["picture", "text", "colour"])
        for row in csv.DictReader(handle):
            writer.writerow([row["image"], row["caption"], row["caption"].split()[1]])
    source.unlink()
    return path


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sets")
    return {
        "main": write_shapes_csv(root / "main", repeats=1),
        "shapes": write_shapes_csv(root / "shapes", repeats=2),
        "colours": colour_csv(root / "colours"),
    }


def evaluate(model_dir: Path, validation: str, out: Path, *extra: str) -> dict[str, float]:
    main(["--model_name_or_path", str(model_dir), "--validation_file", validation, "--do_eval",
          "--output_dir", str(out), "--per_device_eval_batch_size", "16", *QUIET, *extra])  # fmt: skip
    return json.loads((out / "eval_results.json").read_text())


def test_two_extra_sets_report_what_a_run_on_each_set_reports(tiny_clip_dir, sets, tmp_path):
    extra = {
        "shapes": {"path": str(sets["shapes"]), "label_column": "shape"},
        "colours": {"validation_file": str(sets["colours"]), "image_column": "picture", "caption_column": "text",
                    "label_column": "colour"},
    }  # fmt: skip
    together = evaluate(
        tiny_clip_dir, str(sets["main"]), tmp_path / "together", "--extra_eval_sets", json.dumps(extra)
    )
    alone = {
        "shapes": evaluate(tiny_clip_dir, str(sets["shapes"]), tmp_path / "shapes", "--label_column", "shape"),
        "colours": evaluate(tiny_clip_dir, str(sets["colours"]), tmp_path / "colours", "--image_column", "picture",
                            "--caption_column", "text", "--label_column", "colour"),
    }  # fmt: skip
    # The validation split keeps its plain names; it has no labels, so no zero-shot metrics.
    for name in PER_SET_METRICS:
        assert f"eval_{name}" in together
    assert not any(key.startswith("eval_zeroshot") for key in together)
    for set_name, single in alone.items():
        for name in (*PER_SET_METRICS, *ZEROSHOT_METRIC_NAMES):
            assert together[f"eval_{set_name}_{name}"] == single[f"eval_{name}"], (set_name, name)
        assert together[f"eval_{set_name}_samples"] == single["eval_samples"]
    # Each set is classified among its own class names: 3 shapes, 4 colours (top-5 of 4 classes is always a hit).
    assert together["eval_colours_zeroshot_top5"] == 1.0
    assert together["eval_shapes_zeroshot_top5"] == 1.0


def test_one_round_reports_every_set_and_an_extra_set_drives_selection(base_args, sets, tmp_path):
    argv = [*base_args, "--eval_strategy", "epoch", "--eval_on_start", "true", "--num_train_epochs", "1",
            "--extra_eval_sets", json.dumps({"ref": str(sets["shapes"])}),
            "--metric_for_best_model", "eval_ref_t2i_recall@5", "--early_stopping_patience", "5",
            "--save_strategy", "epoch", "--save_total_limit", "1"]  # fmt: skip
    main(argv)
    out = Path(base_args[base_args.index("--output_dir") + 1])
    state = json.loads((out / "trainer_state.json").read_text())
    rounds = [entry for entry in state["log_history"] if any(key.startswith("eval_") for key in entry)]
    steps = [entry["step"] for entry in rounds]
    assert len(steps) == 2 and steps[0] == 0 < steps[1]  # eval_on_start and the epoch's: one entry each
    for entry in rounds:
        assert "eval_loss" in entry and "eval_t2i_recall@5" in entry and "eval_ref_t2i_recall@5" in entry
    assert state["best_metric"] == max(entry["eval_ref_t2i_recall@5"] for entry in rounds[1:])
    card = (out / "README.md").read_text()
    assert "### Evaluation set `ref`" in card


def test_config_file_paths_of_extra_sets_are_read_beside_it(tmp_path, monkeypatch):
    project = tmp_path / "project"
    write_shapes_csv(project / "data", repeats=1, name="ref.csv")
    (project / "configs").mkdir()
    config = project / "configs" / "run.json"
    config.write_text(json.dumps({
        "model_name_or_path": "some/model", "dataset_name": "emoji",
        "extra_eval_sets": {"ref": "../data/ref.csv", "other": {"path": "../data/ref.csv", "label_column": "shape"},
                            "hub": {"dataset_name": "user/not-a-local-folder"}},
    }))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    _, data_args, _ = parse_arguments([str(config), "--output_dir", "out"])
    built = data_args.extra_eval_data_arguments()
    assert Path(built["ref"].validation_file).resolve() == (project / "data" / "ref.csv").resolve()
    assert built["other"].label_column == "shape" and built["other"].validation_file == built["ref"].validation_file
    assert built["hub"].dataset_name == "user/not-a-local-folder"


@pytest.mark.parametrize(
    "sets_json, message",
    [
        ('{"": "x.csv"}', "must be non-empty"),
        ('{"my set": "x.csv"}', "letters, digits"),
        ('{"t2i": "x.csv"}', "collides with the validation split's metric names"),
        ('{"loss": "x.csv"}', "collides"),
        ('{"a": "x.csv", "a": "y.csv"}', "has the key 'a' twice"),
        ('{"a": {"path": "x.csv", "dataset_name": "emoji"}}', "exactly one of"),
        ('{"a": {"pth": "x.csv"}}', "Did you mean `path`?"),
        ('{"a": "missing.csv"}', "entry 'a': `validation_file` is 'missing.csv', which does not exist"),
        ('{"a": 3}', "give a path or an object"),
        ("[1, 2]", "must be a JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_extra_sets_are_one_line_errors(sets_json, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.csv").write_text("image,caption\n")
    (tmp_path / "y.csv").write_text("image,caption\n")
    with pytest.raises(ConfigError, match="extra_eval_sets") as error:
        parse_arguments(["--model_name_or_path", "m", "--dataset_name", "emoji", "--extra_eval_sets", sets_json])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_metric_for_best_model_may_name_an_extra_set(tiny_clip_dir, sets, tmp_path):
    argv = ["--model_name_or_path", str(tiny_clip_dir), "--train_file", str(sets["main"]), "--output_dir",
            str(tmp_path / "out"), "--extra_eval_sets", json.dumps({"ref": str(sets["shapes"])}), *QUIET]  # fmt: skip
    with pytest.raises(ConfigError, match="Zero-shot metrics need `label_column`"):
        main([*argv, "--metric_for_best_model", "eval_ref_zeroshot_top1"])
    with pytest.raises(ConfigError, match="Did you mean `eval_ref_t2i_recall@5`"):
        main([*argv, "--metric_for_best_model", "eval_ref_t2i_recall@55"])
    labelled = list(argv)
    labelled[labelled.index("--extra_eval_sets") + 1] = json.dumps({"ref": {"path": str(sets["shapes"]),
                                                                          "label_column": "x"}})  # fmt: skip
    with pytest.raises(ConfigError, match="entry 'ref'.*no such column"):  # checked when the set is loaded
        main([*labelled, "--max_steps", "1"])


def test_the_curves_draw_one_line_per_set():
    from clip_trainer.plots import _panels

    history = [
        {"step": step, "eval_mean_recall": 0.1 * step, "eval_t2i_recall@1": 0.1, "eval_ref_mean_recall": 0.5,
         "eval_ref_t2i_recall@1": 0.2, "eval_pets_mean_recall": 0.4, "eval_pets_zeroshot_top1": 0.3}
        for step in (0, 5)
    ]  # fmt: skip
    panels = {title: curves for title, _, curves in _panels(history)}
    assert set(panels["Mean recall per evaluation set"]) == {"validation", "ref", "pets"}
    assert set(panels["Retrieval recall"]) == {"mean_recall", "t2i_recall@1"}  # the validation split's only
    assert set(panels["Zero-shot accuracy"]) == {"pets zeroshot_top1"}
