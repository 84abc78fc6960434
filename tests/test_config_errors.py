"""Every configuration and data mistake, met as a user meets it: the documented command line (`run_clip.py`'s `cli`),
from a temporary working folder. Each gives exit status 2 and one message that names the key, file or row and the
fix, no traceback, and (wherever the data is not needed to tell) stops before any data or weights are loaded.

One table: each case is a name, how it changes the base command line, the phrases the message must contain, and how
far the run may get (`nothing`: no data and no weights loaded; `data`: the data may be read, no weights).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TINY_TEXT, TINY_VISION, drop_option, set_option

from clip_trainer import run
from clip_trainer.arguments import ConfigError
from clip_trainer.command_line import parse_arguments
from clip_trainer.data import load_image_text_data as real_load_image_text_data
from clip_trainer.validation import check_arguments

REPO = Path(__file__).resolve().parent.parent


def config_file(tmp: Path, values: dict, name: str = "config.json") -> str:
    path = tmp / name
    path.write_text(json.dumps(values))
    return str(path)


def csv_file(tmp: Path, text: str, encoding: str = "utf-8", name: str = "pairs.csv") -> str:
    path = tmp / name
    path.write_bytes(text.encode(encoding))
    return str(path)


def two_csvs_the_second_with_an_unquoted_comma(tmp: Path) -> str:
    csv_file(tmp, "image,caption\na.png,one\n", name="p1.csv")
    csv_file(tmp, "image,caption\na.png,one\nb.png,two\nc.png,red, round\n", name="p2.csv")
    return str(tmp / "p*.csv")


def not_images_csv(tmp: Path) -> str:
    """A validation CSV whose three `.png` files hold text."""
    for index in range(3):
        (tmp / f"v{index}.png").write_text(f"not an image {index}")
    return csv_file(tmp, "image,caption\nv0.png,a cat\nv1.png,a dog\nv2.png,a cow\n", name="val.csv")


def an_image(argv: list[str]) -> str:
    """An image file of the base command line's training data, by absolute path."""
    return str(Path(argv[argv.index("--train_file") + 1]).parent / "images" / "red_circle_white_0.png")


def not_clip_folder(tmp: Path) -> str:
    from transformers import BertConfig

    folder = tmp / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        folder
    )
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor"}))
    return str(folder)


def weights_only_folder(tmp: Path, tiny_clip_dir: Path, *extra: str) -> str:
    """What `CLIPModel.save_pretrained` alone writes (config and weights, no processor), plus `extra` files."""
    folder = tmp / "weights-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", *extra):
        (folder / name).write_bytes((tiny_clip_dir / name).read_bytes())
    return str(folder)


def config_only_folder(tmp: Path, tiny_clip_dir: Path) -> str:
    folder = tmp / "config-only"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny_clip_dir / "config.json").read_bytes())
    return str(folder)


def siglip2_config(tmp: Path) -> str:
    """A tiny SigLIP 2 (NaFlex) config file, to train from scratch."""
    from transformers import Siglip2Config

    vision = {key: value for key, value in TINY_VISION.items() if key != "image_size"}
    config = Siglip2Config(
        text_config={**TINY_TEXT, "max_position_embeddings": 64}, vision_config={**vision, "num_patches": 16}
    )
    path = tmp / "siglip2-tiny.json"
    path.write_text(config.to_json_string())
    return str(path)


def with_siglip2(argv: list[str], tmp: Path) -> list[str]:
    return [*drop_option(argv, "model_name_or_path"), "--config_name", siglip2_config(tmp)]


@dataclass
class Case:
    name: str
    # (base argv, tmp folder, tiny model folder) -> argv
    argv: Callable[[list[str], Path, Path], list[str]]
    expected: tuple[str, ...]
    reaches: str = "nothing"  # "nothing" or "data"


