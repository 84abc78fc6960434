"""The whole run: arguments -> data -> processor and model -> trainer -> train / evaluate -> save (and push)."""

from __future__ import annotations

import logging as std_logging
import os
import sys
from pathlib import Path

import datasets
from transformers.utils import logging

from .arguments import CLIPTrainingArguments, ConfigError, DataArguments, ModelArguments, parse_arguments
from .callbacks import FreezeTowersCallback
from .collator import ImageTextCollator
from .data import load_image_text_data, save_prepared_data
from .faults import NonFiniteTrainingError, checkpoint_problems, latest_complete_checkpoint
from .hub import NETWORK_ERRORS, check_hub_access
from .model_card import non_default_training_arguments
from .modeling import image_input_size, load_clip_config, load_model, load_processor, max_text_positions
from .trainer import CLIPContrastiveTrainer, check_metric_for_best_model

logger = logging.get_logger("clip_trainer")


def setup_logging(training_args: CLIPTrainingArguments) -> None:
    """clip-trainer's own messages at INFO on the main process; the libraries at `log_level` (default: warnings)."""
    std_logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[std_logging.StreamHandler(sys.stdout)],
    )
    library_level = training_args.get_process_log_level()
    logging.set_verbosity(library_level)
    datasets.utils.logging.set_verbosity(library_level)
    logger.setLevel(std_logging.INFO if training_args.should_log else library_level)


def check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args: CLIPTrainingArguments):
    """Every check that needs no data and no weights, so that a mistake stops the run in seconds.

    Returns the model's `CLIPConfig` (loaded without weights).
    """
    config = load_clip_config(model_args)
    positions = max_text_positions(config)
    if data_args.max_seq_length is None:
        data_args.max_seq_length = positions
    elif data_args.max_seq_length > positions:
        raise ConfigError(
            f"`max_seq_length` is {data_args.max_seq_length} but the text model has {positions} positions; set it to "
            f"{positions} or less."
        )
    check_metric_for_best_model(training_args, has_labels=data_args.label_column is not None)
    check_report_to(training_args.report_to)
    if data_args.streaming and training_args.max_steps <= 0:
        raise ConfigError("Streaming data has no known length: set `max_steps` (e.g. --max_steps 10000).")
    if data_args.streaming and model_args.model_name_or_path is None and model_args.tokenizer_name is None:
        raise ConfigError(
            "A model built from scratch gets a tokenizer trained on the training captions, which a stream cannot "
            "give up front: set `tokenizer_name`, or train without `streaming`."
        )
    if training_args.push_to_hub and training_args.should_save:
        # Known before hours of training: a missing token, no network, a repository this user cannot write.
        training_args.hub_model_id = check_hub_access(training_args)
    return config


