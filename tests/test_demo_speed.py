"""Less time outside the training steps: an evaluation set is decoded once per run on the CPU (its batches are
replayed at later evaluations), with the same metrics as decoding it again."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import set_option

from clip_trainer import run
from clip_trainer.collator import ImageTextCollator
from clip_trainer.trainer import EvaluationBatches


def count_collator_calls(monkeypatch) -> dict[str, int]:
    calls = {"batches": 0}
    original = ImageTextCollator.__call__

    def counted(self, examples):
        calls["batches"] += 1
        return original(self, examples)

    monkeypatch.setattr(ImageTextCollator, "__call__", counted)
    return calls


@pytest.mark.slow  # two training runs
def test_a_run_decodes_its_validation_split_once_and_scores_it_as_a_fresh_evaluation(base_args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = set_option(base_args, "eval_strategy", "epoch")
    argv = set_option(argv, "per_device_eval_batch_size", "4")
    argv += ["--validation_split_percentage", "25", "--eval_on_start", "true"]
    calls = count_collator_calls(monkeypatch)
    metrics = run.main(argv)
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert len([entry for entry in history if "eval_t2i_recall@1" in entry]) == 3  # step 0 and 2 epochs

    from clip_trainer import DataArguments, load_image_text_data

    data = load_image_text_data(
        DataArguments(train_file=argv[argv.index("--train_file") + 1], validation_split_percentage=25),
        seed=1,
        evaluate=True,
    )
    train_batches = 2 * math.ceil(len(data.train) / 8)
    eval_batches = math.ceil(len(data.validation) / 4)
    # Four evaluations (step 0, two epochs, the final one); the validation split was collated for the first only.
    assert calls["batches"] == train_batches + eval_batches

    # The final evaluation replayed kept batches; a fresh evaluation of the saved model decodes the split itself.
    # (Replayed without accelerate's loader state, the loss was off: its gather cut batches to the training remainder.)
    fresh = run.main(
        [
            *set_option(argv, "model_name_or_path", str(tmp_path / "out")),
            "--do_train", "false", "--do_eval", "true", "--output_dir", str(tmp_path / "fresh"),
        ]
    )  # fmt: skip
    assert calls["batches"] == train_batches + 2 * eval_batches
    for key in ("eval_t2i_recall@1", "eval_i2t_recall@5", "eval_loss", "eval_t2i_median_rank"):
        assert fresh[key] == pytest.approx(metrics[key], abs=1e-6), key


class Loader(list):
    """A stand-in for a prepared DataLoader: its batches, and a count of the passes over them."""

    passes = 0

    def __iter__(self):
        type(self).passes += 1
        return super().__iter__()


def test_evaluation_batches_are_kept_after_one_full_pass_and_handed_out_as_copies():
    batches = Loader([{"pixel_values": torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "input_ids": torch.ones(2, 5)}] * 3)
    kept = EvaluationBatches(batches, dataset=None, max_bytes=10_000)
    first = list(kept)
    first[0]["pixel_values"] = torch.ones(2)  # the evaluation step replaces the pixels of its inputs
    assert kept.complete and Loader.passes == 1
    again = list(kept)
    assert Loader.passes == 1 and len(again) == 3
    assert again[0]["pixel_values"].dtype == torch.uint8 and again[0]["pixel_values"].shape == (2, 3, 4, 4)


def test_evaluation_batches_keep_nothing_past_their_limit_or_after_an_interrupted_pass():
    batch = {"pixel_values": torch.zeros(100, dtype=torch.uint8)}
    too_big = EvaluationBatches(Loader([batch] * 3), dataset=None, max_bytes=250)
    assert len(list(too_big)) == 3 and not too_big.complete
    interrupted = EvaluationBatches(Loader([batch] * 3), dataset=None, max_bytes=10_000)
    next(iter(interrupted))
    assert not interrupted.complete
