"""The checks of a run's settings that need more than one field: several argument classes, or the model's config.

Checks of one field live in the argument classes' `__post_init__`. Everything here needs no data and no weights, so
the command calls it before any data is read and the trainer at construction: a mistake stops a run in seconds, with
one line that names the key and the fix.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from transformers.trainer_utils import IntervalStrategy

from .arguments import CLIPTrainingArguments, DataArguments, ModelArguments
from .config_files import did_you_mean
from .errors import ConfigError

if TYPE_CHECKING:
    import torch


def check_arguments(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: CLIPTrainingArguments,
    text_positions: int | None,
    config: Any = None,
) -> None:
    """Every check that needs several argument classes or the model's config, but no data and no weights, so that a
    mistake stops the run in seconds. Changes nothing.

    Args:
        text_positions: the text model's `max_position_embeddings`, from its config.
        config: the model's config, for the checks of partial locking against the towers' depths.

    Raises:
        [`ConfigError`]: naming the key and the fix.
    """
    if not model_args.has_model and not data_args.prepare_only:
        raise ConfigError(
            "No model given: set `model_name_or_path` (e.g. openai/clip-vit-base-patch32) to fine-tune, "
            "`config_name` (a CLIPConfig or SiglipConfig) to train from scratch, or `vision_model_name_or_path` "
            "and `text_model_name_or_path` to join two encoders."
        )
    if data_args.prepare_only and data_args.streaming:
        raise ConfigError(
            "`prepare_only` checks every pair and writes them, images included, into one prepared folder; a stream "
            "is read as it trains and has no end to write. Drop --streaming to prepare the data (and stream the "
            "prepared folder later with --dataset_name FOLDER --streaming true), or drop --prepare_only."
        )
    if training_args.remove_unused_columns:
        # The Trainer would keep only the model's inputs; the command's collator builds them from the raw image and
        # caption columns, so every sample would arrive without its caption and the run would train on nothing.
        raise ConfigError(
            "`remove_unused_columns` is true, but the collator reads the raw image and caption columns, which the "
            "Trainer would drop; leave it false (remove --remove_unused_columns)."
        )
    has_data_source = (
        data_args.dataset_name is not None or data_args.train_file is not None or data_args.train_mixture is not None
    )
    if training_args.do_train and not has_data_source:
        raise ConfigError(
            "No training data given: set `dataset_name` (a Hub id, a prepared folder, or `emoji`) or `train_file`; "
            "or pass only --do_eval to evaluate a model."
        )
    evaluation_data = has_data_source or data_args.validation_file or data_args.clip_benchmark_dataset
    if not training_args.do_train and training_args.do_eval and not evaluation_data:
        raise ConfigError(
            "--do_eval needs evaluation data: set `validation_file`, or `dataset_name` (a Hub dataset with a "
            "validation or test split, or a prepared folder), or `clip_benchmark_dataset`."
        )
    if data_args.clip_benchmark_dataset is not None and "clip_benchmark" in (data_args.extra_eval_sets or {}):
        raise ConfigError(
            "The extra evaluation set `clip_benchmark` would report under the keys of `clip_benchmark_dataset` "
            "(eval_clip_benchmark_*); rename that set."
        )
    from_scratch = model_args.model_name_or_path is None and model_args.vision_model_name_or_path is None
    if from_scratch and model_args.has_model and not training_args.do_train:
        raise ConfigError(
            "A model built from scratch (`config_name` without `model_name_or_path`) has nothing to evaluate before "
            "it trains: add --do_train, or evaluate a trained model with `model_name_or_path`."
        )
    if training_args.push_to_hub and data_args.prepare_only:
        raise ConfigError(
            "`push_to_hub` uploads a trained model, but `prepare_only` trains none: it writes the checked data to "
            "`output_dir`. Drop --push_to_hub; to share the prepared folder, upload it as a dataset "
            "(`hf upload REPO FOLDER --repo-type dataset`)."
        )
    if training_args.push_to_hub and not training_args.do_train:
        # transformers would only fail in Trainer.__init__, after the data loaded, creating a repository named None.
        raise ConfigError(
            "`push_to_hub` uploads the trained model, but this run does not train (no --do_train): an evaluation "
            "has no trained model to publish. Drop --push_to_hub; push from the run that trains the model, or upload "
            "a folder with `hf upload`."
        )
    check_training_arguments(
        data_args,
        training_args,
        config,
        model_args=model_args,
        text_positions=text_positions,
        training=training_args.do_train,
    )
    if data_args.streaming and training_args.do_train and training_args.max_steps <= 0:
        raise ConfigError("Streaming data has no known length: set `max_steps` (e.g. --max_steps 10000).")


def check_training_arguments(
    data_args: DataArguments,
    training_args: CLIPTrainingArguments,
    config: Any = None,
    model_args: ModelArguments | None = None,
    text_positions: int | None = None,
    has_labels: bool | None = None,
    extra_sets: dict[str, bool] | None = None,
    main_set: bool = True,
    training: bool = False,
) -> None:
    """The checks the command and the trainer share: the settings against each other and against the model's config
    (caption length, early stopping, the metric that chooses the best model, the family's limits, WiSE-FT and partial
    locking, reporting, ONNX and open_clip export). [`CLIPContrastiveTrainer`] runs them at construction.

    Args:
        model_args: the command's model arguments, for what depends on where the model comes from (WiSE-FT needs a
            pretrained model); a trainer has none.
        text_positions: the text tower's positions; read from `config` when not given.
        has_labels: whether the evaluation data has class labels; by default, whether `label_column` is set.
        extra_sets: the extra evaluation sets' names and whether each has class labels; by default, those of
            `data_args.extra_eval_sets`.
        main_set: whether there is a validation split reporting `eval_*` (a trainer given a dict of evaluation sets
            has none: each reports `eval_{name}_*`).
        training: whether the run trains (a batch must then hold at least two pairs).
    """
    if text_positions is None and getattr(config, "text_config", None) is not None:
        from .modeling import max_text_positions

        text_positions = max_text_positions(config)  # what the tower reads (AltCLIP: fewer than its table's rows)
    _check_caption_length(data_args, model_args, config, text_positions)
    if training_args.train_sampling_strategy == "group_by_length":
        # transformers groups by the length of `input_ids` (or `model_input_name`) in each row; image-text rows have
        # none before the collator tokenizes them, and its sampler fails at the first step with a traceback.
        raise ConfigError(
            "`train_sampling_strategy` group_by_length groups rows by a token length that image-caption rows do not "
            "have before the collator; use random (the default) or sequential."
        )
    if training_args.early_stopping_patience is not None and training_args.eval_strategy == IntervalStrategy.NO:
        raise ConfigError(
            "`early_stopping_patience` stops on evaluations, but `eval_strategy` is no; set it to epoch or steps."
        )
    if extra_sets is None:
        extra_sets = {name: a.label_column is not None for name, a in data_args.extra_eval_data_arguments().items()}
    _check_metric_for_best_model(
        training_args,
        has_labels=data_args.label_column is not None if has_labels is None else has_labels,
        extra_sets=extra_sets,
        sigmoid_loss=_uses_sigmoid_loss(training_args, config),
        hard_negatives=data_args.hard_negative_column is not None,
        main_set=main_set,
    )
    if training:
        _check_negatives(training_args)
    _check_trainer_options(training_args)
    _check_model_family(data_args, training_args, config)
    _check_patch_dropout(training_args, config)
    _check_fine_tuning(model_args, training_args, config)
    _check_sharding(training_args)
    _check_captions(data_args)
    _check_distillation(data_args, training_args, model_args, config)
    _check_report_to(training_args.report_to)
    if training_args.save_open_clip and config is not None:
        from .converters.to_open_clip import open_clip_export_problem

        problem = open_clip_export_problem(config)
        if problem:
            raise ConfigError(f"`save_open_clip` cannot be honoured: {problem}. Drop --save_open_clip.")
    if training_args.export_onnx:
        import importlib.util

        missing = [name for name in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigError(
                f"`export_onnx` needs {', '.join(missing)}: pip install 'clip-trainer[onnx]', or drop --export_onnx."
            )


def _check_caption_length(
    data_args: DataArguments, model_args: ModelArguments | None, config: Any, text_positions: int | None
) -> None:
    """A `max_seq_length` above the text positions: the command lengthens them when it loads the model (a new tower
    is built longer; a pretrained one is stretched, if its positions are a learned table), so it asks whether it can;
    a trainer is given its model as it is, so the model must have been lengthened already."""
    length = data_args.max_seq_length
    if text_positions is None or length is None or length <= text_positions:
        return
    if model_args is None:
        raise ConfigError(
            f"`max_seq_length` is {length} but the text model has {text_positions} positions; set it to "
            f"{text_positions} or less, or lengthen the model's positions first with "
            f"`clip_trainer.extend_text_positions(model, {length}, processor.tokenizer)` (run_clip.py does it when "
            "it loads the model)."
        )
    from_scratch = model_args.model_name_or_path is None and model_args.vision_model_name_or_path is None
    if config is not None and not from_scratch:
        from .positions import check_positions_extendable

        check_positions_extendable(config, length, readable_positions=text_positions)


def _check_trainer_options(args: CLIPTrainingArguments) -> None:
    """TrainingArguments options for language models that the Trainer applies to a model with one loss and one input
    embedding: the contrastive loss is computed here, and a CLIP model has two towers."""
    if args.label_smoothing_factor:
        raise ConfigError(
            f"`label_smoothing_factor` is {args.label_smoothing_factor}, but the contrastive loss does not use it "
            "(transformers smooths the labels of its own loss only); drop it."
        )
    if args.neftune_noise_alpha is not None:
        raise ConfigError(
            "`neftune_noise_alpha` adds noise to a language model's input embeddings, which transformers cannot "
            "find in a two-tower CLIP or SigLIP model; drop it."
        )
    if args.use_liger_kernel:
        raise ConfigError(
            "`use_liger_kernel` swaps in Liger's kernels for causal language models' layers and loss, none of "
            "which a CLIP or SigLIP model has; drop it."
        )


def _check_negatives(args: CLIPTrainingArguments) -> None:
    """A contrastive batch of one pair has no negative: its loss is 0 whatever the weights, so nothing would train."""
    pairs = args.per_device_train_batch_size
    if args.gather_negatives:
        pairs *= args.world_size
    if args.accumulation_mode == "cached":
        pairs *= args.gradient_accumulation_steps
    if pairs < 2:
        raise ConfigError(
            "`per_device_train_batch_size` is 1, so each pair is contrasted with no other pair: the loss is 0 and "
            "nothing trains. Use a batch of at least 2 (CLIP trains with hundreds), or keep 1 and set "
            "`gradient_accumulation_steps` > 1 with `accumulation_mode` cached."
        )


def _uses_sigmoid_loss(args: CLIPTrainingArguments, config: Any) -> bool | None:
    """Whether the run trains with the sigmoid loss (which reports `logit_bias`); None when the model is unknown."""
    if args.loss_type != "auto":
        return args.loss_type == "sigmoid"
    from .modeling import FAMILIES

    family = FAMILIES.get(getattr(config, "model_type", None))
    return None if family is None else family.loss == "sigmoid"


def _names(name: str, metric: str) -> bool:
    """Whether the metric key `name` (without `eval_`) is `metric`, of the validation split or of a named set."""
    return name == metric or name.endswith(f"_{metric}")


def _check_metric_for_best_model(
    args: CLIPTrainingArguments,
    has_labels: bool,
    extra_sets: dict[str, bool] | None = None,
    sigmoid_loss: bool | None = None,
    hard_negatives: bool = False,
    main_set: bool = True,
) -> None:
    """Fails fast when `metric_for_best_model` names a metric that evaluation will never compute.

    `extra_sets` maps each of `extra_eval_sets` to whether it has a label column; their metrics are
    `eval_{name}_{metric}`. `sigmoid_loss`: whether the run's loss is the sigmoid one, whose evaluations also report
    `logit_bias` (None: not known, so `logit_bias` is allowed). `hard_negatives`: whether `hard_negative_column` is
    set, without which no set reports `hard_negative_accuracy`."""
    from .metrics import EMA_PREFIX, METRICS, ema_metric_name

    metric = args.metric_for_best_model
    if metric is None:
        return
    name = metric.removeprefix("eval_")
    # What every evaluation set reports, from the metric registry; the sigmoid loss adds its `logit_bias`.
    per_set = {
        m.name
        for m in METRICS
        if not m.needs_labels
        and m.greater_is_better is not None
        and (sigmoid_loss is not False or not m.sigmoid_only)
        and (hard_negatives or not m.needs_hard_negatives)
    }
    labelled_only = {m.name for m in METRICS if m.needs_labels and m.greater_is_better is not None}
    # Reported, but with no direction in which a model is better (the temperature, the majority baseline).
    directionless = {m.name for m in METRICS if m.greater_is_better is None}
    known = per_set | (labelled_only if has_labels else set())
    zeroshot_without_labels = labelled_only - known
    if not main_set:  # no validation split: only the named sets report
        known, zeroshot_without_labels = set(), set()
    if args.ema_decay is not None:  # the EMA's evaluation of the validation split: `eval_ema_{metric}`
        known |= {f"{EMA_PREFIX}_{key}" for key in known}
        zeroshot_without_labels |= {f"{EMA_PREFIX}_{key}" for key in zeroshot_without_labels}
    for set_name, labelled in (extra_sets or {}).items():
        metrics = per_set | (labelled_only if labelled else set())
        known.update(f"{set_name}_{key}" for key in metrics)
        if not labelled:
            zeroshot_without_labels.update(f"{set_name}_{key}" for key in labelled_only)
    if name in known:
        return
    problem = "which evaluation never computes"
    if ema_metric_name(name) is not None and args.ema_decay is None:
        hint = " The `eval_ema_*` metrics are the moving average's: set `ema_decay` (e.g. 0.999) to report them."
    elif name in zeroshot_without_labels:
        hint = " Zero-shot metrics need `label_column` (in the set's entry, for an extra evaluation set)."
    elif any(m.needs_hard_negatives and _names(name, m.name) for m in METRICS):
        hint = " Hard-negative accuracy needs `hard_negative_column` (and evaluation data that has it)."
    elif sigmoid_loss is False and (
        sigmoid_only := [m.name for m in METRICS if m.sigmoid_only and _names(name, m.name)]
    ):
        hint = f" `{sigmoid_only[0]}` is reported only with the sigmoid loss (`loss_type` sigmoid, or a SigLIP model)."
    elif any(_names(name, key) for key in directionless):
        problem = "which has no better direction"
        hint = " It is reported, but no value of it is better than another, so it cannot choose a checkpoint."
    else:
        hint = did_you_mean(name, sorted(known), prefix="eval_")
    raise ConfigError(
        f"`metric_for_best_model` is {metric!r}, {problem}.{hint} Choose one of: "
        + ", ".join(f"eval_{key}" for key in sorted(known))
        + "."
    )


def _check_model_family(data_args: DataArguments, args: CLIPTrainingArguments, config: Any) -> None:
    """What a family's inputs rule out. SigLIP 2 (NaFlex) keeps each image's aspect ratio, at up to `max_num_patches`
    patches: neither a crop to one fixed size nor a graph of one fixed image size fits it."""
    if getattr(config, "model_type", None) != "siglip2":
        return
    if data_args.augment:
        raise ConfigError(
            "`augment` crops every training image to one fixed size, but this SigLIP 2 model (NaFlex) takes each "
            "image at its own aspect ratio in patches, so no augmented image would fit; drop `augment` (and "
            "`color_jitter`, `grayscale_probability`), or train a CLIP or SigLIP model to augment."
        )
    if args.export_onnx:
        from .converters.to_onnx import EXPORTABLE_MODEL_TYPES

        raise ConfigError(
            "`export_onnx` writes graphs of one fixed image size, which SigLIP 2's NaFlex inputs (a varying number of "
            f"patches per image) do not fit; only {', '.join(EXPORTABLE_MODEL_TYPES)} models export. Drop "
            "--export_onnx."
        )


def _check_patch_dropout(args: CLIPTrainingArguments, config: Any) -> None:
    """Patch dropout thins the tokens of a ViT image tower: CLIP's, SigLIP's or a ViT in a dual encoder."""
    if not args.patch_dropout or config is None:
        return
    from .patch_dropout import patch_dropout_problem

    problem = patch_dropout_problem(config)
    if problem is not None:
        raise ConfigError(problem)


def _check_fine_tuning(model_args: ModelArguments | None, args: CLIPTrainingArguments, config: Any) -> None:
    """WiSE-FT, the EMA and partial locking against the model and the parallelism: a pretrained model to interpolate,
    whole weights on every process, towers deep enough."""
    wise_ft = args.wise_ft_alphas is not None or args.wise_ft_alpha is not None
    command = model_args is not None  # a trainer built in Python trains when `train()` is called
    joined = command and model_args.model_name_or_path is None and model_args.vision_model_name_or_path is not None
    if wise_ft and joined:
        raise ConfigError(
            "`wise_ft_alphas`/`wise_ft_alpha` interpolate between the pretrained and the fine-tuned model, but this "
            "model is two towers joined by new projections in this run, so there is no pretrained model of it; drop "
            "WiSE-FT (or use it when fine-tuning the saved model with `model_name_or_path`)."
        )
    if wise_ft and command and model_args.model_name_or_path is None:
        raise ConfigError(
            "`wise_ft_alphas`/`wise_ft_alpha` interpolate between the pretrained and the fine-tuned weights, but this "
            "model is trained from scratch (no `model_name_or_path`); give a pretrained model or drop WiSE-FT."
        )
    if args.lora_rank is not None and joined:
        # LoRA freezes every weight but its adapters, so the new projections would stay random.
        raise ConfigError(
            "`lora_rank` trains adapters only, but this model is two towers joined by new projections in this run, "
            "which LoRA would keep at their random start. Train the joined model without LoRA first, then "
            "fine-tune the saved model with LoRA (--model_name_or_path OUTPUT_DIR --lora_rank 8)."
        )
    if wise_ft and command and not args.do_train:
        raise ConfigError("`wise_ft_alphas`/`wise_ft_alpha` run after training; add --do_train or drop them.")
    if command and not args.do_train:
        # Options that change only how a model trains, given to a run that only evaluates.
        given = [
            f"`{key}`"
            for key, value in (
                ("lora_rank", args.lora_rank),
                ("ema_decay", args.ema_decay),
                ("patch_dropout", args.patch_dropout or None),
            )
            if value is not None
        ]
        if given:
            flags = " ".join(f'--{name.strip("`")} ""' for name in given)
            raise ConfigError(
                f"{' and '.join(given)} {'changes' if len(given) == 1 else 'change'} how a model trains, but this run "
                f"only evaluates (no --do_train); drop {'it' if len(given) == 1 else 'them'} (`{flags}` unsets a "
                "config file's), or add --do_train."
            )
    if wise_ft and command and not args.do_eval and args.eval_strategy == IntervalStrategy.NO:
        raise ConfigError(
            "WiSE-FT evaluates each interpolation, but this run does not evaluate (`eval_strategy` is no); add "
            "--do_eval, or set `eval_strategy` to epoch or steps."
        )
    if wise_ft and (args.fsdp or args.deepspeed):
        raise ConfigError(
            "WiSE-FT needs every process to hold the whole model (it loads interpolated state dicts); it does not run "
            "under FSDP or DeepSpeed. Drop `wise_ft_alphas`, and interpolate the saved model afterwards with "
            "`python -m clip_trainer.wise_ft`."
        )
    if args.ema_decay is not None and (args.fsdp or args.deepspeed):
        raise ConfigError(
            "`ema_decay` averages the whole trainable weights on every process, but FSDP and DeepSpeed shard them "
            "across processes; drop `ema_decay`, or train with DDP (torchrun without FSDP or DeepSpeed)."
        )
    for tower in ("vision", "text"):
        layers = getattr(args, f"{tower}_trainable_layers")
        if getattr(args, f"freeze_{tower}_model") and layers is not None and args.unfreeze_after_steps is None:
            # A frozen tower unfreezes to its top layers only: without `unfreeze_after_steps` none of them ever trains.
            raise ConfigError(
                f"`freeze_{tower}_model` fixes the whole {tower} tower for the run, so `{tower}_trainable_layers` "
                f"({layers}) would train nothing; drop one of them, or set `unfreeze_after_steps` to train the top "
                f"{layers} layer(s) after it."
            )
    if config is None:
        return
    for tower in ("vision", "text"):
        key = f"{tower}_trainable_layers"
        wanted = getattr(args, key)
        depth = getattr(getattr(config, f"{tower}_config", None), "num_hidden_layers", None)
        if wanted is not None and depth is not None and wanted > depth:
            raise ConfigError(
                f"`{key}` is {wanted}, but the {tower} tower has {depth} layers; set it to {depth} or less (or leave it "
                "empty to train every layer)."
            )


def _launcher_asks_for_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower() in ("1", "true", "yes", "on")


def accelerate_shards_on(device: torch.device) -> bool:
    """Whether accelerate's FSDP and DeepSpeed shard a model on `device`. accelerate (1.16) turns FSDP on for GPUs
    and other accelerators only: on the CPU it keeps the plugin unused and wraps the model in DDP, so the run would
    train whole copies while the user believes them sharded. DeepSpeed it leaves out with `use_cpu`, and without it
    counts one process where there are several. (The tests' CPU launchers teach accelerate both.)"""
    return device.type != "cpu"


def _check_sharding(args: CLIPTrainingArguments) -> None:
    """Activation checkpointing, FSDP and DeepSpeed against the features that need whole weights or a fixed graph."""
    checkpointing = getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs or {}
    reentrant = checkpointing and isinstance(kwargs, dict) and bool(kwargs.get("use_reentrant", False))
    locks = [
        key
        for key in ("freeze_vision_model", "freeze_text_model", "vision_trainable_layers", "text_trainable_layers")
        if getattr(args, key) not in (None, False)
    ]
    if args.ddp_find_unused_parameters:
        locks.append("ddp_find_unused_parameters")
    exports = [key for key in ("export_onnx", "save_open_clip") if getattr(args, key, False)]
    if exports and (args.fsdp or args.deepspeed):
        command = "export-onnx" if exports[0] == "export_onnx" else "export-open-clip"
        raise ConfigError(
            f"`{exports[0]}` exports the model from one process, but FSDP and DeepSpeed shard it across processes; "
            f"drop it, and export the saved folder afterwards: `clip-trainer {command} {args.output_dir}`."
        )
    if args.fsdp and not accelerate_shards_on(args.device):
        raise ConfigError(
            "`fsdp` is set, but this run is on the CPU, where accelerate does not shard (it would train whole copies "
            "with DDP); drop `fsdp` and `fsdp_config` to train on the CPU, or run on GPUs."
        )
    if _launcher_asks_for_fsdp() and not args.fsdp and not accelerate_shards_on(args.device):
        # `accelerate launch --use_fsdp` says so through the environment only: accelerate builds its plugin from it,
        # then stops every process at the model's preparation with a traceback, after the data is loaded.
        raise ConfigError(
            "`accelerate launch --use_fsdp` (ACCELERATE_USE_FSDP) asks for FSDP, but this run is on the CPU, where "
            "accelerate does not shard; launch without --use_fsdp (`torchrun --nproc_per_node N run_clip.py ...`, "
            "or `accelerate launch --multi_gpu --num_processes N`) to train on the CPU, or run on GPUs."
        )
    accelerator_config = getattr(args, "accelerator_config", None)
    if getattr(accelerator_config, "even_batches", True) is False:
        raise ConfigError(
            "`accelerator_config` sets even_batches false: processes would then take different numbers of batches "
            "and the gathers of the contrastive loss would not match. Leave it true: clip-trainer masks the rows "
            "accelerate repeats to even out the last batch, so they are neither trained twice nor negatives."
        )
    if args.deepspeed and not accelerate_shards_on(args.device):
        raise ConfigError(
            "`deepspeed` is set, but this run is on the CPU, where accelerate does not run DeepSpeed (it would train "
            "whole copies, or count one process of several); drop `deepspeed` to train on the CPU, or run on GPUs."
        )
    if args.deepspeed and args.unfreeze_after_steps is not None:
        raise ConfigError(
            "`unfreeze_after_steps` unfreezes a tower mid-run, but DeepSpeed takes the parameters that train when it "
            "starts and no others; drop `unfreeze_after_steps` (the tower stays frozen for the run), or train with "
            "DDP or FSDP."
        )
    deepspeed_config = getattr(args, "hf_deepspeed_config", None)
    if deepspeed_config is not None and deepspeed_config.is_zero3():
        # transformers builds a ZeRO-3 model inside `deepspeed.zero.Init`, which partitions each parameter as it is
        # made and cannot broadcast a 0-dimensional one (CLIP's `logit_scale`). Built whole instead (tried), the run
        # then stops at the loss: ZeRO-3 releases the temperature after the forward, and the loss reads it there.
        raise ConfigError(
            "The DeepSpeed config asks for ZeRO stage 3, which clip-trainer does not support (CLIP's scalar "
            "`logit_scale` cannot be partitioned as the model is built); use ZeRO stage 2, or FSDP to shard the "
            "weights too (configs/fsdp.json)."
        )
    if reentrant and args.world_size > 1 and not (args.fsdp or args.deepspeed) and locks:
        # DDP looks for the parameters a step leaves unused (frozen, locked) after the backward, and a reentrant
        # checkpoint runs its part of the backward apart, where DDP marks its parameters ready a second time.
        raise ConfigError(
            f"`gradient_checkpointing_kwargs` asks for reentrant checkpoints (`use_reentrant: true`), which DDP cannot "
            f"combine with the parameters `{locks[0]}` leaves without gradients; drop `use_reentrant` (the default "
            "non-reentrant checkpoints give the same gradients)."
        )


def _check_captions(data_args: DataArguments) -> None:
    """Several caption columns and hard negatives against the data sources that can carry them: the sources of a
    `train_mixture` are cut to their image and caption columns (so that they interleave), which would drop them."""
    if not data_args.train_mixture:
        return
    if isinstance(data_args.caption_sampling, dict):
        raise ConfigError(
            "`caption_sampling` draws from several caption columns, but a `train_mixture` keeps each source's image "
            "and caption columns only; give each image's captions as the JSON text of a list in its caption column "
            "(drawn from uniformly), or train from one source."
        )
    if data_args.hard_negative_column is not None:
        raise ConfigError(
            "`hard_negative_column` is set, but a `train_mixture` keeps each source's image and caption columns only; "
            "train from one source (merge them into one file), or drop `hard_negative_column`."
        )


def _check_distillation(
    data_args: DataArguments, args: CLIPTrainingArguments, model_args: ModelArguments | None, config: Any
) -> None:
    """A teacher (`teacher_model_name_or_path` or `distill_from_pretrained`) against the other settings; the teacher's
    config is read (not its weights), so that a wrong path or family stops the run before any data is read."""
    teachers = [
        key
        for key in ("teacher_model_name_or_path", "teacher_embeddings", "distill_from_pretrained")
        if getattr(args, key) not in (None, False)
    ]
    preparing = data_args.prepare_only
    for key in ("distillation_weight", "distillation_temperature", "distillation_intra_modal_weight"):
        if getattr(args, key) is not None and (not teachers or preparing):
            raise ConfigError(
                f"`{key}` is a training setting and this is a preparation run; give it to the run that trains."
                if preparing
                else f"`{key}` is set, but there is no teacher to distil from; set `teacher_model_name_or_path` (or "
                f"`teacher_embeddings`, `distill_from_pretrained`), or drop `{key}`."
            )
    if not teachers:
        return
    if len(teachers) > 1:
        raise ConfigError(f"{' and '.join(f'`{key}`' for key in teachers)} each name a teacher; keep one of them.")
    if preparing and args.teacher_embeddings is not None:
        raise ConfigError(
            "`teacher_embeddings` is read by a training run; a preparation run writes them with "
            "`teacher_model_name_or_path` (or `distill_from_pretrained` with `model_name_or_path`)."
        )
    if preparing and args.distill_from_pretrained and (model_args is None or model_args.model_name_or_path is None):
        raise ConfigError(
            "A preparation run with `distill_from_pretrained` embeds the data with `model_name_or_path`; give it."
        )
    if (args.fsdp or args.deepspeed) and args.teacher_embeddings is None:
        raise ConfigError(
            "A distillation teacher is held whole on every process and is not sharded by FSDP or DeepSpeed; drop "
            "`fsdp`/`deepspeed`, or the teacher (or store its embeddings with a preparation run: `teacher_embeddings`)."
        )
    command = model_args is not None  # a trainer built in Python has no model arguments
    if command and args.distill_from_pretrained and model_args.model_name_or_path is None:
        raise ConfigError(
            "`distill_from_pretrained` keeps a fine-tune near its pretrained weights, but this model is trained from "
            "scratch (no `model_name_or_path`); drop it, or give a teacher with `teacher_model_name_or_path`."
        )
    if command and not args.do_train and not preparing:
        raise ConfigError("A distillation teacher teaches during training; add --do_train, or drop the teacher.")
    if args.teacher_model_name_or_path is None:
        return
    from .distillation import load_teacher_config

    teacher = load_teacher_config(args.teacher_model_name_or_path, model_args.cache_dir if command else None)
    if teacher.model_type == "siglip2" and data_args.augment:
        raise ConfigError(
            "`augment` crops each training image to one fixed size, and the teacher is a SigLIP 2 model (NaFlex) that "
            "takes each image at its own aspect ratio, so it could not see the student's crop; drop `augment`, or "
            "distil from a CLIP or SigLIP teacher."
        )


def _check_report_to(report_to: str | list[str] | None) -> None:
    """Unknown or uninstalled loggers fail here: `Trainer.__init__` would only find out after loading data and model."""
    from transformers.integrations import is_tensorboard_available, is_wandb_available
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    known = sorted(INTEGRATION_TO_CALLBACK)
    alone = [name for name in names if name in ("none", "all")]
    if alone and len(names) > 1:
        raise ConfigError(
            f"`report_to` is {','.join(map(str, names))}: {alone[0]!r} must be alone (none logs nowhere, all to every "
            f"installed logger); give only {alone[0]!r}, or only the loggers you want."
        )
    for name in names:
        if name in (None, "none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise ConfigError(
                f"`report_to` names {name!r}, which transformers cannot log to.{did_you_mean(name, known)} Choose "
                f"from: none, all, {', '.join(known)}."
            )
    installed = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    for name, available in installed.items():
        if name in names and not available():
            extra = "pip install 'clip-trainer[wandb]'" if name == "wandb" else "pip install tensorboard"
            raise ConfigError(
                f"`report_to` includes {name}, which is not installed: {extra}, or drop it from `report_to`."
            )