CASES = [
    # --- the command line and config files ---------------------------------------------------------------------
    Case("unknown key in a config file", lambda a, t, m: [config_file(t, {"learning_rte": 1e-4}), *a],
         ("Unknown key `learning_rte`", "config.json", "Did you mean `learning_rate`?")),
    Case("unknown flag", lambda a, t, m: [*a, "--per_device_batch_size", "4"],
         ("Unknown option `--per_device_batch_size`", "Did you mean `per_device_")),
    Case("abbreviated flag", lambda a, t, m: [*a, "--learning_r", "1e-3"], ("Unknown option `--learning_r`",)),
    Case("missing config file", lambda a, t, m: [str(t / "nowhere.json"), *a], ("nowhere.json' does not exist",)),
    Case("malformed config file", lambda a, t, m: [csv_file(t, '{"learning_rate": 1e-4,}', name="broken.json"), *a],
         ("is not valid JSON", "line 1")),
    Case("config file that is not an object", lambda a, t, m: [csv_file(t, "[1, 2]", name="list.json"), *a],
         ("must hold one JSON object",)),
    Case("bad value for a typed option", lambda a, t, m: [*a, "--learning_rate", "fast"], ("learning_rate", "fast")),
    Case("bad choice", lambda a, t, m: [*a, "--on_bad_rows", "ignore"], ("on_bad_rows", "skip", "error")),
    # --- values a config file gets wrong: checked as the command line's are, before any data is read ------------
    Case("a choice in a config file", lambda a, t, m: [config_file(t, {"loss_type": "hinge"}), *a],
         ("`loss_type` is 'hinge'; set it to one of: auto, softmax, sigmoid", "config.json")),
    Case("accumulation mode in a config file", lambda a, t, m: [config_file(t, {"accumulation_mode": "magic"}), *a],
         ("`accumulation_mode` is 'magic'", "cached, independent")),
    Case("transformers' enum in a config file",
         lambda a, t, m: [config_file(t, {"eval_strategy": "weekly"}), *drop_option(a, "eval_strategy")],
         ("`eval_strategy` is 'weekly'", "no, steps, epoch", "config.json")),
    Case("a choice of the wrong JSON type", lambda a, t, m: [config_file(t, {"on_bad_rows": False}), *a],
         ("`on_bad_rows` is False", "skip, error")),
    Case("retrieval chunk size 0 in a file", lambda a, t, m: [config_file(t, {"retrieval_chunk_size": 0}), *a],
         ("`retrieval_chunk_size` is 0; it must be at least 1", "config.json")),
    Case("peak TFLOP/s 0 in a file", lambda a, t, m: [config_file(t, {"peak_tflops": 0}), *a],
         ("`peak_tflops` is 0; it must be above 0",)),
    Case("max_logit_scale nan", lambda a, t, m: [*a, "--max_logit_scale", "nan"],
         ("`max_logit_scale` is nan; it must be a number above 1",)),
    Case("a string for a list option", lambda a, t, m: [config_file(t, {"zeroshot_templates": "a photo of {}"}), *a],
         ("`zeroshot_templates` is 'a photo of {}'; it must be a list of strings", '["a photo of {}"]')),
    Case("a list for a scalar option", lambda a, t, m: [config_file(t, {"max_seq_length": [8]}), *a],
         ("`max_seq_length` is [8]; it must be a whole number of at least 2",)),
    Case("a number for a bool option", lambda a, t, m: [config_file(t, {"augment": 1}), *a],
         ("`augment` is 1; it must be true or false",)),
    # --- a key given twice in one JSON object: JSON itself keeps the last one without a word ----------------------
    Case("a key twice in a config file",
         lambda a, t, m: [csv_file(t, '{"learning_rate": 1e-4, "seed": 3, "learning_rate": 1e-3}', name="twice.json"), *a],
         ("Config file", "twice.json", "has the key 'learning_rate' twice;", "keep one of them")),
    Case("an evaluation set named twice in a config file",
         lambda a, t, m: [csv_file(t, '{"extra_eval_sets": {"ref": "a.csv", "ref": "b.csv"}}', name="sets.json"), *a],
         ("has the key 'ref' twice in `extra_eval_sets`", "give each set its own name")),
    Case("an evaluation set's option twice in a config file",
         lambda a, t, m: [csv_file(t, '{"extra_eval_sets": {"ref": {"path": "a.csv", "path": "b.csv"}}}', name="sets.json"), *a],
         ("has the key 'path' twice in `extra_eval_sets.ref`",)),
    Case("a mixture source twice in a config file",
         lambda a, t, m: [csv_file(t, '{"train_mixture": {"X": 1, "X": 3}}', name="mix.json"),
                          *drop_option(a, "train_file")],
         ("has the key 'X' twice in `train_mixture`", "give each source once, with the weights added up")),
    Case("a mixture source twice on the command line",
         lambda a, t, m: [*drop_option(a, "train_file"), "--train_mixture", '{"X": 1, "X": 3}'],
         ("`train_mixture` has the key 'X' twice", "weights added up")),
    Case("a bool as an unknown string", lambda a, t, m: [config_file(t, {"freeze_text_model": "sometimes"}), *a],
         ("`freeze_text_model` is 'sometimes' in", "config.json; it must be true or false")),
    # --- numbers a JSON file gets wrong --------------------------------------------------------------------------
    Case("eval batch size 0", lambda a, t, m: set_option(a, "per_device_eval_batch_size", "0"),
         ("`per_device_eval_batch_size` is 0", "at least 1")),
    Case("negative batch size", lambda a, t, m: set_option(a, "per_device_train_batch_size", "-4"),
         ("`per_device_train_batch_size` is -4",)),
    Case("batch size 0", lambda a, t, m: set_option(a, "per_device_train_batch_size", "0"),
         ("`per_device_train_batch_size` is 0",)),
    Case("fractional batch size", lambda a, t, m: set_option(a, "per_device_train_batch_size", "8.5"),
         ("per_device_train_batch_size", "8.5")),
    Case("fractional batch size in a file",
         lambda a, t, m: [config_file(t, {"per_device_train_batch_size": 8.5}), *drop_option(a, "per_device_train_batch_size")],
         ("`per_device_train_batch_size` is 8.5", "whole number")),
    Case("batch size 1", lambda a, t, m: set_option(a, "per_device_train_batch_size", "1"),
         ("`per_device_train_batch_size` is 1", "no other pair", "nothing trains")),
    Case("learning rate null", lambda a, t, m: [config_file(t, {"learning_rate": None}), *drop_option(a, "learning_rate")],
         ("`learning_rate` is None", "a number of at least 0")),
    Case("learning rate list", lambda a, t, m: [config_file(t, {"learning_rate": [1e-3]}), *drop_option(a, "learning_rate")],
         ("`learning_rate` is [0.001]",)),
    Case("negative learning rate", lambda a, t, m: [*drop_option(a, "learning_rate"), "--learning_rate=-1e-3"],
         ("`learning_rate` is -0.001",)),
    Case("negative workers", lambda a, t, m: set_option(a, "dataloader_num_workers", "-1"),
         ("`dataloader_num_workers` is -1",)),
    Case("max_steps 0", lambda a, t, m: [*a, "--max_steps", "0"], ("`max_steps` is 0", "-1 to use epochs")),
    Case("no epochs", lambda a, t, m: set_option(a, "num_train_epochs", "0"), ("`num_train_epochs` is 0",)),
    Case("negative max_nonfinite_steps", lambda a, t, m: [*a, "--max_nonfinite_steps", "-1"],
         ("`max_nonfinite_steps` is -1",)),
    Case("tiny tokenizer vocabulary", lambda a, t, m: [*a, "--tokenizer_vocab_size", "100"],
         ("`tokenizer_vocab_size` is 100", "at least 259")),
    Case("flash attention without the package", lambda a, t, m: [*a, "--attn_implementation", "flash_attention_2"],
         ("flash_attention_2", "not installed", "sdpa")),
    Case("validation percentage 100", lambda a, t, m: [*a, "--validation_split_percentage", "100"],
         ("`validation_split_percentage` is 100",)),
    # --- the model -------------------------------------------------------------------------------------------------
    Case("empty model name and no config", lambda a, t, m: set_option(a, "model_name_or_path", ""), ("No model given",)),
    Case("a checkpoint that is not CLIP", lambda a, t, m: set_option(a, "model_name_or_path", not_clip_folder(t)),
         ("is a 'bert' model", "clip-trainer trains 'clip', 'siglip'")),
    Case("an empty folder as the model", lambda a, t, m: set_option(a, "model_name_or_path", str(t)),
         ("without a config.json",)),
    Case("a config-only folder as the model", lambda a, t, m: set_option(a, "model_name_or_path", config_only_folder(t, m)),
         ("has no model.safetensors", "`config_name`"), "data"),
    # transformers 5 builds an empty tokenizer (2 tokens) from such a folder and would train on it without a word.
    Case("a model folder without its tokenizer",
         lambda a, t, m: set_option(a, "model_name_or_path", weights_only_folder(t, m, "processor_config.json")),
         ("weights-only has no tokenizer", "give --tokenizer_name", "save the processor into the folder")),
    Case("a model folder without its image processor",
         lambda a, t, m: set_option(a, "model_name_or_path", weights_only_folder(t, m, "tokenizer.json",
                                                                               "tokenizer_config.json")),
         ("weights-only has no image processor", "give --image_processor_name")),
    Case("max_seq_length beyond the text model", lambda a, t, m: [*a, "--max_seq_length", "100"],
         ("`max_seq_length` is 100", "set it to 16 or less")),
    Case("both towers frozen", lambda a, t, m: [*a, "--freeze_vision_model", "true", "--freeze_text_model", "true"],
         ("`freeze_vision_model` and `freeze_text_model`", "unfreeze_after_steps")),
    # --- evaluation and logging ------------------------------------------------------------------------------------
    Case("zero-shot metric without labels", lambda a, t, m: [*a, "--metric_for_best_model", "eval_zeroshot_top1"],
         ("which evaluation never computes", "Zero-shot metrics need `label_column`", "eval_t2i_recall@5")),
    Case("misspelt metric", lambda a, t, m: [*a, "--metric_for_best_model", "eval_mean_recal"],
         ("Did you mean `eval_mean_recall`?",)),
    Case("unknown metric", lambda a, t, m: [*a, "--metric_for_best_model", "eval_foo"],
         ("never computes. Choose one of", "eval_loss")),
    Case("best model with mismatched strategies",
         lambda a, t, m: [*a, "--load_best_model_at_end", "true", "--eval_strategy", "epoch", "--save_strategy", "steps"],
         ("load_best_model_at_end",)),
    Case("a metric with no direction", lambda a, t, m: [*a, "--metric_for_best_model", "eval_temperature"],
         ("`metric_for_best_model` is 'eval_temperature', which has no better direction", "cannot choose a checkpoint",
          "Choose one of: ", "eval_mean_recall")),
    Case("logit_bias without the sigmoid loss", lambda a, t, m: [*a, "--metric_for_best_model", "eval_logit_bias"],
         ("`metric_for_best_model` is 'eval_logit_bias'", "reported only with the sigmoid loss")),
    Case("augmentation for SigLIP 2", lambda a, t, m: [*with_siglip2(a, t), "--augment", "true"],
         ("`augment` crops every training image to one fixed size", "SigLIP 2", "drop `augment`")),
    Case("ONNX export of SigLIP 2", lambda a, t, m: [*with_siglip2(a, t), "--export_onnx", "true"],
         ("`export_onnx`", "SigLIP 2's NaFlex", "Drop --export_onnx")),
    Case("unknown logger", lambda a, t, m: set_option(a, "report_to", "tensorbord"),
         ("`report_to` names 'tensorbord'", "Did you mean `tensorboard`?")),
    Case("none with another logger", lambda a, t, m: set_option(a, "report_to", "tensorboard,none"),
         ("`report_to` is tensorboard,none: 'none' must be alone",)),
    Case("all with another logger", lambda a, t, m: set_option(a, "report_to", "tensorboard,all"),
         ("`report_to` is tensorboard,all: 'all' must be alone",)),
    Case("push_to_hub from an evaluation", lambda a, t, m: [*a, "--do_eval", "--push_to_hub", "true"],
         ("`push_to_hub` uploads the trained model, but this run does not train", "an evaluation has no trained "
          "model to publish", "`hf upload`")),
    # --- TrainingArguments options the contrastive loss or a two-tower model cannot honour ------------------------
    Case("label smoothing", lambda a, t, m: [*a, "--label_smoothing_factor", "0.1"],
         ("`label_smoothing_factor` is 0.1, but the contrastive loss does not use it", "drop it")),
    Case("NEFTune", lambda a, t, m: [*a, "--neftune_noise_alpha", "5"],
         ("`neftune_noise_alpha` adds noise to a language model's input embeddings", "drop it")),
    Case("Liger kernels", lambda a, t, m: [*a, "--use_liger_kernel", "true"],
         ("`use_liger_kernel`", "causal language models", "drop it")),
    Case("resume with nothing to resume", lambda a, t, m: [*a, "--resume_from_checkpoint", "true"],
         ("holds no checkpoint",)),
    # --- output_dir ------------------------------------------------------------------------------------------------
    Case("output_dir is a file", lambda a, t, m: set_option(a, "output_dir", csv_file(t, "x", name="file.txt")),
         ("is a file; give a folder",)),
    Case("output_dir cannot be created", lambda a, t, m: set_option(a, "output_dir", str(Path(csv_file(t, "x", name="f")) / "out")),
         ("Cannot write into `output_dir`", "choose another folder")),
    # --- data files ----------------------------------------------------------------------------------------------
    # A mistyped model folder: not sent to the Hub when it is written as a path; beside a folder of that name, the
    # near names are offered.
    Case("a model path that does not exist",
         lambda a, t, m: set_option(a, "model_name_or_path", "../outputs/dem"),
         ("`model_name_or_path` '../outputs/dem' is not on this machine (no ",)),
    Case("a mistyped model folder",
         lambda a, t, m: (t / "out" / "csv").mkdir(parents=True) or set_option(a, "model_name_or_path", "out/cvs"),
         ("`model_name_or_path` 'out/cvs' is not on this machine", "did you mean 'out/csv'?",
          "loading it as a Hub id failed")),
    Case("missing train file", lambda a, t, m: set_option(a, "train_file", str(t / "missing.csv")),
         ("`train_file`", "does not exist")),
    Case("no training data", lambda a, t, m: drop_option(a, "train_file"),
         ("No training data given", "--do_eval")),
    Case("wrong caption column", lambda a, t, m: [*a, "--caption_column", "text"],
         ("`caption_column` is 'text'", "image, caption, shape", "Set `caption_column` to one of them"), "data"),
    Case("wrong label column", lambda a, t, m: [*a, "--label_column", "colour", "--eval_strategy", "epoch"],
         ("`label_column` is 'colour'", "shape"), "data"),
    Case("a CSV with a header only", lambda a, t, m: set_option(a, "train_file", csv_file(t, "image,caption\n")),
         ("has no rows", "one row per"), "data"),
    Case("an empty CSV", lambda a, t, m: set_option(a, "train_file", csv_file(t, "")), ("has no rows", "header row"), "data"),
    Case("a CSV of one row",
         lambda a, t, m: [*set_option(a, "train_file", csv_file(t, f"image,caption\n{an_image(a)},a cat\n")), "--eval_strategy", "epoch"],
         ("Cannot hold out 15% of 1 training pair", "validation_split_percentage` to 0"), "data"),
    Case("a latin-1 CSV", lambda a, t, m: set_option(a, "train_file", csv_file(t, "image,caption\na.png,caf\u00e9 cr\u00e8me\n", "latin-1")),
         ("is not UTF-8", "save it as UTF-8"), "data"),
    # Deep in a file, pandas decodes in blocks: the byte and line are the file's own (the bad row is line 20,002;
    # before it, a 14-byte header, 20,000 rows of 30 bytes, then the 9 bytes of "a.png,caf").
    Case("a latin-1 byte deep in a CSV",
         lambda a, t, m: set_option(a, "train_file", csv_file(
             t, "image,caption\n" + "".join(f"a.png,caption number {i:08d}\n" for i in range(20_000))
             + "a.png,caf\u00e9\n", "latin-1", name="big.csv")),
         ("big.csv' is not UTF-8 text (invalid continuation byte at byte 600,023, line 20,002)", "save it as UTF-8"),
         "data"),
    # An unquoted comma in a caption, in the second file of a glob: the file and line are named, and the fix.
    Case("a caption with an unquoted comma",
         lambda a, t, m: set_option(a, "train_file", two_csvs_the_second_with_an_unquoted_comma(t)),
         ("`train_file`", "p2.csv': line 4 cannot be read: it has 3 fields where the header has 2", "must be quoted"), "data"),
    Case("a validation set with one pair",
         lambda a, t, m: [*a, "--eval_strategy", "epoch", "--validation_file",
                          csv_file(t, f"image,caption\nnone.png,a cat\n{an_image(a)},a red circle\n", name="val.csv")],
         ("1 usable pair(s)", "at least 2"), "data"),
    # Files that exist but are no images pass the up-front row checks; found before training, not an epoch in.
    Case("a validation set whose images do not decode",
         lambda a, t, m: [*a, "--eval_strategy", "epoch", "--validation_file", not_images_csv(t)],
         ("3 pair(s), and 0 of their images decode", "row 0: not an image", "fix or replace those files"), "data"),
    Case("a config file after a flag", lambda a, t, m: [*a, config_file(t, {"max_steps": 1})],
         ("config.json`: config files come first, before every flag",)),
    Case("even batches off", lambda a, t, m: [*a, "--accelerator_config", '{"even_batches": false}'],
         ("sets even_batches false", "Leave it true")),
    Case("sampling grouped by a length the rows do not have",
         lambda a, t, m: [*a, "--train_sampling_strategy", "group_by_length"],
         ("`train_sampling_strategy` group_by_length", "use random (the default) or sequential")),
    Case("early stopping without evaluation", lambda a, t, m: [*a, "--early_stopping_patience", "2"],
         ("`early_stopping_patience` stops on evaluations", "`eval_strategy` is no")),
    Case("early stopping without validation data",
         lambda a, t, m: [*a, "--validation_split_percentage", "0", "--early_stopping_patience", "2", "--eval_strategy", "epoch", "--save_strategy", "epoch"],
         ("`early_stopping_patience` needs evaluation",), "data"),
]  # fmt: skip


