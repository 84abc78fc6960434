"""The whole run, in pipeline order: parse -> check -> data -> processor and model -> trainer -> train / evaluate ->
document and publish."""

from __future__ import annotations

import copy
import logging as std_logging
import os
import signal
import sys
import time
from pathlib import Path

import datasets
from transformers import enable_full_determinism, set_seed
from transformers.trainer_utils import IntervalStrategy
from transformers.utils import logging

from .arguments import CLIPTrainingArguments
from .callbacks import NonFiniteTrainingError, TrainingInterrupted
from .checkpoints import (
    claim_output_dir,
    describe_save_error,
    is_save_failure,
    latest_complete_checkpoint,
    resolve_resume_checkpoint,
    saved_model_problems,
)
from .clip_benchmark import (
    DEFAULT_OUTPUT_FILENAME,
    ClipBenchmarkSet,
    clip_benchmark_record,
    evaluate_clip_benchmark,
    read_clip_benchmark_set,
    write_clip_benchmark_record,
)
from .command_line import parse_arguments
from .data import DataSource, ImageTextData, load_extra_eval_sets, load_image_text_data, save_prepared_data
from .errors import ConfigError, PublishError, SaveError
from .hub import NETWORK_ERRORS, check_hub_access
from .model_card import CLIPModelCardData
from .modeling import load_model, load_model_config, load_processor, max_text_positions
from .trainer import CLIPContrastiveTrainer
from .validation import check_arguments

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


