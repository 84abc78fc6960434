"""How users write options, and what the command makes of it: every spelling of a flag means the same, an empty
value unsets what a config file set, a list given twice or an option set against another is refused in one line
(a single value given twice keeps the last, as in most commands), and a
config file's paths (`~`, `teacher_embeddings`, `train_mixture` as JSON text) are read as the file's other paths are;
a config file with a byte-order mark reads, one in another format is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clip_trainer import run
from clip_trainer.command_line import parse_arguments


@pytest.fixture
def user_folder(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "user"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


@pytest.mark.parametrize("spelling", [["--do_eval=true"], ["--do-eval"], ["--do_eval", "true"], ["--do_eval"]])
def test_every_spelling_of_do_eval_evaluates_without_training(base_args, tmp_path, spelling):
    argv = [*base_args, *spelling]
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "eval")
    results = run.main(argv)
    assert "eval_t2i_recall@1" in results and "train_loss" not in results
    assert not (tmp_path / "eval" / "model.safetensors").exists()


def test_do_eval_false_in_any_spelling_trains_without_the_final_evaluation():
    for spelling in (["--do_eval=false"], ["--do_eval", "false"]):
        _, _, training_args = parse_arguments(["--dataset_name", "emoji", "--output_dir", "o", *spelling])
        assert training_args.do_train and not training_args.do_eval, spelling


def test_an_empty_value_unsets_what_a_config_file_set(user_folder):
    config = user_folder / "run.json"
    config.write_text(json.dumps({"dataset_name": "emoji", "output_dir": "o", "dropout": 0.2,
                                  "early_stopping_patience": 5, "max_seq_length": 32, "wise_ft_alphas": [0.5],
                                  "report_to": "none", "eval_strategy": "epoch", "save_strategy": "epoch"}))  # fmt: skip
    model_args, data_args, training_args = parse_arguments(
        [
            str(config),
            "--dropout",
            "",
            "--early_stopping_patience",
            "",
            "--max_seq_length=",
            "--wise_ft_alphas",
            "",
            "--report_to",
            "",
        ]  # fmt: skip
    )
    assert model_args.dropout is None and data_args.max_seq_length is None
    assert training_args.early_stopping_patience is None and training_args.wise_ft_alphas is None
    assert training_args.report_to == ["tensorboard"]  # clip-trainer's default, not a logger named ""


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--wise_ft_alphas", "0.25", "--wise_ft_alphas", "0.5"], "`--wise_ft_alphas` is given twice"),
        (["--extra_eval_sets", '{"a": "x.csv"}', "--extra_eval_sets", '{"b": "y.csv"}'],
         "`--extra_eval_sets` is given twice on the command line; the second would drop the first's values"),
        (["--early_stopping_patience", "2", "--load_best_model_at_end", "false"],
         "`load_best_model_at_end` is set to false: drop one of them"),
    ],
)  # fmt: skip
def test_collections_given_twice_or_options_against_each_other_are_one_line(base_args, capsys, flags, message):
    status = run.cli([*base_args, *flags])
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("run_clip.py: error:")]
    assert status == 2 and message in line


def test_a_config_files_paths_read_beside_it_whatever_their_form(user_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".clip-trainer-test-data.csv").write_text("image,caption\n")
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "data").mkdir()
    (project / "data" / "a.csv").write_text("image,caption\n")
    (project / "stored").mkdir()
    home_data = Path("~").expanduser() / ".clip-trainer-test-data.csv"
    config = project / "configs" / "run.json"
    config.write_text(json.dumps({
        "train_mixture": json.dumps({"../data/a.csv": 1}),  # the object written as JSON text
        "teacher_embeddings": "../stored",
        "validation_file": "~/.clip-trainer-test-data.csv",
        "output_dir": "o",
    }))  # fmt: skip
    _, data_args, training_args = parse_arguments([str(config)])
    assert list(data_args.train_mixture) == [str(project / "configs" / "../data/a.csv")]
    assert training_args.teacher_embeddings == str(project / "configs" / "../stored")
    assert data_args.validation_file == str(home_data)


def test_a_config_file_with_a_byte_order_mark_reads_and_one_in_another_format_is_named(user_folder, capsys):
    config = user_folder / "run.json"
    config.write_bytes(b"\xef\xbb\xbf" + json.dumps({"dataset_name": "emoji", "output_dir": "o"}).encode())
    _, data_args, _ = parse_arguments([str(config)])
    assert data_args.dataset_name == "emoji"
    (user_folder / "run.yaml").write_text("dataset_name: emoji\n")
    status = run.cli(["run.yaml"])
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("run_clip.py: error:")]
    assert status == 2 and "a config file is JSON without comments, named *.json" in line


def test_a_single_value_given_twice_keeps_the_last_as_scripts_expect():
    _, _, training_args = parse_arguments(["--dataset_name", "emoji", "--output_dir", "o", "--learning_rate", "1e-4",
                                           "--learning_rate", "2e-4"])  # fmt: skip
    assert training_args.learning_rate == 2e-4


def test_two_words_after_a_one_value_option_say_how_to_give_them(base_args, capsys):
    status = run.cli([*base_args, "--report_to", "tensorboard", "wandb"])
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("run_clip.py: error:")]
    assert status == 2 and "`--report_to` takes one value ('tensorboard')" in line
    assert "--report_to tensorboard,wandb" in line


def test_the_fast_help_names_no_source_expression_as_a_default():
    from clip_trainer.command_line import help_text

    text = " ".join(help_text("run_clip.py").split())
    assert "Default: TrainingArguments." not in text
    assert (
        "`adam` (torch.optim.Adam with L2 weight decay, as the seed project used). Default: transformers' own." in text
    )