@pytest.fixture
def guarded(monkeypatch):
    """Records how far the run got: the data loader and the model loader report when they are reached."""
    reached: list[str] = []

    def load_data(*args, **kwargs):
        reached.append("data")
        return real_load_image_text_data(*args, **kwargs)

    def load_model(*args, **kwargs):
        raise AssertionError("the mistake should have stopped the run before the model's weights were loaded")

    monkeypatch.setattr(run, "load_image_text_data", load_data)
    monkeypatch.setattr(run, "load_model", load_model)
    return reached


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_mistake_gives_one_line_naming_the_fix(case, base_args, tiny_clip_dir, tmp_path, monkeypatch, capsys, guarded):
    (tmp_path / "user").mkdir()
    monkeypatch.chdir(tmp_path / "user")  # a user's working folder, not the repository
    argv = case.argv(base_args, tmp_path / "user", tiny_clip_dir)
    status = run.cli(argv)
    captured = capsys.readouterr()
    assert status == 2, captured.err[-2000:]
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("run_clip.py: error:")]
    assert len(errors) == 1, captured.err
    for phrase in case.expected:
        assert phrase in errors[0], (phrase, errors[0])
    if case.reaches == "nothing":
        assert guarded == [], "the data was loaded although the mistake is known without it"


def test_logger_that_is_not_installed(base_args, capsys, guarded):
    from transformers.integrations import is_wandb_available

    if is_wandb_available():
        pytest.skip("wandb is installed here, so this mistake cannot be made")
    assert run.cli(set_option(base_args, "report_to", "wandb")) == 2
    message = capsys.readouterr().err
    assert "`report_to` includes wandb, which is not installed" in message and "clip-trainer[wandb]" in message


