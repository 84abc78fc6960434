"""Activation checkpointing (`gradient_checkpointing`, transformers' `activation_checkpointing`) changes memory, never
the numbers: in every training mode (plain, cached accumulation, partial locking, LoRA, the softmax and the sigmoid
loss, reentrant and non-reentrant checkpoints) one optimizer step's gradients equal those without it, in float64 with
dropout on; and a run of the command with `--gradient_checkpointing true` ends at the weights of the run without.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT, TINY_VISION, build_trainer
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, SiglipConfig, SiglipModel, TrainerCallback

from clip_trainer import CLIPTrainingArguments, DataArguments, run
from clip_trainer.errors import ConfigError
from clip_trainer.validation import check_training_arguments

# Dropout on both towers: the recomputed forward of a checkpoint must draw the masks of the first one (and cached
# accumulation's second pass those of its first).
DROPOUT = {"attention_dropout": 0.2}


def _save_model(folder: Path, model, processor_dir: Path) -> Path:
    model.save_pretrained(folder)
    CLIPProcessor.from_pretrained(processor_dir, backend="pil").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dropout_models(tiny_clip_dir, tmp_path_factory) -> dict[str, Path]:
    """A tiny CLIP (softmax loss) and a tiny SigLIP (sigmoid loss) with attention dropout, each with the tiny CLIP's
    caption tokenizer and 32 px image processor."""
    text = {**CLIPConfig.from_pretrained(tiny_clip_dir).text_config.to_dict(), **DROPOUT}
    text = {key: text[key] for key in (*TINY_TEXT, "vocab_size", "max_position_embeddings", *DROPOUT)}
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config={**TINY_VISION, **DROPOUT}, projection_dim=16))
    siglip = SiglipModel(SiglipConfig(text_config=text, vision_config={**TINY_VISION, **DROPOUT}))
    root = tmp_path_factory.mktemp("dropout-models")
    return {
        "clip": _save_model(root / "clip", clip, tiny_clip_dir),
        "siglip": _save_model(root / "siglip", siglip, tiny_clip_dir),
    }


class RecordGradients(TrainerCallback):
    """Keeps the gradients of the first optimizer step (after accumulation, before clipping and the step) and stops."""

    def __init__(self) -> None:
        self.gradients: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients = {
            name: parameter.grad.detach().clone()
            for name, parameter in model.named_parameters()
            if parameter.grad is not None
        }
        control.should_training_stop = True


def _to_float64(model: torch.nn.Module) -> None:
    """The model in float64; the collator's pixels are normalised to float32, so its forward casts them."""
    model.double()

    def cast(module, args, kwargs):
        if kwargs.get("pixel_values") is not None:
            kwargs["pixel_values"] = kwargs["pixel_values"].double()
        return args, kwargs

    model.register_forward_pre_hook(cast, with_kwargs=True)


def step_gradients(
    tmp_path, model_dir, shapes_csv, checkpointing: dict | None, **options
) -> tuple[dict[str, torch.Tensor], int]:
    """The gradients of one optimizer step of the trainer (float64), with activation checkpointing (`checkpointing`:
    its keyword arguments) or without (`None`); and how often the towers' top attention layers ran (a checkpointed
    layer runs again in the backward)."""
    recorder = RecordGradients()
    if checkpointing is not None:
        options = {**options, "gradient_checkpointing": True, "gradient_checkpointing_kwargs": checkpointing}
    trainer = build_trainer(tmp_path, model_dir, shapes_csv, max_steps=1, max_grad_norm=0.0, **options)
    _to_float64(trainer.model)
    calls = []
    for name, module in trainer.model.named_modules():
        if name.endswith("encoder.layers.1.self_attn"):
            module.register_forward_hook(lambda *_: calls.append(1))
    trainer.add_callback(recorder)
    trainer.train()
    assert recorder.gradients, "no gradient was recorded"
    return recorder.gradients, len(calls)


MODES = {
    "plain": ("clip", {}),
    "cached accumulation": ("clip", {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 4}),
    "partial locking": ("clip", {"vision_trainable_layers": 1, "text_trainable_layers": 1}),
    "frozen tower": ("clip", {"freeze_vision_model": True}),
    "lora": ("clip", {"lora_rank": 2}),
    "sigmoid": ("siglip", {}),
    "sigmoid cached accumulation": ("siglip", {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 4}),
}


@pytest.mark.slow
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("mode", list(MODES))
def test_checkpointing_keeps_the_gradients(dropout_models, shapes_csv, tmp_path, mode, reentrant):
    family, options = MODES[mode]
    expected, calls = step_gradients(tmp_path / "plain", dropout_models[family], shapes_csv, None, **options)
    checkpointed, recomputed_calls = step_gradients(
        tmp_path / "ckpt", dropout_models[family], shapes_csv, {"use_reentrant": reentrant}, **options
    )
    # Checkpointing was on: each tower's top layer ran once more per micro-batch, in the backward.
    micro_batches = options.get("gradient_accumulation_steps", 1)
    assert recomputed_calls == calls + 2 * micro_batches
    assert set(checkpointed) == set(expected), "parameters that lost (or gained) a gradient"
    assert any(".layers." in name for name in expected)  # checkpointed layers train in every mode
    for name, gradient in expected.items():
        torch.testing.assert_close(checkpointed[name], gradient, rtol=1e-10, atol=1e-12, msg=name)