def _evaluation_off(training_args: CLIPTrainingArguments) -> None:
    """No validation data (`validation_split_percentage` 0): the run trains without evaluating, and says so."""
    if training_args.early_stopping_patience is not None:
        raise ConfigError(
            "`early_stopping_patience` needs evaluation, but there is no validation data "
            "(`validation_split_percentage` is 0); give a `validation_file` or a percentage, or drop early stopping."
        )
    if training_args.wise_ft_alphas is not None or training_args.wise_ft_alpha is not None:
        raise ConfigError(
            "WiSE-FT chooses its interpolation on the validation data, but there is none "
            "(`validation_split_percentage` is 0); give a `validation_file` or a percentage, or drop `wise_ft_alphas`."
        )
    logger.warning("No validation data: evaluation, `eval_on_start` and `load_best_model_at_end` are off.")
    training_args.eval_strategy = IntervalStrategy.NO
    training_args.do_eval = False
    training_args.eval_on_start = False
    training_args.load_best_model_at_end = False


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Runs training and/or evaluation as configured; returns the final metrics."""
    # --- arguments: everything that can be checked without data or weights ----------------------------------------
    model_args, data_args, training_args = parse_arguments(argv)
    setup_logging(training_args)
    # A preparation run needs no model: it checks and stores the pairs.
    config = load_model_config(model_args) if model_args.has_model else None
    positions = max_text_positions(config) if config is not None else None
    check_arguments(model_args, data_args, training_args, positions, config=config)
    training = training_args.do_train and not data_args.prepare_only
    if training_args.push_to_hub and training_args.should_save and training:
        # Known before hours of training: a missing token, no network, a repository this user cannot write.
        training_args.hub_model_id = check_hub_access(training_args)
    resume_checkpoint = None
    if training:
        resume_checkpoint = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    output_lock = None
    if training_args.should_save:
        # Checked before any data is read, whatever the run writes (a model, evaluation results, prepared data), and
        # held until the run ends: a second run into the same folder stops here instead of deleting or resuming this
        # run's checkpoints.
        output_lock = claim_output_dir(
            training_args.output_dir,
            resuming=resume_checkpoint is not None,
            overwrite=training_args.overwrite_output_dir,
            training=training,
            evaluating=not training and not data_args.prepare_only,
        )
    try:
        return _run(model_args, data_args, training_args, config, training, resume_checkpoint, argv)
    finally:
        if output_lock is not None:
            output_lock.release()


def _store_teacher_embeddings(teacher: str, data_args, training_args, model_args, config) -> None:
    """A preparation run with a teacher: its embeddings of the prepared training split, written beside it (read back
    by a training run's `teacher_embeddings`)."""
    from datasets import load_from_disk

    from .distillation import Teacher, store_teacher_embeddings

    model = Teacher.from_pretrained(
        teacher,
        cache_dir=model_args.cache_dir,
        attn_implementation=model_args.attn_implementation,
        max_seq_length=data_args.max_seq_length,
    ).to(training_args.device)
    train = load_from_disk(os.path.join(training_args.output_dir, "train"))
    store = store_teacher_embeddings(
        train, data_args, model, teacher, batch_size=training_args.per_device_eval_batch_size
    )
    path = store.save(training_args.output_dir)
    logger.info(f"Teacher embeddings written to {path}; train with --teacher_embeddings {training_args.output_dir}.")


def _run(model_args, data_args, training_args, config, training: bool, resume_checkpoint: str | None, argv):
    # A preparation run writes both splits, whatever the later runs do with them.
    evaluate = training_args.do_eval or training_args.eval_strategy != IntervalStrategy.NO or data_args.prepare_only
    # Before anything random: the held-out split, the tokenizer trained on the captions, a new model's weights.
    # (`Trainer.__init__` seeds again, too late for the model.)
    if training_args.full_determinism:
        enable_full_determinism(training_args.seed)
    else:
        set_seed(training_args.seed)

    # The processor of a given model or tokenizer needs no data: loaded first, a folder without one stops the run
    # before the data loads. A new tokenizer is trained on the training captions, below.
    needs_captions = model_args.tokenizer_name is None and model_args.model_name_or_path is None
    processor = None
    if not needs_captions and not data_args.prepare_only:
        processor = load_processor(model_args, config)

    # --- data -----------------------------------------------------------------------------------------------------
    benchmark = None
    if data_args.clip_benchmark_dataset is not None and not data_args.prepare_only:
        # Its small files are read now, so that a mistake in them stops the run before the data and the model load.
        benchmark = read_clip_benchmark_set(
            data_args.clip_benchmark_dataset, data_args.clip_benchmark_split, data_args.clip_benchmark_task
        )
    pair_sources = ("dataset_name", "train_file", "validation_file", "train_mixture")
    if benchmark is not None and all(getattr(data_args, key) is None for key in pair_sources):
        # An evaluation on the CLIP_benchmark set alone (the argument checks allow no training without pairs).
        data = ImageTextData(
            train=None,
            validation=None,
            source=DataSource("local", benchmark.name, f"the CLIP_benchmark dataset `{benchmark.name}`"),
        )
        evaluate = training_args.do_eval = training_args.eval_on_start = training_args.load_best_model_at_end = False
        training_args.eval_strategy = IntervalStrategy.NO
    else:
        with training_args.main_process_first(desc="loading the data"):
            data = load_image_text_data(
                data_args,
                seed=training_args.seed,
                cache_dir=model_args.cache_dir,
                train=training_args.do_train,
                evaluate=evaluate,
            )
    if data_args.prepare_only:
        if training_args.should_save:
            data.dropped_rows.merge(save_prepared_data(data, data_args, training_args.output_dir))
            data.dropped_rows.write(training_args.output_dir)
            teacher = training_args.teacher_model_name_or_path or (
                model_args.model_name_or_path if training_args.distill_from_pretrained else None
            )
            if teacher is not None and data.train is not None:
                _store_teacher_embeddings(teacher, data_args, training_args, model_args, config)
            logger.info(
                f"Prepared data written to {training_args.output_dir}; train with --dataset_name pointing at it."
            )
        return {}
    if evaluate and data.validation is None:
        _evaluation_off(training_args)
    extra_eval_sets = {}
    if data.validation is not None and (training_args.do_eval or training_args.eval_strategy != IntervalStrategy.NO):
        with training_args.main_process_first(desc="loading the extra evaluation sets"):
            extra_eval_sets = load_extra_eval_sets(
                data_args,
                seed=training_args.seed,
                cache_dir=model_args.cache_dir,
                report=data.shard_report,
                dropped=data.dropped_rows,
            )

    # --- processor and model --------------------------------------------------------------------------------------
    if processor is None and resume_checkpoint is not None:
        processor = _checkpoint_processor(model_args, config, resume_checkpoint)
    if processor is None:
        # A new tokenizer for a new model, trained on the training captions (a stream's first 100,000).
        processor = load_processor(model_args, config, data.training_captions(data_args.caption_column))
    # A `max_seq_length` above the text positions lengthens them here, once, before the trainer sees the model.
    model = load_model(model_args, config, processor.tokenizer, max_seq_length=data_args.max_seq_length)

    # --- trainer --------------------------------------------------------------------------------------------------
    from .model_card import data_description, evaluation_origin, given_settings

    card = CLIPModelCardData(
        model_name=Path(training_args.output_dir).absolute().name,
        repo_id=training_args.hub_model_id,
        base_model=model_args.model_name_or_path,
        dataset_id=data.source.hub_id,
        dataset_description=data_description(data.source),
        hyperparameters=given_settings(sys.argv[1:] if argv is None else argv, data_args, model_args, training_args),
        num_dropped_rows=data.dropped_rows.count or None,
        **evaluation_origin(data_args, data.validation, training=training_args.do_train),
    )
    try:
        trainer = CLIPContrastiveTrainer(
            model=model,
            args=training_args,
            data_args=data_args,
            train_dataset=data.train,
            eval_dataset=data.validation if training_args.do_eval or training_args.eval_strategy != "no" else None,
            processing_class=processor,
            model_card_data=card,
            extra_eval_datasets=extra_eval_sets,
        )
    except NETWORK_ERRORS as error:  # `push_to_hub` creates the Hub repository in Trainer.__init__
        if not training_args.push_to_hub:
            raise
        raise ConfigError(f"Cannot create the Hub repository {training_args.hub_model_id!r}: {error}") from None
    try:
        return run_stages(
            trainer,
            data,
            resume_checkpoint,
            benchmark=benchmark,
            pretrained=_weights_origin(model_args, training_args),
        )
    except Exception as error:
        # Checkpoints, the final model, the card: a full or read-only disk is one line that says what was kept.
        if is_save_failure(error):
            raise SaveError(describe_save_error(error, training_args.output_dir)) from None
        raise


def _checkpoint_processor(model_args, config, checkpoint: str):
    """The processor of a resumed run that trained its own caption tokenizer: the checkpoint's tokenizer (saved with
    each checkpoint), never one trained again. A tokenizer trained again gives the same captions other ids whenever
    the captions seen differ (another `seed`, `max_train_samples` or data), so the saved weights would be read through
    a scrambled vocabulary, or not load at all (another vocabulary size)."""
    from .modeling import TOKENIZER_FILES

    if not any(os.path.isfile(os.path.join(checkpoint, name)) for name in TOKENIZER_FILES):
        raise ConfigError(
            f"{checkpoint} holds no tokenizer ({TOKENIZER_FILES[0]}), and this run trains its own: resuming needs the "
            "one the checkpoint was trained with. Give it with --tokenizer_name, or start a new run in a new "
            "--output_dir."
        )
    # A copy, not `dataclasses.replace`: that would check the arguments again, and `tokenizer_vocab_size` with a
    # `tokenizer_name` is refused there.
    given = copy.copy(model_args)
    given.tokenizer_name = checkpoint
    processor = load_processor(given, config)
    logger.info(
        f"Resuming: the caption tokenizer is {checkpoint}'s ({len(processor.tokenizer)} tokens), not trained again."
    )
    return processor


def _weights_origin(model_args, training_args: CLIPTrainingArguments) -> str:
    """Where the evaluated weights come from, for CLIP_benchmark's `pretrained`: the run's output folder when it
    trains, else the model it was given."""
    if training_args.do_train:
        return training_args.output_dir
    if model_args.model_name_or_path is not None:
        return model_args.model_name_or_path
    return f"{model_args.vision_model_name_or_path} + {model_args.text_model_name_or_path}"


def run_stages(
    trainer: CLIPContrastiveTrainer,
    data: ImageTextData,
    resume_checkpoint: str | None,
    benchmark: ClipBenchmarkSet | None = None,
    pretrained: str = "",
) -> dict[str, float]:
    """Train, evaluate (the validation split, then `benchmark`), then save (the model, its ONNX graphs, the card, the
    push: the trainer's final save), each as configured.

    A Ctrl-C after training (the trainer turns one during training into a checkpoint) leaves with the problems of the
    trained model's files in `output_dir` as `trained_model_problems` (none: it was saved whole), for the message."""
    args = trainer.args
    results: dict[str, float] = {}
    if args.should_save:  # every row left out before training, named, beside the results that count them
        data.dropped_rows.write(args.output_dir)
    if args.do_train:
        results.update(_train_stage(trainer, data, resume_checkpoint))
    trained_at = time.time()
    try:
        results.update(_evaluate_and_save_stages(trainer, data, benchmark, pretrained))
    except KeyboardInterrupt as interrupt:
        if args.do_train and args.should_save:
            interrupt.trained_model_problems = saved_model_problems(args.output_dir, since=trained_at)
            interrupt.output_dir = args.output_dir
        raise
    return results


def _train_stage(trainer: CLIPContrastiveTrainer, data: ImageTextData, resume_checkpoint: str | None) -> dict:
    args = trainer.args
    # The LoRA merge and WiSE-FT are part of the trainer's `train`.
    train_result = trainer.train(resume_from_checkpoint=resume_checkpoint)
    metrics = dict(train_result.metrics)
    if hasattr(data.train, "__len__"):
        metrics["train_samples"] = len(data.train)
    else:  # a stream: the samples drawn, every optimizer step a full batch on every process
        batch = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
        metrics["train_samples"] = trainer.state.global_step * batch
    # Samples left out as unusable (a corrupt image counts each time it is drawn), over every process: what the
    # warnings named during the run, in its summary.
    skipped = trainer.skipped_training_samples()
    if skipped:
        metrics["skipped_samples"] = skipped
    if data.dropped_rows.count:  # rows left out before training (`dropped_rows.jsonl` names them)
        metrics["dropped_rows"] = data.dropped_rows.count
    report = data.shard_report
    if report is not None and report.summary():
        # What was left out of a web-scale run goes in its summary, not only in a warning hours earlier.
        metrics["skipped_shards"] = report.skipped_shards
        metrics["truncated_shards"] = len(report.truncated)
        metrics["skipped_shard_samples"] = report.skipped_samples
        logger.warning(f"Data: {report.summary()}.")
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics


def _evaluate_and_save_stages(
    trainer: CLIPContrastiveTrainer, data: ImageTextData, benchmark: ClipBenchmarkSet | None, pretrained: str
) -> dict[str, float]:
    args = trainer.args
    results: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    if args.do_eval:
        try:
            metrics = trainer.evaluate()
        except BaseException:
            if args.do_train:
                trainer.save_model()  # the trained weights are kept whatever stopped the evaluation
            raise
        metrics["eval_samples"] = len(data.validation)
        if data.dropped_rows.count and not args.do_train:  # an evaluation alone: its results count them
            metrics["eval_dropped_rows"] = data.dropped_rows.count
        for name, dataset in trainer.extra_eval_datasets.items():
            metrics[f"eval_{name}_samples"] = len(dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
        eval_metrics = metrics
    if benchmark is not None:
        try:
            metrics = clip_benchmark_stage(trainer, benchmark, pretrained)
        except BaseException:
            if args.do_train:
                trainer.save_model()
            raise
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", {**eval_metrics, **metrics})
        results.update(metrics)
    if not args.do_train and (args.do_eval or benchmark is not None) and args.should_save:
        # An evaluation-only run leaves the processor beside its results: the folder documents what was measured.
        trainer.processing_class.save_pretrained(args.output_dir)
    if args.do_train:
        # model.safetensors, config and processor; onnx/ with `export_onnx`; README.md, training_curves.png and
        # retrieval_examples.png; the upload with `push_to_hub`.
        trainer.save_model()
    return results


def clip_benchmark_stage(trainer: CLIPContrastiveTrainer, benchmark: ClipBenchmarkSet, pretrained: str) -> dict:
    """Scores the trainer's model on a CLIP_benchmark set as the run evaluates (its batch size, workers, caption
    length and padding, precision) and writes CLIP_benchmark's results JSON; returns the `eval_clip_benchmark_*`
    metrics.

    Every process computes the same (the set is read whole by each): no gather, and a sharded model (ZeRO-3, FSDP)
    takes part in every forward; the main process writes."""
    args, data_args = trainer.args, trainer.data_args
    model = trainer.accelerator.unwrap_model(trainer.model)
    logger.info(f"Evaluating on the CLIP_benchmark set {benchmark.root} ({benchmark.split} split, {benchmark.task}).")
    result = evaluate_clip_benchmark(
        trainer.model,
        trainer.processing_class,
        benchmark,
        batch_size=args.eval_batch_size,
        num_workers=args.dataloader_num_workers,
        max_seq_length=trainer.max_seq_length,
        text_padding=trainer.text_padding,
        context=trainer.compute_loss_context_manager,
        max_image_pixels=data_args.max_image_pixels,
        on_bad_rows=data_args.on_bad_rows,
        recall_ks=data_args.clip_benchmark_recall_k,
        chunk_size=args.retrieval_chunk_size,
    )
    if args.should_save:
        path = data_args.clip_benchmark_output or os.path.join(args.output_dir, DEFAULT_OUTPUT_FILENAME)
        write_clip_benchmark_record(clip_benchmark_record(result, benchmark, type(model).__name__, pretrained), path)
        logger.info(f"CLIP_benchmark results written to {path}.")
    return result.run_metrics()


def _close_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # Every process reaches the end first: the main one may still be writing the card and the files when the
        # others return, and a process that tears its connections down while a peer's are open can abort in gloo's
        # threads (seen once in CI, on the process that finished first).
        dist.barrier()
        dist.destroy_process_group()


def _what_was_saved(interrupt: KeyboardInterrupt) -> str:
    """What an interrupted run left (see `run_stages`): during training a second signal stops at once, after training
    the trained model may or may not be saved whole."""
    problems = getattr(interrupt, "trained_model_problems", None)
    if problems is None:
        return "nothing was saved since the last checkpoint."
    if not problems:
        return (
            f"training had ended, and the trained model is saved in {interrupt.output_dir}; what the run writes after "
            "it (the evaluation's results, the model card and its pictures, ONNX graphs, the upload) may be missing."
        )
    not_whole = (
        f"training had ended, but the trained model in {interrupt.output_dir} is not whole ({'; '.join(problems)})"
    )
    checkpoint = latest_complete_checkpoint(interrupt.output_dir)
    if checkpoint is None:
        return f"{not_whole}, and the run has no checkpoint: train it again with `--overwrite_output_dir true`."
    return f"{not_whole}. {checkpoint} holds the weights saved last: `--resume_from_checkpoint true` finishes the run."


def cli(argv: list[str] | None = None, prog: str = "run_clip.py") -> int:
    """`run_clip.py`'s entry point: a mistake or a fault prints one message, never a traceback.

    Exit status: 0 done; 1 training stopped (non-finite losses, a failed push or save); 2 a configuration or data
    mistake; 130 / 143 stopped by SIGINT / SIGTERM after saving a checkpoint (128 + the signal, as shells report).
    """
    try:
        main(argv)
        # The command owns its process: under torchrun it leaves the process group as it found it (none). A process
        # that exits with gloo's threads still running can abort in their destructors ("terminate called without an
        # active exception") after its work is done. Only after a run that ended well: a failed one may have a
        # collective in flight that a teardown would wait on.
        _close_process_group()
    except ConfigError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    # What stops a run while it trains starts on a new line: the progress bar's line ends without one.
    except (PublishError, SaveError, NonFiniteTrainingError) as error:
        print(f"\n{prog}: error: {error}", file=sys.stderr)
        return 1
    except TrainingInterrupted as error:
        print(f"\n{prog}: {error}", file=sys.stderr)
        return 128 + error.signal_number
    except KeyboardInterrupt as error:
        number = getattr(error, "signal_number", signal.SIGINT)
        how = "Ctrl-C" if number == signal.SIGINT else signal.Signals(number).name
        print(f"\n{prog}: interrupted ({how}); {_what_was_saved(error)}", file=sys.stderr)
        return 128 + number
    return 0
