"""Teacher embeddings computed once by a preparation run and read back by training runs: the logged loss is the
contrastive loss plus the weighted KL divergence from the saved teacher's float64 embeddings, the same as a run with
the teacher itself; several captions per image are looked up by the caption drawn; embeddings of other data, a bad
file, and settings that name two teachers stop in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import write_shapes_csv
from test_distillation import (
    TEACHER_SCALE,
    distill_args,
    float64_embeddings,
    save_teacher,
    training_logs,
)
from test_distillation_loss import reference_distillation
from test_loss import reference_clip_loss

from clip_trainer import run
from clip_trainer.distillation import TEACHER_EMBEDDINGS_FILE, StoredTeacherEmbeddings
from clip_trainer.errors import ConfigError


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def one_batch_csv(tmp_path_factory) -> Path:
    return write_shapes_csv(tmp_path_factory.mktemp("one-batch"), repeats=1)


def prepare(csv: Path, out: Path, *extra: str) -> Path:
    run.main([
        "--train_file", str(csv),
        "--validation_split_percentage", "0",
        "--prepare_only", "true",
        "--output_dir", str(out),
        "--report_to", "none",
        "--use_cpu", "true",
        *extra,
    ])  # fmt: skip
    return out


def from_prepared(argv: list[str], prepared: Path) -> list[str]:
    index = argv.index("--train_file")
    return [*argv[:index], "--dataset_name", str(prepared), *argv[index + 2 :]]


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [[], ["--per_device_train_batch_size", "12", "--gradient_accumulation_steps",
                                              "2"]], ids=["one batch", "cached accumulation"])  # fmt: skip
def test_stored_embeddings_train_as_the_teacher_itself(tiny_clip_dir, teacher_dir, one_batch_csv, tmp_path,
                                                       monkeypatch, accumulation):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    prepared = prepare(one_batch_csv, tmp_path / "prepared", "--teacher_model_name_or_path", str(teacher_dir))
    store = StoredTeacherEmbeddings.load(str(prepared))
    assert (prepared / TEACHER_EMBEDDINGS_FILE).is_file()
    assert store.num_images == 24 and store.num_texts == 24
    assert store.inverse_temperature == pytest.approx(TEACHER_SCALE)

    out = tmp_path / "out"
    argv = from_prepared(distill_args(tiny_clip_dir, one_batch_csv, out), prepared)
    run.main([*argv, "--teacher_embeddings", str(prepared), "--distillation_weight", "0.7", *accumulation])

    student_image, student_text, student_scale = float64_embeddings(tiny_clip_dir, one_batch_csv)
    teacher_image, teacher_text, teacher_scale = float64_embeddings(teacher_dir, one_batch_csv)
    contrastive = reference_clip_loss(student_image.tolist(), student_text.tolist(), student_scale)
    divergence = reference_distillation(
        student_image.tolist(), student_text.tolist(), teacher_image.tolist(), teacher_text.tolist(),
        student_scale, teacher_scale,
    )  # fmt: skip
    first, second = training_logs(out)
    assert first["distillation_kl"] == pytest.approx(divergence, rel=1e-4)
    assert first["loss"] == pytest.approx(contrastive + 0.7 * divergence, rel=1e-4)

    # The run with the teacher model itself logs the same two steps.
    online = tmp_path / "online"
    run.main([*distill_args(tiny_clip_dir, one_batch_csv, online), "--teacher_model_name_or_path", str(teacher_dir),
              "--distillation_weight", "0.7", *accumulation])  # fmt: skip
    for stored_step, online_step in zip(training_logs(out), training_logs(online), strict=True):
        assert stored_step["loss"] == pytest.approx(online_step["loss"], rel=1e-5)
        assert stored_step["distillation_kl"] == pytest.approx(online_step["distillation_kl"], rel=1e-4)


@pytest.mark.slow
def test_several_captions_per_image_are_looked_up_by_the_caption_drawn(tiny_clip_dir, teacher_dir, tmp_path):
    """Rows of one image merged into one training row with two captions: each epoch draws one, and the collator finds
    the teacher's embedding of that caption (the stored text for every caption, one image embedding per image)."""
    csv = write_shapes_csv(tmp_path / "data", repeats=1)
    lines = csv.read_text().splitlines()
    header, rows = lines[0], [line.split(",") for line in lines[1:]]
    # A second caption for every image: the same picture under the same path, another row.
    extra = [[path, f"a picture of {caption}", label] for path, caption, label in rows]
    csv.write_text("\n".join([header] + [",".join(row) for row in rows + extra]) + "\n")
    prepared = prepare(csv, tmp_path / "prepared", "--teacher_model_name_or_path", str(teacher_dir))
    store = StoredTeacherEmbeddings.load(str(prepared / TEACHER_EMBEDDINGS_FILE))
    assert store.num_images == 24 and store.num_texts == 48

    out = tmp_path / "out"
    argv = from_prepared(distill_args(tiny_clip_dir, csv, out), prepared)
    run.main([*argv, "--teacher_embeddings", str(prepared), "--max_steps", "3"])
    logs = training_logs(out)
    assert len(logs) == 3 and all(entry["distillation_kl"] > 0 for entry in logs)