def _run(model_dir: Path, shapes_csv: Path, output_dir: str, *options: str) -> dict[str, torch.Tensor]:
    run.main([
        "--model_name_or_path", str(model_dir), "--train_file", str(shapes_csv), "--output_dir", output_dir,
        "--max_steps", "4", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--warmup_steps", "0",
        "--lr_scheduler_type", "constant", "--report_to", "none", "--dataloader_num_workers", "0",
        "--save_strategy", "no", "--eval_strategy", "no", "--use_cpu", "true", "--seed", "3", *options,
    ])  # fmt: skip
    return load_file(Path(output_dir) / "model.safetensors")


RUNS = {
    # CLIP's softmax loss, cached accumulation (two forwards of each micro-batch, each recomputed) and partial locking.
    "softmax": ("clip", ["--gradient_accumulation_steps", "2", "--vision_trainable_layers", "1"]),
    # SigLIP's sigmoid loss with LoRA adapters (frozen embeddings), with reentrant checkpoints.
    "sigmoid": ("siglip", ["--lora_rank", "2", "--gradient_checkpointing_kwargs", '{"use_reentrant": true}']),
}


@pytest.mark.slow
@pytest.mark.parametrize("loss", list(RUNS))
def test_command_with_checkpointing_ends_at_the_same_weights(dropout_models, shapes_csv, tmp_path, monkeypatch, loss):
    family, options = RUNS[loss]
    monkeypatch.chdir(tmp_path)
    start = load_file(dropout_models[family] / "model.safetensors")
    plain = _run(dropout_models[family], shapes_csv, "plain", *options)
    checkpointed = _run(
        dropout_models[family], shapes_csv, "checkpointed", "--gradient_checkpointing", "true", *options
    )
    assert set(checkpointed) == set(plain)
    moved = [name for name in plain if not torch.equal(plain[name], start[name])]
    assert any(".layers." in name for name in moved), "the run trained no encoder layer"
    for name, weight in plain.items():
        torch.testing.assert_close(checkpointed[name], weight, rtol=1e-5, atol=1e-6, msg=name)
    # The option reached the Trainer: the run's saved arguments have it on.
    saved = torch.load(tmp_path / "checkpointed" / "training_args.bin", weights_only=False)
    assert saved.activation_checkpointing is True


def _two_processes(monkeypatch) -> None:
    monkeypatch.setattr(CLIPTrainingArguments, "world_size", property(lambda self: 2))


@pytest.mark.parametrize("lock", [{"vision_trainable_layers": 1}, {"freeze_text_model": True}])
def test_reentrant_checkpoints_with_locked_towers_under_ddp_are_refused(tmp_path, monkeypatch, lock):
    """DDP looks for the unused (locked) parameters, and reentrant checkpoints make it mark parameters ready twice: a
    traceback at the first backward ("Expected to mark a variable ready only once"), a line before any data here."""
    _two_processes(monkeypatch)
    common = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", gradient_checkpointing=True, **lock)
    refused = CLIPTrainingArguments(**common, gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ConfigError, match=r"reentrant checkpoints .* drop `use_reentrant`"):
        check_training_arguments(DataArguments(), refused)
    # The default (non-reentrant) checkpoints, and reentrant ones without a locked tower, train under DDP.
    check_training_arguments(DataArguments(), CLIPTrainingArguments(**common))
    unlocked = {key: value for key, value in common.items() if key not in lock}
    check_training_arguments(
        DataArguments(), CLIPTrainingArguments(**unlocked, gradient_checkpointing_kwargs={"use_reentrant": True})
    )


def test_cached_accumulation_of_a_checkpointed_model_gives_the_big_batch_gradients():
    """The fast check of the default tier: the gradient cache over a model with checkpointed layers and dropout (each
    micro-batch forwarded without gradients, again with them, and its layers recomputed in the backward) gives one
    big batch's gradients, computed without checkpointing, in float64."""
    from test_gradient_cache import gradients, make_batches, make_cache, make_model

    from clip_trainer.loss import contrastive_loss

    batches = make_batches([3, 3], torch.float64)
    reference = make_model(torch.float64, dropout=0.2)
    # The big batch draws its dropout masks micro-batch by micro-batch, as the cache's forwards do.
    torch.manual_seed(7)
    outputs = [reference(**batch, return_loss=False) for batch in batches]
    images = torch.cat([output.image_embeds for output in outputs])
    texts = torch.cat([output.text_embeds for output in outputs])
    contrastive_loss(images, texts, reference.logit_scale.exp()).backward()

    model = make_model(torch.float64, dropout=0.2)
    model.activation_checkpointing_enable()  # what `Trainer.train` does for `gradient_checkpointing`
    cache = make_cache(model, per_device_batch=3, accumulation=2)
    torch.manual_seed(7)
    cache.start_step(batches)
    for batch in batches:
        cache.training_step(batch)
    expected, actual = gradients(reference), gradients(model)
    assert set(actual) == set(expected)
    for name, gradient in expected.items():
        torch.testing.assert_close(actual[name], gradient, rtol=1e-10, atol=1e-12, msg=name)