def test_the_real_entry_point_prints_one_line(tmp_path, shapes_csv):
    """Through `python run_clip.py` in a fresh process, from another folder: no traceback, status 2."""
    result = subprocess.run(
        [sys.executable, str(REPO / "run_clip.py"), "--config_name", "x", "--train_file", str(shapes_csv),
         "--num_train_epoch", "3"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "Did you mean `num_train_epochs`" in result.stderr


@pytest.mark.parametrize(
    "flags, phrase",
    [(["--augment", "true"], "`augment` crops"), (["--export_onnx", "true"], "`export_onnx` writes graphs"),
     (["--metric_for_best_model", "eval_zeroshot_top1", "--eval_strategy", "epoch"], "Zero-shot metrics need")],
)  # fmt: skip
def test_siglip2_mistakes_stop_before_the_output_folder_is_made(flags, phrase, base_args, tmp_path, monkeypatch):
    """Through `run.main` from a user's folder: the error comes first, with no output folder (so no checkpoint)."""
    monkeypatch.chdir(tmp_path)
    argv = [*with_siglip2(set_option(base_args, "output_dir", "out"), tmp_path), *flags]
    with pytest.raises(ConfigError, match=phrase):
        run.main(argv)
    assert not (tmp_path / "out").exists()


def test_what_siglip_models_allow(tmp_path):
    """SigLIP (fixed-size images) augments and exports; its evaluations report `logit_bias`, which has no better
    direction, so it cannot select a checkpoint (and without the sigmoid loss it is not reported at all)."""
    from transformers import SiglipConfig

    config = SiglipConfig(text_config={**TINY_TEXT, "max_position_embeddings": 64}, vision_config=TINY_VISION)
    model_args, data_args, training_args = parse_arguments(
        ["--config_name", "x", "--dataset_name", "emoji", "--report_to", "none", "--augment", "true",
         "--export_onnx", "true", "--eval_strategy", "epoch", "--metric_for_best_model", "eval_mean_recall"]
    )  # fmt: skip
    check_arguments(model_args, data_args, training_args, 64, config=config)
    training_args.metric_for_best_model = "eval_logit_bias"
    with pytest.raises(ConfigError, match="'eval_logit_bias', which has no better direction"):
        check_arguments(model_args, data_args, training_args, 64, config=config)
    training_args.loss_type = "softmax"  # a SigLIP model trained with CLIP's loss reports no logit_bias
    with pytest.raises(ConfigError, match="reported only with the sigmoid loss"):
        check_arguments(model_args, data_args, training_args, 64, config=config)


def test_evaluating_a_model_trained_from_a_config_file_that_names_a_config(tiny_siglip_run, shapes_csv, tmp_path,
                                                                           monkeypatch):  # fmt: skip
    """As the demo's configs do: `config_name` for a new model, and a tokenizer trained for it (300 tokens, not the
    config's 32,000). Evaluating the saved model with the same file names both: one line that says to drop
    `config_name`, and with `--config_name ""` the evaluation runs."""
    from clip_trainer import run
    from clip_trainer.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    settings = {"config_name": str(tiny_siglip_run.parent / "siglip.json"), "tokenizer_vocab_size": 300,
                "report_to": "none", "dataloader_num_workers": 0, "use_cpu": True}  # fmt: skip
    (tmp_path / "run.json").write_text(json.dumps(settings))
    argv = ["run.json", "--do_eval", "--model_name_or_path", str(tiny_siglip_run),
            "--validation_file", str(shapes_csv), "--output_dir", "eval"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"`config_name` .* describes another model than the weights .* \(text "
                                          r"vocab_size 32000 vs 300\).*`--config_name \"\"`"):  # fmt: skip
        run.main(argv)
    assert not (tmp_path / "eval").exists()
    metrics = run.main([*argv, "--config_name", ""])
    assert 0 <= metrics["eval_t2i_recall@1"] <= 1


@pytest.mark.parametrize("block_size", [1, 2, 3, 7, 1 << 20])
def test_the_first_non_utf8_byte_is_found_whatever_the_reading_blocks(tmp_path, block_size):
    """Valid two- and three-byte characters cut by a block's end are not errors; the bad byte's offset and line
    are the file's."""
    from clip_trainer.data import _first_non_utf8

    good = "image,caption\nb.png,café crème\nc.png,€ and ü\n".encode()
    path = tmp_path / "mixed.csv"
    path.write_bytes(good)
    assert _first_non_utf8(str(path), block_size) is None
    path.write_bytes(good + b"d.png,na\xefve\n")
    reason, byte, line = _first_non_utf8(str(path), block_size)
    assert (byte, line) == (len(good) + len(b"d.png,na"), 4) and reason == "invalid continuation byte"
    path.write_bytes(good + b"e.png,cut \xe2\x82")  # a character cut by the end of the file
    assert _first_non_utf8(str(path), block_size)[1:] == (len(good) + len(b"e.png,cut "), 4)


def test_a_model_path_with_an_unexpanded_tilde_says_so(base_args, tmp_path, monkeypatch, capsys):
    """`~/models/clip` from a config file (no shell expands it): the message gives the full path, which exists."""
    (tmp_path / "home" / "models" / "clip").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    status = run.cli(set_option(base_args, "model_name_or_path", "~/models/clip"))
    error = capsys.readouterr().err
    assert status == 2
    assert "'~/models/clip' starts with `~`, which nothing expands here; give the full path, " in error
    assert repr(str(tmp_path / "home" / "models" / "clip")) in error


def test_fsdp_asked_by_accelerate_launch_on_the_cpu_is_refused(base_args, tmp_path, monkeypatch, capsys, guarded):
    """`accelerate launch --use_fsdp` tells the run through ACCELERATE_USE_FSDP only; on the CPU accelerate cannot
    shard and stopped every process with a traceback once the data was loaded."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.chdir(tmp_path)
    assert run.cli(base_args) == 2
    error = capsys.readouterr().err
    assert "`accelerate launch --use_fsdp` (ACCELERATE_USE_FSDP) asks for FSDP" in error and "torchrun" in error
    assert guarded == []


def test_an_empty_value_unsets_a_config_files_text_option(base_args, tmp_path, monkeypatch):
    """`--label_column ""` unsets a config file's label column (as `--dataset_name ""` does its dataset): the run
    evaluates the data, which has no such column, without zero-shot metrics."""
    monkeypatch.chdir(tmp_path)
    config = config_file(tmp_path, {"label_column": "species", "image_id_column": "photo"})
    results = run.main([config, *base_args, "--label_column", "", "--image_id_column", "", "--do_eval"])
    assert "eval_t2i_recall@1" in results and "eval_zeroshot_top1" not in results