@pytest.mark.slow
@pytest.mark.parametrize("other", ["the csv", "new captions"])
def test_embeddings_of_other_data_stop_in_one_line(tiny_clip_dir, teacher_dir, one_batch_csv, tmp_path, other):
    """Training from the CSV (images by path) instead of the prepared folder (images as bytes), or from prepared data
    with a caption the teacher never embedded: refused before training, naming the row."""
    prepared = prepare(one_batch_csv, tmp_path / "prepared", "--teacher_model_name_or_path", str(teacher_dir))
    argv = distill_args(tiny_clip_dir, one_batch_csv, tmp_path / "out")
    if other == "new captions":
        csv = write_shapes_csv(tmp_path / "other", repeats=1)
        lines = csv.read_text().splitlines()
        path, caption, label = lines[3].split(",")
        lines[3] = ",".join([path, caption + " that the teacher never saw", label])
        csv.write_text("\n".join(lines) + "\n")
        argv = from_prepared(argv, prepare(csv, tmp_path / "other-prepared"))
    missing = "image" if other == "the csv" else "caption"
    with pytest.raises(ConfigError, match=f"hold no embedding of training row \\d+'s {missing}") as error:
        run.main([*argv, "--teacher_embeddings", str(prepared)])
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--teacher_embeddings", "{tmp}/nowhere"], "no such file"),
        (["--teacher_embeddings", "{tmp}/bad.safetensors"], "is not a file of stored teacher embeddings"),
        (["--teacher_embeddings", "{tmp}", "--distill_from_pretrained", "true"], "keep one of them"),
    ],
)
def test_bad_teacher_embeddings_stop_in_one_line(tiny_clip_dir, one_batch_csv, tmp_path, extra, message):
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    extra = [value.replace("{tmp}", str(tmp_path)) for value in extra]
    with pytest.raises(ConfigError, match=message) as error:
        run.main([*distill_args(tiny_clip_dir, one_batch_csv, tmp_path / "out"), *extra])
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_a_preparation_run_refuses_training_settings_of_the_teacher(one_batch_csv, teacher_dir, tmp_path):
    with pytest.raises(ConfigError, match="preparation run"):
        prepare(one_batch_csv, tmp_path / "p", "--teacher_model_name_or_path", str(teacher_dir),
                "--distillation_weight", "0.5")  # fmt: skip


def test_the_stored_file_round_trips(tmp_path):
    store = StoredTeacherEmbeddings(
        torch.tensor([5, 9]), torch.randn(2, 4), torch.tensor([1, 2, 3]), torch.randn(3, 4), 12.5, "teacher"
    )
    path = store.save(str(tmp_path))
    (tmp_path / "other").write_text("x")
    assert os.stat(path).st_mode & 0o777 == os.stat(tmp_path / "other").st_mode & 0o777  # as readable as the others
    loaded = StoredTeacherEmbeddings.load(path)
    assert loaded.teacher == "teacher" and loaded.inverse_temperature == 12.5
    assert torch.equal(loaded.image_embeds, store.image_embeds) and torch.equal(loaded.text_embeds, store.text_embeds)
    assert json.loads(json.dumps(loaded.num_images)) == 2 and loaded.has_image(9) and not loaded.has_image(4)