def check_report_to(report_to: str | list[str] | None) -> None:
    """Unknown or uninstalled loggers fail here: `Trainer.__init__` would only find out after loading data and model."""
    import difflib

    from transformers.integrations import is_tensorboard_available, is_wandb_available
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    known = sorted(INTEGRATION_TO_CALLBACK)
    for name in names:
        if name in (None, "none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            match = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean `{match[0]}`?" if match else ""
            raise ConfigError(
                f"`report_to` names {name!r}, which transformers cannot log to.{hint} Choose from: none, all, "
                f"{', '.join(known)}."
            )
    installed = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    for name, available in installed.items():
        if name in names and not available():
            extra = "pip install 'clip-trainer[wandb]'" if name == "wandb" else "pip install tensorboard"
            raise ConfigError(
                f"`report_to` includes {name}, which is not installed: {extra}, or drop it from `report_to`."
            )


def resolve_resume_checkpoint(training_args: CLIPTrainingArguments) -> str | None:
    """`resume_from_checkpoint`: a path, or `true` for the newest complete checkpoint in `output_dir`.

    A checkpoint a crash left half-written is passed over (`true`) or refused (a path), never loaded.
    """
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", ""):
        return None
    if str(value).lower() != "true":
        if not os.path.isdir(value):
            raise ConfigError(f"`resume_from_checkpoint` is {value!r}, which is not a folder.")
        problems = checkpoint_problems(value)
        if problems:
            newest = latest_complete_checkpoint(os.path.dirname(os.path.abspath(value)))
            hint = f"; the newest complete one beside it is {newest!r}" if newest else ""
            raise ConfigError(
                f"`resume_from_checkpoint` is {value!r}, which is incomplete ({'; '.join(problems)}){hint}."
            )
        return value
    last = latest_complete_checkpoint(training_args.output_dir)
    if last is None:
        raise ConfigError(
            f"`resume_from_checkpoint` is true but {training_args.output_dir!r} holds no checkpoint-* folder that is "
            "complete (incomplete ones are named in the warnings above); start without it, or give a checkpoint path."
        )
    logger.info(f"Resuming from {last}.")
    return last


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Runs training and/or evaluation as configured; returns the final metrics."""
    model_args, data_args, training_args = parse_arguments(argv)
    setup_logging(training_args)
    # For the model card; computed now because it builds a default TrainingArguments, which resets accelerate's
    # global state and so must not happen once the trainer exists.
    hyperparameters = non_default_training_arguments(training_args) if training_args.should_save else {}
    config = check_arguments(model_args, data_args, training_args)
    resume_checkpoint = resolve_resume_checkpoint(training_args) if training_args.do_train else None

    # --- data -------------------------------------------------------------------------------------------------
    with training_args.main_process_first(desc="loading the data"):
        data = load_image_text_data(data_args, seed=training_args.seed, cache_dir=model_args.cache_dir)
    if data_args.prepare_only:
        if training_args.should_save:
            save_prepared_data(data, data_args, training_args.output_dir)
            logger.info(
                f"Prepared data written to {training_args.output_dir}; train with --dataset_name pointing at it."
            )
        return {}

    # --- processor and model --------------------------------------------------------------------------------------
    captions = None
    if model_args.tokenizer_name is None and model_args.model_name_or_path is None:
        captions = data.train.with_format(None)[data_args.caption_column]
    processor = load_processor(model_args, config, captions)
    model = load_model(model_args, config, processor.tokenizer)
    shortest_edge, crop_size = image_input_size(processor.image_processor)
    collator = ImageTextCollator(
        tokenizer=processor.tokenizer,
        shortest_edge=shortest_edge,
        crop_size=crop_size,
        max_seq_length=data_args.max_seq_length,
        image_column=data_args.image_column,
        caption_column=data_args.caption_column,
        max_image_pixels=data_args.max_image_pixels,
        jpeg_draft=data_args.jpeg_draft,
    )

    # --- trainer ------------------------------------------------------------------------------------------------
    if data_args.streaming and training_args.accelerator_config.dispatch_batches is None:
        # accelerate's default for iterable data reads every batch on process 0 and concatenates them to dispatch
        # slices, which fails on our batches (captions padded per batch, a scalar count of skipped samples), even
        # with one process. Each process reads its own shards of the stream instead.
        training_args.accelerator_config.dispatch_batches = False
    callbacks = []
    if model_args.freeze_vision_model or model_args.freeze_text_model:
        callbacks.append(
            FreezeTowersCallback(
                model_args.freeze_vision_model, model_args.freeze_text_model, model_args.unfreeze_after_steps
            )
        )
    try:
        trainer = build_trainer(model, training_args, data, collator, processor, callbacks, data_args)
    except NETWORK_ERRORS as error:  # `push_to_hub` creates the Hub repository in Trainer.__init__
        if not training_args.push_to_hub:
            raise
        raise ConfigError(f"Cannot create the Hub repository {training_args.hub_model_id!r}: {error}") from None
    trainer.card_info = {
        "model_name": Path(training_args.output_dir).absolute().name,
        "repo_id": training_args.hub_model_id,
        "base_model": model_args.model_name_or_path,
        "dataset_name": data_args.dataset_name or data_args.train_file,
        "num_train_pairs": len(data.train) if training_args.do_train and hasattr(data.train, "__len__") else None,
        "num_eval_pairs": len(data.validation) if data.validation is not None else None,
        "hyperparameters": hyperparameters,
    }
    return run_stages(trainer, training_args, data, processor, resume_checkpoint)


def build_trainer(model, training_args, data, collator, processor, callbacks, data_args) -> CLIPContrastiveTrainer:
    return CLIPContrastiveTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train if training_args.do_train else None,
        eval_dataset=data.validation if (training_args.do_eval or training_args.eval_strategy != "no") else None,
        data_collator=collator,
        processing_class=processor,
        callbacks=callbacks,
        class_names=data.class_names,
        zeroshot_templates=data_args.zeroshot_templates,
    )


def run_stages(trainer: CLIPContrastiveTrainer, training_args, data, processor, resume_checkpoint) -> dict[str, float]:
    """Train, evaluate, document and publish, each as configured."""
    results: dict[str, float] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=resume_checkpoint)
        trainer.save_model()  # model (safetensors), config and processor in output_dir
        metrics = dict(train_result.metrics)
        metrics["train_samples"] = len(data.train) if hasattr(data.train, "__len__") else trainer.state.global_step
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results.update(metrics)
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(data.validation)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
        trainer.final_eval_metrics = metrics
    if training_args.do_eval and not training_args.do_train and training_args.should_save:
        # An evaluation-only run leaves the processor beside its results so the folder documents what was measured.
        processor.save_pretrained(training_args.output_dir)

    # --- document and publish -------------------------------------------------------------------------------------
    if training_args.should_save and training_args.do_train:
        trainer.create_model_card()  # README.md + training_curves.png in output_dir, pushed or not
    if training_args.push_to_hub and training_args.do_train:
        try:
            trainer.push_to_hub(commit_message="Upload model trained with clip-trainer")
        except NETWORK_ERRORS as error:
            raise PushError(
                f"Pushing to {training_args.hub_model_id!r} failed ({error}). The trained model is saved in "
                f"{training_args.output_dir}; upload it later with `hf upload {training_args.hub_model_id} "
                f"{training_args.output_dir}`."
            ) from None
    return results


class PushError(RuntimeError):
    """Publishing failed after the model was saved locally."""


def cli(argv: list[str] | None = None) -> int:
    """`run_clip.py`'s entry point: a configuration mistake prints one message and exits with status 2."""
    try:
        main(argv)
    except ConfigError as error:
        print(f"run_clip.py: error: {error}", file=sys.stderr)
        return 2
    except (PushError, NonFiniteTrainingError) as error:
        print(f"run_clip.py: error: {error}", file=sys.stderr)
        return 1
    return 0
