"""`CLIPContrastiveTrainer`: `transformers.Trainer` with CLIP's contrastive loss and retrieval evaluation."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from accelerate.utils import DistributedType
from datasets import Dataset, IterableDataset
from torch import nn
from torch.utils.data import DataLoader
from transformers import (
    AutoConfig,
    CLIPModel,
    EarlyStoppingCallback,
    Trainer,
    TrainerState,
    enable_full_determinism,
    set_seed,
)
from transformers.integrations.integration_utils import TensorBoardCallback, default_logdir
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import TrainOutput, speed_metrics
from transformers.utils import logging

from .arguments import CLIPTrainingArguments, ConfigError, DataArguments
from .augmentation import ImageAugmentation
from .callbacks import (
    NonFiniteLossCallback,
    StopOnSignalCallback,
)
from .checkpoints import share_saved_weights
from .collator import TEACHER_PREFIX, ImageTextCollator
from .consumers import write_consumer_files
from .distillation import StoredTeacher, StoredTeacherEmbeddings, Teacher
from .evaluation import (
    DEFAULT_ZEROSHOT_TEMPLATES,
    RetrievalEvaluator,
    embed_batch,
    embed_batch_with_hard_negatives,
    hard_negative_scores,
    text_encoder,
)
from .lora import ADAPTER_DIRNAME, apply_lora, is_lora_model, merged_copy, merged_from_state_dict
from .losses import ContrastiveLoss, DistillationLoss, build_loss, inverse_temperature
from .metrics import EMA_PREFIX, ema_metric_name
from .model_card import CLIPModelCardData, non_default_training_arguments, write_model_card
from .modeling import TOWERS, model_family, tower_layers
from .plots import save_training_plots
from .preprocessing import ImagePreprocessor, UnsupportedImageProcessorError
from .stream import check_shard_split, enable_stream_resume
from .threads import check_thread_policy
from .trainable import TrainableParameters, TrainableParametersCallback, layerwise_lr_scales

logger = logging.get_logger(__name__)

# The key of `trainer_state.json`'s `stateful_callbacks` that keeps the count of training samples left out so far.
SKIPPED_SAMPLES_STATE = "SkippedTrainingSamples"


def clip_training_arguments(args) -> CLIPTrainingArguments:
    """`CLIPTrainingArguments` from a plain `transformers.TrainingArguments`: every field is taken as it is, except
    `remove_unused_columns`, which is turned off (the collator reads the raw image and caption columns, which the
    Trainer would drop); clip-trainer's own options take their defaults."""
    from transformers import TrainingArguments

    if not isinstance(args, TrainingArguments):
        raise ConfigError(
            f"`args` is a {type(args).__name__}; give `CLIPTrainingArguments` (or a `transformers.TrainingArguments`)."
        )
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(TrainingArguments) if field.init}
    values["remove_unused_columns"] = False
    metric = args.metric_for_best_model
    if metric is not None and args.greater_is_better == (not metric.endswith("loss")):
        # transformers filled it in as "greater is better" for any metric not ending in "loss" (it cannot tell that
        # the user did not): left for clip-trainer's rule, which knows a median rank is lower-better.
        values["greater_is_better"] = None
    return CLIPTrainingArguments(**values)


def no_weight_decay_parameter_names(model: nn.Module) -> set[str]:
    """Parameters CLIP trains without weight decay: biases, norm weights, embeddings and `logit_scale`.

    One-dimensional parameters cover biases, LayerNorm weights, `class_embedding` and `logit_scale`; `nn.Embedding`
    tables (token and position embeddings) are added by type. The patch projection, a convolution, is decayed like
    any other projection (as in open_clip).
    """
    names = {name for name, parameter in model.named_parameters() if parameter.ndim < 2}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            names.update(f"{module_name}.{name}" if module_name else name for name, _ in module.named_parameters())
    return names


def step_schedule(warmup_steps: int, step_size: int, gamma: float):
    """Linear warmup, then the learning rate times `gamma` every `step_size` steps (the seed's StepLR)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return gamma ** ((step - warmup_steps) // step_size)

    return factor


# The keys of a model's config that say nothing about its weights: left out when a resume compares them.
_CONFIG_METADATA_KEYS = {
    "transformers_version",
    "_name_or_path",
    "architectures",
    "dtype",
    "torch_dtype",
    "_commit_hash",
}


def _flat_config(config: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in config.items():
        if key in _CONFIG_METADATA_KEYS:
            continue
        if isinstance(value, dict):
            flat.update(_flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _saved_weight_shapes(checkpoint: str) -> dict[str, tuple[int, ...]] | None:
    """The name and shape of each tensor in a checkpoint's `model.safetensors` (or its shards), read from the
    headers alone; `None` for a layout without them (FSDP, DeepSpeed, a LoRA adapter)."""
    import json

    from safetensors import safe_open

    index = os.path.join(checkpoint, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
    elif os.path.isfile(os.path.join(checkpoint, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        return None
    shapes = {}
    for name in files:
        with safe_open(os.path.join(checkpoint, name), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def _model_resume_problem(checkpoint: str, model: nn.Module) -> str | None:
    """Why `model` cannot load `checkpoint`'s weights (another model config: tensors of other shapes, or another
    family), naming the config keys that differ; `None` when it can (or the checkpoint holds no whole model)."""
    import json

    if is_lora_model(model):
        return None  # the checkpoint holds the adapter, compared by `_lora_resume_problem`
    if os.path.isfile(os.path.join(checkpoint, "latest")):
        return None  # DeepSpeed's engine loads its own states (and ZeRO-3 leaves the model's tensors empty until then)
    saved = _saved_weight_shapes(checkpoint)
    if saved is None:
        return None
    current = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    mismatched = sorted(name for name in saved.keys() & current.keys() if saved[name] != current[name])
    before = {}
    try:
        # Through the config class, so that the keys `save_pretrained` leaves out at their defaults are compared too.
        before = json.loads(AutoConfig.from_pretrained(checkpoint).to_json_string(use_diff=False))
    except (OSError, ValueError, KeyError):  # no config.json, or one of a family this transformers does not know
        config_path = os.path.join(checkpoint, "config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as handle:
                before = json.load(handle)
    now = json.loads(model.config.to_json_string(use_diff=False))
    other_family = before.get("model_type", now.get("model_type")) != now.get("model_type")
    if not mismatched and not other_family:
        return None
    flat_before, flat_now = _flat_config(before), _flat_config(now)
    # The keys both configs have: one that only one has is a default written by another transformers version.
    differing = sorted(key for key in flat_before.keys() & flat_now.keys() if flat_before[key] != flat_now[key])
    if other_family:
        what = f"`model_type` {before.get('model_type')!r} in the checkpoint, {now.get('model_type')!r} in this run"
    elif differing:
        shown = [f"{key} ({flat_before[key]} -> {flat_now[key]})" for key in differing[:6]]
        more = f" and {len(differing) - 6} more" if len(differing) > 6 else ""
        what = f"model config {', '.join(shown)}{more}"
    else:  # the same config, other shapes: the weights say what differs
        shown = [f"{name} {list(saved[name])} -> {list(current[name])}" for name in mismatched[:3]]
        what = f"weights {', '.join(shown)}"
    return (
        f"{checkpoint} holds another model than this run builds ({what}), so its weights cannot be loaded. Resume "
        "with the model settings it was trained with (`config_name` or `model_name_or_path`, `max_seq_length`), or "
        "train this model into a new --output_dir."
    )


def _lora_resume_problem(checkpoint: str, rank: int | None) -> str | None:
    """Why a run with `lora_rank` `rank` (or without LoRA) cannot load `checkpoint`: a LoRA run's checkpoint holds
    its adapter (`adapter_config.json`, with the rank `r`), any other run's the whole model."""
    import json

    from .checkpoints import ADAPTER_CONFIG_NAME

    path = os.path.join(checkpoint, ADAPTER_CONFIG_NAME)
    fix = "Resume with the settings it was trained with, or start this run in a new --output_dir."
    if not os.path.isfile(path):
        if rank is None or not os.path.isfile(os.path.join(checkpoint, "config.json")):
            return None
        return f"{checkpoint} holds a whole model (trained without LoRA), and this run sets `lora_rank` {rank}. {fix}"
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle).get("r")
    if rank is None:
        return (
            f"{checkpoint} holds a LoRA adapter (`lora_rank` {saved}), and this run sets no `lora_rank`: "
            f"resume with --lora_rank {saved}, or start this run in a new --output_dir."
        )
    if saved != rank:
        return (
            f"{checkpoint} holds a LoRA adapter of `lora_rank` {saved}, and this run sets {rank}: resume with "
            f"--lora_rank {saved}, or start this run in a new --output_dir."
        )
    return None


class CLIPContrastiveTrainer(Trainer):
    """A `transformers.Trainer` for CLIP models trained on image-caption pairs.

    - `compute_loss` is CLIP's symmetric cross-entropy over normalised embeddings ([`contrastive_loss`]); with several
      processes and `gather_negatives` each process contrasts its pairs against the global batch; with gradient
      accumulation and `accumulation_mode="cached"` against the whole accumulated batch ([`GradientCache`]).
    - The optimizer applies no weight decay to biases, norms, embeddings and `logit_scale`; `logit_scale` is clamped at
      `log(max_logit_scale)` after every step; the temperature is logged.
    - Evaluation collects the embeddings of the whole validation set (across processes) with the loss, and hands them
      to the set's [`RetrievalEvaluator`] (`trainer.evaluators`, one per evaluation set), which reports retrieval
      recall and, when the evaluation data has class labels (a `_label` `ClassLabel` column, see
      [`load_image_text_data`]), zero-shot accuracy next to `eval_loss`, so `metric_for_best_model` and early
      stopping can use them. The same evaluator scores a model alone, with no trainer.
    - With `ema_decay`, a moving average of the trainable weights ([`EMACallback`]) is kept, checkpointed, evaluated
      beside the weights (`eval_ema_*`) and saved as the model when `metric_for_best_model` is one of its metrics.
    - Images arrive from [`ImageTextCollator`] as `uint8`; they are normalised on the device by the same
      [`ImagePreprocessor`], read from `processing_class.image_processor`.
    - With a teacher (`teacher_model_name_or_path`, or `distill_from_pretrained` for a frozen copy of the starting
      model), training adds `distillation_weight x` the KL divergence from the teacher's similarity distributions over
      the batch to the student's ([`distillation_loss`], gathered and cached like the contrastive loss); the teacher
      ([`Teacher`], `trainer.teacher`) runs frozen on each device, and the collator makes its own inputs.

    Everything the run needs is set up here from the arguments: the default collator, the freeze, clamp, non-finite,
    signal and early-stopping callbacks, and `dispatch_batches=False` for streamed (iterable) training data.

    Args:
        model: a `CLIPModel`.
        args ([`CLIPTrainingArguments`]): the training arguments.
        data_collator (*optional*): defaults to an [`ImageTextCollator`] built from `processing_class`.
        train_dataset, eval_dataset: rows of images and captions (`image`, `caption` columns by default).
        processing_class: the `CLIPProcessor` (tokenizer + image processor); saved with the model.
        data_args ([`DataArguments`], *optional*): the data settings the default collator follows (columns, caption
            length, pixel limit, draft decoding, augmentation); defaults to `DataArguments()`.
        model_card_data ([`CLIPModelCardData`], *optional*): what the model card says about the run's origin and
            data; the metrics, curves and arguments come from the trainer itself.
        extra_eval_datasets (`dict[str, Dataset]`, *optional*): more evaluation sets by name (validation splits as
            [`load_image_text_data`] returns them). Every evaluation reports each as `eval_{name}_{metric}` beside
            the validation split's `eval_{metric}`, in one log entry, so any of them can drive
            `metric_for_best_model` and early stopping.
        Other arguments are those of `transformers.Trainer`.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: CLIPTrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        model_card_data: CLIPModelCardData | None = None,
        callbacks=None,
        extra_eval_datasets: dict | None = None,
        data_args: DataArguments | None = None,
        **kwargs,
    ) -> None:
        # --- args -----------------------------------------------------------------------------------------------------
        if args is None:
            args = CLIPTrainingArguments(output_dir="clip-trainer-output")
        if not isinstance(args, CLIPTrainingArguments):
            args = clip_training_arguments(args)
        if isinstance(train_dataset, IterableDataset | torch.utils.data.IterableDataset):
            if args.accelerator_config.dispatch_batches is None:
                # accelerate's default for iterable data reads every batch on process 0 and concatenates them to
                # dispatch slices, which needs equal shapes (captions are padded per batch). Each process reads its
                # own shards of the stream instead.
                args.accelerator_config.dispatch_batches = False
        # For the model card, computed before the Trainer builds its accelerator: it builds a default
        # TrainingArguments, which must not reset the state of an accelerator that exists.
        self.card_hyperparameters = non_default_training_arguments(args) if args.should_save else {}
        self.model_card_data = model_card_data or CLIPModelCardData()
        # --- model ----------------------------------------------------------------------------------------------------
        if model is None or not hasattr(model, "logit_scale"):
            name = type(model).__name__ if model is not None else "None"
            raise ConfigError(
                f"{name} has no `logit_scale`; CLIPContrastiveTrainer trains CLIPModel, SiglipModel, Siglip2Model "
                "and VisionTextDualEncoderModel."
            )
        self.family = model_family(model.config)
        # Built before the Trainer, so that a loss the model cannot train with is refused first.
        self.contrastive_loss: ContrastiveLoss = build_loss(model, self.family, args)
        # WiSE-FT interpolates from the weights before training (of the model without adapters, for LoRA).
        self.pretrained_weights = None
        if args.wise_ft_alphas is not None or args.wise_ft_alpha is not None:
            if eval_dataset is None:
                raise ConfigError(
                    "WiSE-FT chooses its interpolation on evaluation data, and the trainer has no `eval_dataset`; "
                    "give one, or drop `wise_ft_alphas` / `wise_ft_alpha`."
                )
            from .wise_ft import weights_of

            self.pretrained_weights = weights_of(model)
        # Distillation: `distill_from_pretrained` teaches with the weights as they are now, copied before LoRA wraps
        # them; the teacher itself is built once the settings are checked (below).
        self.distillation = DistillationLoss.from_arguments(args)
        pretrained_copy = copy.deepcopy(model) if args.distill_from_pretrained else None
        if args.lora_rank is not None and not is_lora_model(model):
            # The adapters' initial weights follow the seed, however the caller left the random state.
            enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
            model = apply_lora(model, args)
        per_layer = (args.vision_trainable_layers, args.text_trainable_layers, args.layerwise_lr_decay)
        if any(option is not None for option in per_layer):
            try:  # the towers' layers are known for this model family (before any data is read into batches)
                for tower in TOWERS:
                    tower_layers(model, tower)
            except ValueError as error:
                raise ConfigError(str(error)) from None
        # --- data -----------------------------------------------------------------------------------------------------
        image_processor = getattr(processing_class, "image_processor", None)
        if image_processor is None or getattr(processing_class, "tokenizer", None) is None:
            raise ConfigError("`processing_class` must be a CLIPProcessor (tokenizer + image processor).")
        try:
            self.image_preprocessor = ImagePreprocessor.from_image_processor(image_processor)
        except UnsupportedImageProcessorError as error:
            raise ConfigError(str(error)) from None
        if args.save_open_clip and getattr(model.config, "model_type", None) == "clip":
            from .converters.to_open_clip import open_clip_preprocess_config

            # Known now rather than after the run: a preprocessing that open_clip's preprocess_cfg cannot express.
            try:
                open_clip_preprocess_config(image_processor, model.config.vision_config.image_size)
            except ConfigError as error:
                raise ConfigError(f"`save_open_clip` cannot be honoured: {error} Drop --save_open_clip.") from None
        # --- the data a script gives, as the command makes it ---------------------------------------------------------
        from .data import LABEL_COLUMN, check_given_columns, prepared_for_evaluation

        given_data_args = data_args if data_args is not None else DataArguments()
        # A collator of the caller's may read columns of its own: the columns are checked against `data_args` only
        # when the trainer builds the collator from them.
        own_collator = self._checks_given_columns = data_collator is None
        # A dataset's fingerprint -> the dataset, given to `evaluate` or `predict`, prepared (see below).
        self._prepared_evaluation_sets: dict[str, object] = {}
        if isinstance(train_dataset, Dataset) and own_collator:
            check_given_columns(train_dataset, "training", given_data_args)
        # Evaluation sets get the command's image ids (rows of one image are one image) and class labels.
        eval_dataset = prepared_for_evaluation(eval_dataset, given_data_args, check=own_collator)
        if extra_eval_datasets:
            extra_eval_datasets = prepared_for_evaluation(extra_eval_datasets, given_data_args, check=own_collator)
        # --- the settings against each other and against the model (as the command checks them) -----------------
        from .validation import check_training_arguments

        def labelled(dataset) -> bool:
            return LABEL_COLUMN in (getattr(dataset, "column_names", None) or [])

        # A dict of evaluation sets reports each as `eval_{name}_*`, and no `eval_*` of its own.
        named_sets = {**(eval_dataset if isinstance(eval_dataset, dict) else {}), **(extra_eval_datasets or {})}
        # Class labels: in a dataset given (prepared), or promised by `label_column` for a set not given in memory.
        labels_promised = data_args is not None and data_args.label_column is not None
        has_labels = labelled(eval_dataset) or labelled(train_dataset)
        has_labels = has_labels or (labels_promised and not isinstance(eval_dataset, Dataset))
        check_training_arguments(
            given_data_args,
            args,
            model.config,
            has_labels=has_labels,
            extra_sets={name: labelled(dataset) for name, dataset in named_sets.items()} if named_sets else None,
            main_set=not isinstance(eval_dataset, dict),
            training=train_dataset is not None,
        )
        # The teacher, frozen on this process's device; one with its own processor has its inputs made by the collator.
        self.teacher: Teacher | None = None
        if args.teacher_model_name_or_path is not None:
            self.teacher = Teacher.from_pretrained(args.teacher_model_name_or_path)
        elif args.teacher_embeddings is not None:  # stored by a preparation run: no teacher model runs
            self.teacher = StoredTeacher(StoredTeacherEmbeddings.load(args.teacher_embeddings))
        elif pretrained_copy is not None:
            self.teacher = Teacher(pretrained_copy, self.image_preprocessor)
        if self.teacher is not None:
            self.teacher.to(args.device)
        # The data settings the collator reads (columns, caption length, pixel limit, draft decoding, augmentation):
        # a library user gets exactly what `run_clip.py` builds from the same `DataArguments`.
        self.data_args = data_args if data_args is not None else DataArguments()
        if isinstance(self.teacher, StoredTeacher):
            if isinstance(train_dataset, Dataset):  # a stream is checked row by row, by the collator
                self.teacher.store.check_covers(train_dataset, self.data_args)
        train_dataset = self._with_caption_sampling(train_dataset, args)
        positions = model.config.text_config.max_position_embeddings
        if data_collator is None:
            data_collator = ImageTextCollator(
                tokenizer=processing_class.tokenizer,
                image_preprocessor=self.image_preprocessor,
                max_seq_length=self.data_args.max_seq_length
                or min(positions, processing_class.tokenizer.model_max_length),
                image_column=self.data_args.image_column,
                caption_column=self.data_args.caption_column,
                max_image_pixels=self.data_args.max_image_pixels,
                jpeg_draft=self.data_args.jpeg_draft,
                # SigLIP's text tower pools at the last position: its captions are always padded to one length.
                padding=self.family.text_padding,
                augmentation=ImageAugmentation.from_data_arguments(self.data_args),
                image_id_column=self.data_args.image_id_column,
                hard_negative_column=self.data_args.hard_negative_column,
                teacher=self.teacher.processing if self.teacher is not None else None,
                teacher_embeddings=self.teacher.store if isinstance(self.teacher, StoredTeacher) else None,
            )
        elif (
            self.teacher is not None
            and self.teacher.processing is not None
            and isinstance(data_collator, ImageTextCollator)
        ):
            if data_collator.teacher is None:  # a collator of the caller's: it makes the teacher's inputs too
                data_collator = dataclasses.replace(data_collator, teacher=self.teacher.processing)
        elif isinstance(self.teacher, StoredTeacher) and isinstance(data_collator, ImageTextCollator):
            if data_collator.teacher_embeddings is None:  # a collator of the caller's: it looks them up too
                data_collator = dataclasses.replace(data_collator, teacher_embeddings=self.teacher.store)
        # Each training row's augmentation is seeded by the run's seed, the epoch and the row (see augmentation.py).
        train_dataset = self._with_augmentation_seeds(train_dataset, args, data_collator)
        # Zero-shot prompts are tokenized as the collator tokenizes captions (SigLIP: padded to its one length).
        self.text_padding = getattr(data_collator, "padding", self.family.text_padding)
        self.max_seq_length = getattr(data_collator, "max_seq_length", positions)
        self.trainable_parameters = TrainableParameters.from_arguments(model, args)
        if args.ddp_find_unused_parameters is None:
            # Every parameter that requires a gradient gets one, unless the policy freezes some after DDP wraps the
            # model: DDP's search for unused ones is then wasted work, and it warns about it on every process.
            # (A SigLIP model trained with the softmax loss keeps its `logit_bias` out of the loss, and frozen.)
            args.ddp_find_unused_parameters = not self.trainable_parameters.is_default
        if args.device.type == "cpu":
            # A script that imported torch before clip_trainer is told how to get the thread policy (threads.py).
            check_thread_policy()
        if args.dataloader_pin_memory and args.device.type == "cpu":
            # Pinned memory only speeds copies to an accelerator; on the CPU torch warns once per DataLoader.
            args.dataloader_pin_memory = False
            args.accelerator_config.non_blocking = False  # (without pinned memory a non-blocking copy warns)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            **kwargs,
        )
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
                # TensorBoard's folder is chosen at `on_train_begin`; an evaluation-only run never gets there and its
                # writer would default to ./runs in the working folder. Events go into output_dir/runs either way.
                callback.logging_dir = os.path.join(args.output_dir, default_logdir())
        # FSDP2 and DeepSpeed shard what the Trainer prepares; what in these models stops them (see the function).
        self._scalar_parameters = []
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            self._scalar_parameters = _prepare_for_sharding(self.model, fsdp=self.is_fsdp_enabled)
        # --- loss -----------------------------------------------------------------------------------------------------
        # The loss is ours: the model is never asked for one.
        self.model_accepts_loss_kwargs = False
        for callback in self.contrastive_loss.callbacks():  # CLIP's clamp of the inverse temperature
            self.add_callback(callback)
        self._loss_relations = self._check_loss_relations()
        # Patch dropout (FLIP): a hook on the image tower's embeddings while training, off in evaluation; its draws
        # are keyed to the optimizer step, so that a resumed run keeps the patches the uninterrupted one kept.
        from .patch_dropout import attach_patch_dropout

        self.patch_dropout = attach_patch_dropout(self.model, self.args)
        if self.patch_dropout is not None:
            self.patch_dropout.step = lambda: self.state.global_step
        self._decoded_images_decided = False  # whether the training images are kept decoded (image_cache.py)
        # Added after the Trainer's reporters, so that their `on_train_end` runs before these raise (when they stopped
        # the run). The signal callback goes first: it restores the process's handlers before it raises.
        self.add_callback(StopOnSignalCallback())
        self.nonfinite_guard = NonFiniteLossCallback(self.args.max_nonfinite_steps)
        self.add_callback(self.nonfinite_guard)
        self.gradient_cache = None
        if self.args.gradient_accumulation_steps > 1 and self.args.accumulation_mode == "cached":
            from .gradient_cache import GradientCache

            self.gradient_cache = GradientCache(
                embed=self._embed_for_loss,
                loss_scalars=self.loss_scalars,
                loss=self.contrastive_loss,
                backward=self._backward,
                micro_batch_size=self.args.per_device_train_batch_size,
                accumulation_steps=self.args.gradient_accumulation_steps,
                # The second forward of a micro-batch keeps the patches its first kept.
                random_sources=[self.patch_dropout] if self.patch_dropout is not None else None,
            )
        if self.gradient_cache is not None and self.teacher is not None:
            # The teacher's embeddings are constants of the accumulated batch, embedded with each micro-batch.
            self.gradient_cache.loss = self._with_distillation(self.gradient_cache.loss)
            self.gradient_cache.constants = self._with_teacher_embeddings(self.gradient_cache.constants)
        self._distillation_sum: torch.Tensor | None = None
        self._distillation_count = 0
        # --- callbacks ------------------------------------------------------------------------------------------------
        # Which parameters train: LoRA, partial locking and tower freezing, composed by one policy.
        if not self.trainable_parameters.is_default:
            self.add_callback(TrainableParametersCallback(self.trainable_parameters))
        if self.args.early_stopping_patience is not None:
            if any(isinstance(c, EarlyStoppingCallback) for c in self.callback_handler.callbacks):
                raise ConfigError(
                    "`early_stopping_patience` adds an EarlyStoppingCallback, and `callbacks` has one already: two "
                    "would count on their own and the stricter would stop the run. Keep one of them."
                )
            self.add_callback(
                EarlyStoppingCallback(self.args.early_stopping_patience, self.args.early_stopping_threshold)
            )
        # The moving average of the trainable weights (`ema_decay`), updated after the clamp of the temperature.
        self.ema_callback = None
        if self.args.ema_decay is not None:
            from .ema import EMACallback, ema_parameter_names

            names = ema_parameter_names(self.model, self.trainable_parameters)
            self.ema_callback = EMACallback(self.args.ema_decay, names)
            self.add_callback(self.ema_callback)
        # A stream's position is saved with every checkpoint, so that a resumed run continues at the same sample.
        self.stream_position = None
        if isinstance(train_dataset, IterableDataset):
            if self.args.process_index == 0:  # the same shards and sizes on every process: said once
                check_shard_split(train_dataset, self.args.world_size, self.args.dataloader_num_workers)
            self.stream_position = enable_stream_resume(self)
        # --- metrics --------------------------------------------------------------------------------------------------
        self.zeroshot_templates = list(self.args.zeroshot_templates or DEFAULT_ZEROSHOT_TEMPLATES)
        # Device tensors once training runs (see `training_step`); read at logging steps only.
        self._skipped_samples: int | torch.Tensor = 0
        self._repeated_rows = 0  # rows accelerate repeated to fill an uneven epoch's last round, masked; not skipped
        self._skipped_before_resume = 0  # over every process, up to the checkpoint a resumed run started from
        self.skipped_samples_total: int | None = None
        self._eval_loss_parts: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._samples_since_log = 0
        self._flops_since_log = 0
        self._tower_weights: tuple[int, int] | None = None
        self._last_log_time: float | None = None
        self._finite_loss_sum: torch.Tensor | None = None
        self._finite_loss_count: torch.Tensor | None = None
        self._eval_buffer: dict[str, list[torch.Tensor]] | None = None
        self._last_evaluation: dict | None = None
        # --- evaluation sets ------------------------------------------------------------------------------------------
        self.extra_eval_datasets = dict(extra_eval_datasets or {})
        # Evaluation batches are never augmented: `Trainer` has one collator for training and evaluation.
        self.eval_data_collator = self.data_collator
        if dataclasses.is_dataclass(self.data_collator) and getattr(self.data_collator, "augmentation", None):
            self.eval_data_collator = dataclasses.replace(self.data_collator, augmentation=None)
        if isinstance(self.eval_data_collator, ImageTextCollator) and self.eval_data_collator.row_image_ids:
            # Evaluation rows are one image each unless the set says otherwise (its `_image_id`), as before.
            self.eval_data_collator = dataclasses.replace(self.eval_data_collator, row_image_ids=False)
        if dataclasses.is_dataclass(self.eval_data_collator) and getattr(self.eval_data_collator, "teacher", None):
            # Nor do they need the teacher's inputs: distillation is a training term (`eval_loss` is the contrastive
            # loss alone, comparable with runs without a teacher).
            self.eval_data_collator = dataclasses.replace(self.eval_data_collator, teacher=None)
        if dataclasses.is_dataclass(self.eval_data_collator) and getattr(
            self.eval_data_collator, "teacher_embeddings", None
        ):
            self.eval_data_collator = dataclasses.replace(self.eval_data_collator, teacher_embeddings=None)
        self._eval_loaders: dict[str | None, DataLoader] = {}
        # The collated batches of each evaluation set, kept after its first evaluation (CPU runs, see
        # `EvaluationBatches`): later evaluations of the same set skip decoding and the workers' start.
        self._eval_batches: dict[str | None, EvaluationBatches] = {}
        # One evaluator per evaluation set, by metric prefix (`eval`, `eval_{name}`): the evaluation loop gathers the
        # embeddings (with the loss) and hands them to the evaluator of the set, which computes its metrics.
        self.evaluators: dict[str, RetrievalEvaluator] = {}
        named = self.eval_dataset if isinstance(self.eval_dataset, dict) else {}
        if self.eval_dataset is not None and not named:
            self.evaluators["eval"] = self._new_evaluator(self.eval_dataset, None)
        for name, dataset in {**named, **self.extra_eval_datasets}.items():
            self.evaluators[f"eval_{name}"] = self._new_evaluator(dataset, name)
        # Set by `clip_trainer.wise_ft.run_wise_ft` after training, for the model card.
        self.wise_ft_result = None

    # ------------------------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`, followed by the LoRA merge and WiSE-FT when the arguments ask for them, and with two changes
        to resuming from a checkpoint:

        - a checkpoint that already ends the run trains nothing. transformers 5.24 resumes mid-epoch by skipping the
          trained batches and then takes one step before it checks `max_steps`, so a finished run "resumed" would
          train a step more than it was asked to. Here the checkpoint's weights (or its best ones, with
          `load_best_model_at_end`) and state are loaded and nothing is trained;
        - a streamed run restores the stream's saved position (see `stream.py`) instead of replaying the stream up
          to the checkpoint, which the Trainer decides before any callback runs.
        """
        self._warn_if_shared_memory_is_small()
        if resume_from_checkpoint is True:
            # As the command resolves it (transformers' `get_last_checkpoint` would take a half-written checkpoint
            # that a crash left newest), here so that the checkpoint's settings are checked below.
            from .checkpoints import resolve_resume_checkpoint

            resume_from_checkpoint = resolve_resume_checkpoint(True, self.args.output_dir)
        if self.ema_callback is not None:
            checkpoint = resume_from_checkpoint
            self.ema_callback.resume_from = checkpoint if isinstance(checkpoint, str) else None
        if isinstance(resume_from_checkpoint, str) and os.path.isdir(resume_from_checkpoint):
            self._check_resumable_settings(resume_from_checkpoint)
            state = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME))
            planned = self._planned_steps()
            if planned is not None and state.global_step >= planned:
                logger.info(
                    f"{resume_from_checkpoint} is at step {state.global_step}, the end of this run: nothing to train."
                )
                # The state the run ended with, when it got as far as saving it: the checkpoint's lacks what came
                # after its save (an evaluation at the epoch's end), and the best model chosen from it.
                state = _finished_state(self.args.output_dir, state) or state
                best = state.best_model_checkpoint if self.args.load_best_model_at_end else None
                # The Trainer's own loader (safetensors, sharded or not); it has no public one.
                self._load_from_checkpoint(best if best and os.path.isdir(best) else resume_from_checkpoint)
                self.state = state
                self._finish_training()
                # The figures of the training that made this model, when its run wrote them (the checkpoint holds
                # no `train_loss`: it is logged after the last save); never a NaN, which is no JSON.
                metrics = _finished_train_metrics(self.args.output_dir)
                return TrainOutput(state.global_step, metrics.get("train_loss", float("nan")), metrics)
        if self.patch_dropout is not None and not self.patch_dropout.attached:  # a second `train()`
            self.patch_dropout.attach(self.model)
        if self.stream_position is None or not resume_from_checkpoint:
            output = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
        else:
            with self.stream_position.resuming(self, resume_from_checkpoint):
                output = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
        self._finish_training()
        return output

    def _warn_if_shared_memory_is_small(self) -> None:
        """DataLoader workers hand each batch to the main process through shared memory (`/dev/shm` on Linux); a
        batch that does not fit there stalls the run with no error (torch's main process waits for ever: Docker's
        default `/dev/shm` is 64 MB). When the batches in flight could take half of it, one warning says so first,
        with the two ways out."""
        workers = self.args.dataloader_num_workers
        collator = self.data_collator
        preprocessor = getattr(collator, "image_preprocessor", None)
        if not workers or preprocessor is None or not os.path.isdir("/dev/shm"):
            return
        try:
            free = shutil.disk_usage("/dev/shm").free
        except OSError:
            return
        image_bytes = preprocessor.placeholder().nbytes  # uint8 pixels at the model's input size
        prefetch = self.args.dataloader_prefetch_factor or 2
        batches = self.args.per_device_train_batch_size + self.args.per_device_eval_batch_size  # both loaders' workers
        in_flight = workers * prefetch * batches * image_bytes
        if in_flight > free / 2:
            logger.warning(
                f"Shared memory (/dev/shm) has {free / 2**20:,.1f} MiB free, and {workers} DataLoader worker(s) can "
                f"hold about {in_flight / 2**20:,.1f} MiB of batches in it: a batch that does not fit stalls the run "
                "without an error. Give it more room (Docker: `docker run --shm-size 2g`), or pass "
                "--dataloader_num_workers 0 to load in the main process."
            )

    def _finish_training(self) -> None:
        """What follows the last step, before anything is saved: with `ema_decay`, the moving average goes into the
        model when `metric_for_best_model` is an `eval_ema_*` metric; a LoRA model goes on merged (its adapter saved in
        `output_dir/adapter`), so that what is evaluated, interpolated and saved is what `from_pretrained` loads;
        then WiSE-FT (`wise_ft_alphas`, `wise_ft_alpha`) chooses and loads its interpolation of the weights chosen.
        Patch dropout's hook comes off first: the model evaluated, exported and saved is the plain model."""
        if self.patch_dropout is not None:
            self.patch_dropout.detach()
        if self.ema_callback is not None:
            best = self.state.best_model_checkpoint if self.args.load_best_model_at_end else None
            self.ema_callback.choose_saved_weights(
                self.model,
                self.args.metric_for_best_model,
                best if best and os.path.isdir(best) else None,
                self.ema_callback.resume_from,
            )
            if ema_metric_name(self.args.metric_for_best_model) is not None:
                # Early stopping is over, and the evaluations after training score the saved model alone (no
                # `eval_ema_*`): it would warn at each of them that its metric is missing.
                self.remove_callback(EarlyStoppingCallback)
        adapter_dir = self.merge_lora()
        if self.pretrained_weights is not None:
            from .wise_ft import run_wise_ft

            result = run_wise_ft(self, self.pretrained_weights)
            if adapter_dir is not None and result.alpha != 1 and self.args.should_save:
                from .lora import scale_saved_adapter

                # The adapter saved beside the model describes the model saved: the interpolation chosen.
                scale_saved_adapter(adapter_dir, result.alpha)

    def _load_callback_state(self) -> None:
        """On resume, early stopping goes on counting where the checkpoint left it (its evaluations without
        improvement, saved in `trainer_state.json`), so that a resumed run stops where the uninterrupted one would.
        transformers restores callback states only with `restore_callback_states_from_checkpoint`, and then rebuilds
        each callback from the checkpoint's arguments, which would undo a patience changed on the command line: the
        counter alone is restored here, under the run's own patience.

        The count of training samples left out as unusable goes on from the checkpoint's too (see
        `_save_checkpoint`), so that `skipped_samples` counts the whole run."""
        skipped = self.state.stateful_callbacks.pop(SKIPPED_SAMPLES_STATE, None)  # no callback of transformers'
        if skipped is not None:
            self._skipped_before_resume = int(skipped.get("attributes", {}).get("skipped_samples", 0))
        super()._load_callback_state()
        stored = self.state.stateful_callbacks.get("EarlyStoppingCallback")
        if self.args.restore_callback_states_from_checkpoint or not stored:
            return
        stored = stored[0] if isinstance(stored, list) else stored
        counter = stored.get("attributes", {}).get("early_stopping_patience_counter")
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, EarlyStoppingCallback) and counter is not None:
                callback.early_stopping_patience_counter = int(counter)
                logger.info(f"Early stopping goes on from {counter} evaluation(s) without improvement.")

    def _save_checkpoint(self, model, trial):
        # The training samples left out so far, over every process (every process saves, so the sum is collective),
        # kept with the state so that a resumed run counts on from them (see `_load_callback_state`).
        skipped = self.skipped_training_samples()
        self.state.stateful_callbacks[SKIPPED_SAMPLES_STATE] = {"args": {}, "attributes": {"skipped_samples": skipped}}
        return super()._save_checkpoint(model, trial)

    def _check_resumable_settings(self, checkpoint: str) -> None:
        """Refuses, in one line, a setting that a checkpoint's weights or optimizer state cannot follow.

        The model (its config) and LoRA (`lora_rank`, or none) decide which weights the checkpoint holds and their
        shapes: changed on resume, loading them is a traceback of size mismatches or a missing file deep in the
        Trainer. `layerwise_lr_decay` decides the optimizer's parameter groups and their rates: changed on resume, the
        saved state either does not load (another number of groups: a traceback deep in torch) or silently brings back
        the old rates (the same number of groups). `ema_decay` is the decay of the average saved beside the weights,
        which the run would continue with another decay (or drop, or start from nothing).
        """
        from .checkpoints import UNKNOWN, saved_training_argument
        from .ema import ema_resume_problem

        problem = _lora_resume_problem(checkpoint, self.args.lora_rank) or _model_resume_problem(
            checkpoint, self.model
        )
        if problem:
            raise ConfigError(problem)
        problem = ema_resume_problem(checkpoint, self.args.ema_decay)
        if problem:
            raise ConfigError(problem)
        before, now = saved_training_argument(checkpoint, "layerwise_lr_decay"), self.args.layerwise_lr_decay
        if before is not UNKNOWN and before != now:
            raise ConfigError(
                f"{checkpoint} was trained with `layerwise_lr_decay` {before}, and this run sets {now}: the "
                "optimizer's saved state holds the old per-layer rates. Resume with the same value, or start a new "
                "run from the checkpoint's weights (`model_name_or_path` pointing at it)."
            )

    def _planned_steps(self) -> int | None:
        """The optimizer steps this run is to take: `max_steps`, or the epochs times the steps of one epoch."""
        if self.args.max_steps > 0:
            return self.args.max_steps
        if self.train_dataset is None or not hasattr(self.train_dataset, "__len__"):
            return None
        batches = math.ceil(len(self.train_dataset) / (self.args.train_batch_size * self.args.world_size))
        if self.args.dataloader_drop_last:
            batches = len(self.train_dataset) // (self.args.train_batch_size * self.args.world_size)
        accumulation = self.args.gradient_accumulation_steps
        per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
        return math.ceil(self.args.num_train_epochs * per_epoch)

    # ------------------------------------------------------------------------------------------------------------
    # Optimizer and schedule
    # ------------------------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """AdamW (or any `optim`) with two groups: decayed weights, and biases/norms/embeddings/`logit_scale`.

        Written here because `Trainer.create_optimizer` decays embeddings and `logit_scale` and leaves out parameters
        that are frozen now, which could then never be unfrozen.
        """
        if self.optimizer is not None:
            return self.optimizer
        model = self.model
        no_decay = no_weight_decay_parameter_names(model)
        named = list(model.named_parameters())
        if self.is_deepspeed_enabled:
            # DeepSpeed's ZeRO optimizer takes the parameters that train when it starts and no others, fails on a
            # group left without any, and would apply weight decay to a locked parameter it holds (its gradient is
            # zeros there, not missing). It gets those the policy trains at step 0 (a tower unfrozen later is refused
            # with DeepSpeed).
            self.trainable_parameters.apply(model, step=0)
            named = [(name, parameter) for name, parameter in named if parameter.requires_grad]
        groups = [
            {"params": [p for n, p in named if n not in no_decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0},
        ]
        if self.args.layerwise_lr_decay is not None:
            groups = self._layerwise_groups(groups)
        elif self.is_deepspeed_enabled:
            groups = [group for group in groups if group["params"]]
        if self.args.optim == "adam":
            optimizer_cls = torch.optim.Adam
            optimizer_kwargs = {
                "lr": self.args.learning_rate,
                "betas": (self.args.adam_beta1, self.args.adam_beta2),
                "eps": self.args.adam_epsilon,
            }
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _layerwise_groups(self, groups: list[dict]) -> list[dict]:
        """Each weight-decay group split by learning rate (`layerwise_lr_decay`), the full rate first (the rate the
        Trainer logs is the first group's). Empty groups are dropped."""
        scales = layerwise_lr_scales(self.model, self.args.layerwise_lr_decay)
        split = []
        for scale in sorted(set(scales.values()), reverse=True):
            for group in groups:
                params = [p for p in group["params"] if scales[id(p)] == scale]
                if params:
                    split.append({**group, "params": params, "lr": self.args.learning_rate * scale})
        rates = {}
        for group in split:
            rates[group["lr"]] = rates.get(group["lr"], 0) + sum(p.numel() for p in group["params"])
        logger.info(
            f"Layer-wise learning rates (decay {self.args.layerwise_lr_decay}): "
            + ", ".join(f"{rate:.3g} for {count:,} parameters" for rate, count in rates.items())
            + "."
        )
        return split

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """Adds the seed project's step schedule (`lr_scheduler_type=step`) to transformers' schedules."""
        if self.args.lr_scheduler_type != "step":
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            optimizer = optimizer or self.optimizer
            factor = step_schedule(
                self.args.get_warmup_steps(num_training_steps), self.args.lr_step_size, self.args.lr_step_gamma
            )
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------
    @property
    def loss_type(self) -> str:
        """The loss trained with, as `loss_type` names it (`auto` resolved): `softmax` or `sigmoid`."""
        return self.contrastive_loss.name

    def inverse_temperature(self) -> torch.Tensor:
        """`exp(logit_scale)`, the inverse temperature `t` (logits are `t * cosine`, plus SigLIP's bias), with its
        gradient; a scalar, whatever shape the model keeps it in (SigLIP: `(1,)`)."""
        return inverse_temperature(self.model)

    def embed(self, model: nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image and text embeddings of a batch, in float32 for the loss.

        uint8 pixels from the collator are normalised here, on their device, as the image processor would have.
        """
        if self.teacher is not None:  # the teacher's inputs are not the model's
            inputs = {key: value for key, value in inputs.items() if not key.startswith(TEACHER_PREFIX)}
        # The evaluator embeds a model alone with the same function: the same inputs inside a run and out of it.
        return embed_batch(model, inputs, self.image_preprocessor)

    def _embed_for_loss(self, inputs: dict) -> tuple[torch.Tensor, ...]:
        with self.compute_loss_context_manager():
            image_embeds, text_embeds, *hard = self.embed_with_hard_negatives(self.model_wrapped, inputs)
        # The gradient cache caches the hard negatives' gradients too, when the batch has them.
        return (image_embeds, text_embeds) if hard[0] is None else (image_embeds, text_embeds, *hard)

    def loss_scalars(self) -> tuple[torch.Tensor, ...]:
        """The differentiable scalars the loss takes besides the embeddings: the inverse temperature, and with the
        sigmoid loss the learned `logit_bias`."""
        return self.contrastive_loss.scalars(self.model)

    def _backward(self, loss: torch.Tensor) -> None:
        kwargs = {}
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            # As in `Trainer.training_step`: our loss is already the step's share, DeepSpeed must not divide it.
            kwargs["scale_wrt_gas"] = False
        self.accelerator.backward(loss, **kwargs)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        image_embeds, text_embeds, hard_negatives, hard_negative_valid = self.embed_with_hard_negatives(model, inputs)
        batch_size = self.args.per_device_train_batch_size if model.training else self.args.per_device_eval_batch_size
        loss = self.contrastive_loss(
            image_embeds,
            text_embeds,
            *self.loss_scalars(),
            pad_to=max(batch_size, image_embeds.shape[0]),
            valid=inputs.get("valid"),
            **{
                key: value
                for key, value in _row_relations(inputs, hard_negatives, hard_negative_valid).items()
                if key in self._loss_relations
            },
        )
        if self.teacher is not None and model.training:
            loss = loss + self._distillation_term(
                image_embeds,
                text_embeds,
                *self.teacher_embeddings(inputs).values(),
                self.inverse_temperature(),
                pad_to=max(batch_size, image_embeds.shape[0]),
                valid=inputs.get("valid"),
            )
        if return_outputs:
            outputs = {"image_embeds": image_embeds, "text_embeds": text_embeds}
            if hard_negatives is not None:  # for `eval_hard_negative_accuracy`: one score per row, gathered
                outputs.update(
                    hard_negative_scores(
                        image_embeds, hard_negatives, hard_negative_valid, inputs.get("hard_negative_is_caption")
                    )
                )
            return loss, outputs
        return loss

    def embed_with_hard_negatives(
        self, model: nn.Module, inputs: dict
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """[`embed`], and the batch's hard negatives `(batch, k, dim)` with their validity `(batch, k)` (`None` for a
        batch without `hard_negative_index`), from the same forward."""
        return embed_batch_with_hard_negatives(model, inputs, self.image_preprocessor)

    def _with_caption_sampling(self, train_dataset, args: CLIPTrainingArguments):
        """A loaded training set whose images have several captions, wrapped to draw one per image and epoch (see
        `clip_trainer.captions`); any other training set as it is."""
        from .captions import CaptionSampledDataset, needs_caption_sampling

        if not needs_caption_sampling(train_dataset, self.data_args):
            return train_dataset
        if args.train_sampling_strategy != "random":
            raise ConfigError(
                f"`train_sampling_strategy` is {args.train_sampling_strategy}, but the training images have several "
                "captions, drawn one per image and epoch by clip-trainer's own sampler; use random, or "
                "`caption_sampling` all."
            )
        seed = args.data_seed if args.data_seed is not None else args.seed
        return CaptionSampledDataset.from_arguments(train_dataset, self.data_args, seed)

    def _with_augmentation_seeds(self, train_dataset, args: CLIPTrainingArguments, data_collator):
        """When the collator augments: a loaded training set wrapped, or a stream mapped, so that each row carries
        the seed of its augmentation (see `clip_trainer.augmentation`), a draw that a resumed run repeats exactly. A
        set that draws captions per epoch seeds its rows itself; any other training set is returned as it is."""
        from .captions import AugmentationSeededRows, seed_stream_augmentation
        from .stream import record_source, source_of

        if getattr(data_collator, "augmentation", None) is None or train_dataset is None:
            return train_dataset
        seed = args.data_seed if args.data_seed is not None else args.seed
        if isinstance(train_dataset, Dataset):
            return AugmentationSeededRows(train_dataset, seed)
        if isinstance(train_dataset, IterableDataset):
            image_column = getattr(data_collator, "image_column", self.data_args.image_column)
            image_id_column = getattr(data_collator, "image_id_column", self.data_args.image_id_column)
            seeded = seed_stream_augmentation(train_dataset, seed, image_column, image_id_column)
            source = source_of(train_dataset)
            if source is not None:  # what the stream reads, for its saved position (see stream.py)
                record_source(seeded, source)
            return seeded
        return train_dataset

    def _check_loss_relations(self) -> set[str]:
        """What the loss takes besides the embeddings (a loss class written for an older clip-trainer may take no image
        ids or hard negatives): refuses hard negatives it cannot use, warns when rows of one image will be negatives."""
        from .gradient_cache import RELATION_KEYWORDS, accepted_keywords

        accepted = accepted_keywords(self.contrastive_loss, RELATION_KEYWORDS)
        name = type(self.contrastive_loss).__name__
        if self.data_args.hard_negative_column is not None and "hard_negatives" not in accepted:
            raise ConfigError(
                f"`hard_negative_column` is set, but the loss {name} takes no `hard_negatives`; add the keyword "
                "arguments `image_ids`, `hard_negatives` and `hard_negative_valid` to its `__call__`, or drop "
                "`hard_negative_column`."
            )
        if "image_ids" not in accepted:
            logger.warning(
                f"The loss {name} takes no `image_ids`: two rows of one image in a batch are each other's negatives."
            )
        return accepted

    def _get_train_sampler(self, train_dataset=None):
        """The Trainer's sampler, or for a training set that draws captions or augmentation seeds per epoch one that
        passes the epoch to the DataLoader's workers (see [`CaptionSampledDataset`], [`AugmentationSeededRows`])."""
        from .captions import AugmentationSeededRows, CaptionSampledDataset

        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if isinstance(dataset, CaptionSampledDataset):
            return dataset.sampler()
        if isinstance(dataset, AugmentationSeededRows):
            if self.args.train_sampling_strategy == "random":
                return dataset.sampler()
            # Another order (sequential, by length): the Trainer's, over the rows, offset by the epoch.
            return dataset.sampler(super()._get_train_sampler(dataset.dataset))
        return super()._get_train_sampler(train_dataset)

    # ------------------------------------------------------------------------------------------------------------
    # Distillation
    # ------------------------------------------------------------------------------------------------------------
    def teacher_embeddings(self, inputs: dict) -> dict[str, torch.Tensor]:
        """The teacher's normalised embeddings of a batch's pairs, without gradients, under the run's mixed
        precision (accelerate applies it to the model's forward; the teacher is not prepared, so it is applied
        here)."""
        with self.accelerator.autocast():
            image_embeds, text_embeds = self.teacher.embed(inputs)
        return {"teacher_image_embeds": image_embeds, "teacher_text_embeds": text_embeds}

    def _distillation_term(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        teacher_image_embeds: torch.Tensor,
        teacher_text_embeds: torch.Tensor,
        student_inverse_temperature: torch.Tensor,
        pad_to: int | None,
        valid: torch.Tensor | None,
    ) -> torch.Tensor:
        """`distillation_weight x` the KL divergence from the teacher's distributions to the student's; the divergence
        is kept (on the device) for the training logs' `distillation_kl`."""
        divergence = self.distillation(
            image_embeds,
            text_embeds,
            teacher_image_embeds,
            teacher_text_embeds,
            student_inverse_temperature,
            self.teacher.inverse_temperature(),
            pad_to=pad_to,
            valid=valid,
        )
        detached = divergence.detach()
        self._distillation_sum = detached if self._distillation_sum is None else self._distillation_sum + detached
        self._distillation_count += 1
        return self.distillation.weight * divergence

    def _with_distillation(self, loss_function):
        """The cached accumulation's loss with the distillation term added; the student's inverse temperature is the
        first of the loss scalars (both loss families start with it)."""

        def loss(images, texts, *scalars, pad_to, valid, teacher_image_embeds, teacher_text_embeds, **constants):
            base = loss_function(images, texts, *scalars, pad_to=pad_to, valid=valid, **constants)
            return base + self._distillation_term(
                images, texts, teacher_image_embeds, teacher_text_embeds, scalars[0], pad_to, valid
            )

        return loss

    def _with_teacher_embeddings(self, constants_function):
        """The cached accumulation's per-micro-batch constants with the teacher's embeddings added."""

        def constants(batch: dict) -> dict[str, torch.Tensor]:
            others = constants_function(batch) if constants_function is not None else {}
            return {**others, **self.teacher_embeddings(batch)}

        return constants

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(
            self._repeated_rows_masked(epoch_iterator), num_batches, device
        )
        if self.gradient_cache is not None:
            # The cached accumulation needs every micro-batch of the optimizer step before the first backward.
            self.gradient_cache.start_step(batch_samples)
        return batch_samples, num_items_in_batch

    def skipped_training_samples(self) -> int:
        """The training samples left out as unusable so far (a corrupt image counts each time it is drawn), summed over
        every process: call it on every process. The rows repeated to even out a last batch are not counted."""
        local = torch.as_tensor(self._skipped_samples, device=self.args.device).long() - self._repeated_rows
        if self.args.world_size > 1:
            local = self.accelerator.reduce(local, reduction="sum")
        # For the model card, which the main process writes alone; a resumed run's count starts from its checkpoint's.
        self.skipped_samples_total = int(local) + self._skipped_before_resume
        return self.skipped_samples_total

    def _repeated_rows_masked(self, batches):
        """The training batches, with the rows accelerate repeats at the end of an uneven epoch flagged unusable.

        Under several processes an epoch whose length is not a multiple of `processes x per_device_train_batch_size`
        ends with a round of batches that accelerate fills up (its `even_batches`, so that every process takes part in
        the last step) with rows from the start of the epoch. Trained, those rows would be trained twice and be extra
        negatives: the last step's loss and gradients were not one process's. The real rows of that round are the
        first `remainder` of the gathered batch (each process's rows in process order, the filled rows after them),
        which is how `gather_for_metrics` drops the same rows in an evaluation; the others are masked like unusable
        samples, so the step is the one process's last batch exactly. (accelerate offers `even_batches=False`
        instead, but then processes can take different numbers of steps and the gathering collectives no longer
        match.)
        """
        for batch in batches:
            self._repeated_rows += self._mask_repeated_rows(batch, self.args.per_device_train_batch_size)
            yield batch

    def _mask_repeated_rows(self, batch, batch_size: int) -> int:
        """Flags unusable, in the last round of batches of an uneven epoch or evaluation under several processes, the
        rows accelerate repeated from its start (see [`_repeated_rows_masked`]); returns how many it flagged."""
        state = self.accelerator.gradient_state
        valid = batch.get("valid") if isinstance(batch, dict) else None
        if self.args.world_size <= 1 or valid is None or not state.end_of_dataloader or state.remainder <= 0:
            return 0
        first = self.args.process_index * batch_size
        real = (torch.arange(valid.shape[0]) + first) < state.remainder
        batch["valid"] = valid & real.to(valid.device)
        return int((~real).sum())

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._last_log_time is None:
            self._last_log_time = time.perf_counter()
        valid = inputs.get("valid")
        pairs = None
        if valid is not None:
            # accelerate has already moved the batch to the device: `int(...)` would wait for the device at every
            # step. The counts are summed where they are and read at logging steps, which synchronise anyway.
            pairs = valid.sum()
            self._skipped_samples = self._skipped_samples + (valid.numel() - pairs)
        # Rows, not texts: a batch's hard negatives are tokenized after its captions.
        self._samples_since_log += (valid if valid is not None else inputs["input_ids"]).shape[0]
        if self.args.peak_tflops is not None:
            self._flops_since_log += self.floating_point_ops(inputs)
        if self.gradient_cache is not None and self.gradient_cache.owns(inputs):
            # What `Trainer.training_step` does before its forward.
            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            loss = self.gradient_cache.training_step(inputs)
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite_guard.observe_loss(loss, pairs)
        return self._finite_for_logging(loss)

    def _finite_for_logging(self, loss: torch.Tensor) -> torch.Tensor:
        """A non-finite loss replaced, for the logged average only, by the mean of the finite ones since the last log.

        The update of such a step is skipped by the non-finite guard; what is left is the Trainer's running sum of
        losses, which one NaN would turn into NaN for the rest of the run (its reset is `tr_loss -= tr_loss`). This is
        what `logging_nan_inf_filter` does, computed on the device: transformers' filter reads every step's loss on
        the host, a synchronisation per step, which is why clip-trainer turns it off by default.
        """
        detached = loss.detach()
        finite = torch.isfinite(detached)
        if self._finite_loss_sum is None:
            self._finite_loss_sum = torch.zeros_like(detached)
            self._finite_loss_count = torch.zeros_like(detached)
        self._finite_loss_sum = self._finite_loss_sum + torch.where(finite, detached, 0.0)
        self._finite_loss_count = self._finite_loss_count + finite.to(detached.dtype)
        mean = self._finite_loss_sum / self._finite_loss_count.clamp(min=1)
        return torch.where(finite, loss, mean)

    def floating_point_ops(self, inputs: dict) -> int:
        """Training FLOPs of a batch for `total_flos` and `mfu`: 6 x matmul weights x tokens, tower by tower.

        transformers' estimate multiplies every parameter by the text tokens alone (for ViT-B/32 it says 58 GFLOP per
        pair where a FLOP counter says 44), and it walks every module to count the parameters at every step; the
        towers' weights are counted once here.
        """
        model = self.accelerator.unwrap_model(self.model)
        pixels, input_ids = inputs.get("pixel_values"), inputs.get("input_ids")
        if pixels is None or input_ids is None or not isinstance(model, CLIPModel):
            return super().floating_point_ops(inputs)
        if self._tower_weights is None:
            self._tower_weights = (
                _matmul_weights(model.vision_model, model.visual_projection),
                _matmul_weights(model.text_model, model.text_projection),
            )
        vision, text = self._tower_weights
        patch = model.config.vision_config.patch_size
        patches = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)
        if self.patch_dropout is not None and self.patch_dropout.attached and self.patch_dropout.active():
            from .patch_dropout import kept_patches

            patches = kept_patches(patches, self.patch_dropout.probability)
        image_tokens = patches + 1  # the (kept) patches and the class token
        # Images and texts counted apart: a batch's hard negatives are texts without an image.
        return 6 * (pixels.shape[0] * vision * image_tokens + input_ids.shape[0] * text * input_ids.shape[1])

    # ------------------------------------------------------------------------------------------------------------
    # Logging
    # ------------------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the temperature, the throughput and the skip counts to the Trainer's training logs.

        Evaluation metrics need no buffer: they are computed once over the whole set in `evaluation_loop`.
        """
        logs = dict(logs)
        if "loss" in logs and not any(key.startswith("eval_") for key in logs):
            values = self.contrastive_loss.logged_values(self.model)
            logs.update({key: round(value, 6) for key, value in values.items()})
            now = time.perf_counter()
            if self._last_log_time is not None and now > self._last_log_time:
                throughput = self._samples_since_log * self.args.world_size / (now - self._last_log_time)
                logs["samples_per_second"] = round(throughput, 2)
                if self.args.peak_tflops is not None:
                    # Model FLOPs utilisation of this process's device: its training FLOPs per second over its peak.
                    achieved = self._flops_since_log / (now - self._last_log_time)
                    logs["mfu"] = round(achieved / (self.args.peak_tflops * 1e12), 4)
            self._flops_since_log = 0
            self._last_log_time, self._samples_since_log = now, 0
            self._finite_loss_sum = self._finite_loss_count = None
            skipped = int(self._skipped_samples) - self._repeated_rows + self._skipped_before_resume
            if skipped:
                logs["skipped_samples"] = skipped
            if self.nonfinite_guard.skipped_steps:
                logs["nonfinite_steps_skipped"] = self.nonfinite_guard.skipped_steps
            if self._distillation_count:
                # The mean KL divergence to the teacher since the last log, over every process.
                mean = self.accelerator.reduce(self._distillation_sum / self._distillation_count, reduction="mean")
                logs["distillation_kl"] = round(mean.item(), 6)
                self._distillation_sum, self._distillation_count = None, 0
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------------------------
    # Saving
    # ------------------------------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`; the final save (not a checkpoint's) also writes what the run's arguments ask for:

        - a LoRA model not merged yet: the plain model with the adapters merged (loadable by `from_pretrained` and
          `pipeline(...)`) and the adapter in `output_dir/adapter/`;
        - the files other libraries read (transformers.js, transformers 4.x, sentence-transformers; see
          `consumers.write_consumer_files`);
        - `export_onnx`: `output_dir/onnx/` with the two towers' graphs, checked against the model;
        - `save_open_clip`: `open_clip_config.json` and `open_clip_model.safetensors` beside the model's files;
        - the model card (`README.md`, with the curves and the retrieval gallery) from the evaluations so far.

        Checkpoints (`_internal_call`) keep the Trainer's saves (adapter-only for LoRA, which resuming and
        `load_best_model_at_end` load back), with the moving average of the weights (`ema.safetensors`) when the run
        keeps one.
        """
        if _internal_call:
            super().save_model(output_dir, _internal_call)
            if output_dir is not None and self.args.should_save:
                if self.ema_callback is not None:
                    # With the checkpoint's weights, before its optimizer state and `trainer_state.json`.
                    self.ema_callback.save(output_dir)
                share_saved_weights(output_dir)
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if is_lora_model(self.model) and (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            # Sharded weights are whole only once gathered (and DeepSpeed's engine holds the model): the adapter and
            # the merged model come from the full state dict, merged into a fresh copy on the main process.
            state_dict = self._gathered_state_dict()
            if self.args.should_save:
                self._save(os.path.join(output_dir, ADAPTER_DIRNAME), state_dict=state_dict)
                merged_from_state_dict(self.model, state_dict).save_pretrained(output_dir)
                self.processing_class.save_pretrained(output_dir)
        elif is_lora_model(self.model):
            super().save_model(os.path.join(output_dir, ADAPTER_DIRNAME), _internal_call=True)
            if self.args.should_save:
                merged_copy(self.model).save_pretrained(output_dir)
                self.processing_class.save_pretrained(output_dir)
        elif self._saves_sharded_state_dict():
            self._save_gathered(output_dir)
        else:
            super().save_model(output_dir, _internal_call=True)
        if not self.args.should_save:
            return
        share_saved_weights(output_dir)
        # What transformers.js, transformers 4.x and sentence-transformers read besides `save_pretrained`'s files
        # (see consumers.py); sentence-transformers tokenizes captions as this run did (SigLIP: one padded length).
        write_consumer_files(output_dir, text_padding=self.text_padding, max_length=self.max_seq_length)
        if self.args.export_onnx:
            self.export_onnx(os.path.join(output_dir, "onnx"))
        if self.args.save_open_clip:
            self.save_open_clip(output_dir)
        if output_dir != self.args.output_dir:
            return
        if self.args.push_to_hub:  # as `Trainer.save_model` does; the push writes the card first
            self.push_to_hub(commit_message="Upload model trained with clip-trainer", revision=self.args.hub_revision)
        else:
            self.create_model_card()

    def _gathered_state_dict(self) -> dict[str, torch.Tensor]:
        """The full state dict of a model FSDP or DeepSpeed shards, gathered from every process (each must call this;
        the main process gets the tensors), with the shapes the model's config builds."""
        return self._with_scalars_restored(self.accelerator.get_state_dict(self.model))

    def _with_scalars_restored(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state_dict` with the parameters `_prepare_for_sharding` reshaped back to scalars, as the config builds
        them. Named as in the model prepared (a LoRA model's merge drops peft's `base_model.model.` prefix)."""
        for key, value in state_dict.items():
            if value.dim() == 1 and any(name == key or name.endswith(f".{key}") for name in self._scalar_parameters):
                state_dict[key] = value.reshape(())
        return state_dict

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Under DeepSpeed, transformers' own saves pass the state dict gathered from the engine.
        if state_dict is not None and self._scalar_parameters:
            state_dict = self._with_scalars_restored(state_dict)
        super()._save(output_dir, state_dict=state_dict)

    def _save_gathered(self, output_dir: str) -> None:
        """The final save of a SHARDED_STATE_DICT run. transformers' writes nothing there (its FSDP branch saves only
        full state dicts), and a sharded folder is not one `from_pretrained` reads: the folder gets the full state
        dict (the main process writes it; `_save` gives the scalars back their shapes). For a LoRA model, peft's
        `save_pretrained` keeps the adapter's weights."""
        state_dict = self.accelerator.get_state_dict(self.model)
        if self.args.should_save:
            self._save(output_dir, state_dict=state_dict)

    def _saves_sharded_state_dict(self) -> bool:
        """Whether the run's checkpoints are FSDP's sharded state dicts (`fsdp_config` `state_dict_type`)."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        return bool(self.is_fsdp_enabled and plugin is not None and "SHARDED" in str(plugin.state_dict_type))

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, **kwargs):
        """`Trainer.push_to_hub`; a failed upload is one line that says where the model is and how to upload it."""
        from .errors import PublishError
        from .hub import NETWORK_ERRORS

        try:
            return super().push_to_hub(commit_message=commit_message, blocking=blocking, **kwargs)
        except NETWORK_ERRORS as error:
            raise PublishError(
                f"Pushing to {self.args.hub_model_id!r} failed ({error}). The trained model is saved in "
                f"{self.args.output_dir}; upload it later with `hf upload {self.args.hub_model_id} "
                f"{self.args.output_dir}`."
            ) from None

    def export_onnx(self, folder: str) -> dict:
        """The model's two towers as ONNX graphs in `folder`, checked with ONNX Runtime against the model."""
        from .converters.to_onnx import ONNXExportError, export_onnx
        from .errors import PublishError

        model = merged_copy(self.model) if is_lora_model(self.model) else self.model
        try:
            export = export_onnx(model, folder, processor=self.processing_class)
        except ONNXExportError as error:
            raise PublishError(
                f"ONNX export failed: {error}. The trained model is saved in {self.args.output_dir}."
            ) from None
        # The processor's tokenizer still says its own `model_max_length`: the graphs' folder, as the model's, says
        # the caption length the model was trained at (see consumers.py).
        write_consumer_files(folder, max_length=self.max_seq_length)
        logger.info(f"ONNX graphs in {folder}, checked: {export['max_abs_diff']}.")
        return export

    def save_open_clip(self, folder: str) -> dict:
        """open_clip's files for the model (`open_clip_config.json`, `open_clip_model.safetensors`) in `folder`, beside
        its tokenizer; loaded back and compared with the model when open_clip is installed."""
        from .converters.to_open_clip import check_if_open_clip_imports, save_open_clip
        from .errors import OpenCLIPConversionError, PublishError

        model = merged_copy(self.model) if is_lora_model(self.model) else self.model
        # The Hub repository that will hold the tokenizer, for open_clip's `hf-hub:` loads of the pushed model.
        hub_id = self.args.hub_model_id if self.args.push_to_hub else None
        try:
            paths = save_open_clip(model, self.processing_class, folder, hf_tokenizer_name=hub_id)
            differences = check_if_open_clip_imports(folder, model)
        except (ConfigError, OpenCLIPConversionError) as error:
            raise PublishError(
                f"Writing the open_clip files failed: {error} The trained model is saved in {self.args.output_dir}."
            ) from None
        if differences is not None:
            paths["max_abs_diff"] = differences
        logger.info(f"open_clip files in {folder}: {paths}.")
        return paths

    def merge_lora(self) -> str | None:
        """Saves the adapter into `output_dir/adapter/` and goes on with the plain merged model: what is evaluated,
        interpolated (WiSE-FT) and saved afterwards is then exactly the model `from_pretrained` loads. Returns the
        adapter's folder; `None` (and does nothing) for a model without LoRA."""
        if not is_lora_model(self.model):
            return None
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            # A sharded model cannot be merged in place: the merged model's own weights would stay sharded outside
            # FSDP's units, and DeepSpeed's engine holds (and saves) the model it was given. It goes on with its
            # adapters, which compute the same, and the final save merges a whole copy (and writes the adapter).
            logger.info("LoRA under FSDP or DeepSpeed: the adapters stay unmerged until the final save merges a copy.")
            return None
        adapter_dir = os.path.join(self.args.output_dir, ADAPTER_DIRNAME)
        super().save_model(adapter_dir, _internal_call=True)
        merged = self.model.merge_and_unload()
        self.model = self.model_wrapped = merged
        self._tower_weights = None
        return adapter_dir

    def create_model_card(self, *args, **kwargs) -> None:
        """Writes clip-trainer's model card (`README.md`: metrics before/after, curves, usage) and the training curves
        (`training_curves.png`) into `output_dir`, instead of the Trainer's generic card; after a LoRA run, the
        adapter's own card into `output_dir/adapter/`.

        `Trainer.push_to_hub` calls this just before uploading `output_dir`.
        """
        from .model_card import complete_card_data, write_adapter_card

        if not self.is_world_process_zero():
            return
        history = self.state.log_history
        card_data = complete_card_data(self.model_card_data, self)
        plots = save_training_plots(history, self.args.output_dir)
        if self.wise_ft_result is not None and self.wise_ft_result.plot:
            plots.append(self.wise_ft_result.plot)
        examples = self.save_retrieval_examples()
        write_model_card(
            self.args.output_dir,
            card_data,
            eval_before=_evaluation_at(history, first=True),
            eval_after=_evaluation_at(history, first=False),
            hyperparameters=self.card_hyperparameters,
            plots=plots,
            examples=[examples] if examples else [],
            eval_sets=list(self.extra_eval_datasets),
            wise_ft=self.wise_ft_result,
            saved_weights=self._saved_weights_sentence(),
        )
        if card_data.lora is not None:  # replaces peft's template card of the adapter
            write_adapter_card(os.path.join(self.args.output_dir, ADAPTER_DIRNAME), card_data)

    def _saved_weights_sentence(self) -> str | None:
        """For the model card: which training step's weights were saved, when `load_best_model_at_end` kept the best
        checkpoint (the card's step count is the run's, which may have gone on past it), and with `ema_decay` whether
        they are the moving average."""
        ema = self.ema_callback.saved_weights if self.ema_callback is not None else None
        state = self.state
        if not (self.args.load_best_model_at_end and state.best_model_checkpoint and state.best_global_step):
            return ema
        if ema is not None and ema_metric_name(self.args.metric_for_best_model) is not None:
            return ema  # the average of the best checkpoint was saved, and its sentence names that checkpoint
        metric = self.args.metric_for_best_model or "loss"
        metric = metric if metric.startswith("eval_") else f"eval_{metric}"
        kept = f"The weights kept are those of step {state.best_global_step:,}, the best evaluation by `{metric}`"
        if state.best_metric is not None:
            kept += f" ({state.best_metric:.4g})"
        if state.best_global_step < state.global_step:
            kept += f"; training went on to step {state.global_step:,}"
        return " ".join(sentence for sentence in (kept + ".", ema) if sentence)

    # ------------------------------------------------------------------------------------------------------------
    # Evaluation
    # ------------------------------------------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """`Trainer.evaluate`, over the validation split and every one of `extra_eval_datasets` as one round.

        The validation split reports `eval_{metric}`, each extra set `eval_{name}_{metric}` (a dict `eval_dataset`
        reports each of its keys so, too), and while a run with `ema_decay` trains, the moving average of the weights
        on the validation split `eval_ema_{metric}`, all in one log entry and one `on_evaluate`. `Trainer.evaluate`
        given a dict evaluates each set as a separate evaluation: a log entry each, and `on_evaluate` once per set
        with that set's metrics only, so early stopping warns on every set that lacks `metric_for_best_model` and the
        model card and the curves would see one set per round. With `eval_dataset` given (a dataset), that dataset
        alone is evaluated.
        """
        sets = self._evaluation_sets(eval_dataset, metric_key_prefix)
        if len(sets) == 1 and not self._evaluates_ema(sets[0][0]):
            prefix, dataset = sets[0]
            return super().evaluate(dataset, ignore_keys=ignore_keys, metric_key_prefix=prefix)
        metrics = self.evaluate_sets(sets, ignore_keys=ignore_keys)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _evaluation_sets(self, eval_dataset, metric_key_prefix: str) -> list[tuple[str, object]]:
        """`(metric prefix, dataset or set name)` of each set an `evaluate(eval_dataset)` call covers; a dataset given
        here is prepared as the trainer's own sets are (image ids, class labels)."""
        if eval_dataset is not None:
            eval_dataset = self._prepared_for_evaluation(eval_dataset)
            if not isinstance(eval_dataset, dict):
                return [(metric_key_prefix, eval_dataset)]
        named = eval_dataset if eval_dataset is not None else self.eval_dataset
        sets: list[tuple[str, object]] = []
        if isinstance(named, dict):
            # A dict given here holds the datasets; `self.eval_dataset`'s are looked up by name (and their loaders kept).
            for name, dataset in named.items():
                sets.append((f"{metric_key_prefix}_{name}", dataset if eval_dataset is not None else name))
        elif named is not None:
            sets.append((metric_key_prefix, None))
        if eval_dataset is None:
            sets += [(f"{metric_key_prefix}_{name}", name) for name in self.extra_eval_datasets]
        if not sets:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        return sets

    def evaluate_sets(self, sets=None, ignore_keys=None) -> dict[str, float]:
        """Every evaluation set's metrics (the validation split's as `eval_*`, each extra set's as `eval_{name}_*`),
        with their runtimes, **without** logging them or calling callbacks: [`evaluate`] logs them, and WiSE-FT
        measures its interpolations with it.

        Args:
            sets: `(metric prefix, dataset or set name or None for the validation split)` pairs; default: all.
        """
        metrics: dict[str, float] = {}
        for prefix, dataset in sets if sets is not None else self._evaluation_sets(None, "eval"):
            metrics.update(self._evaluate_set(prefix, dataset, ignore_keys))
            if self._evaluates_ema(prefix):
                # The moving average on the same split, in the same round (`eval_ema_*`), then the weights back.
                with self.ema_callback.ema.swapped_in():
                    metrics.update(self._evaluate_set(f"{prefix}_{EMA_PREFIX}", dataset, ignore_keys))
        return metrics

    def _evaluate_set(self, prefix: str, dataset, ignore_keys) -> dict[str, float]:
        loader = self.get_eval_dataloader(dataset)
        start = time.time()
        output = self.evaluation_loop(
            loader, "Evaluation", prediction_loss_only=True, ignore_keys=ignore_keys, metric_key_prefix=prefix
        )
        batches = math.ceil(output.num_samples / (self.args.eval_batch_size * self.args.world_size))
        output.metrics.update(speed_metrics(prefix, start, num_samples=output.num_samples, num_steps=batches))
        return output.metrics

    def _evaluates_ema(self, prefix: str) -> bool:
        """Whether an evaluation of the set of `prefix` also scores the moving average of the weights: the validation
        split's (`eval`), while the run keeps an average (from the start of training until the weights to save are
        chosen)."""
        return prefix == "eval" and self.ema_callback is not None and self.ema_callback.ema is not None

    def get_train_dataloader(self) -> DataLoader:
        """`Trainer.get_train_dataloader`, whose workers leave SIGTERM and SIGINT to the main process (see
        [`WorkersLeaveStopSignals`]), and whose collator takes the pixels of the training images decoded once, when
        they are kept (see `image_cache.py`)."""
        self._keep_decoded_training_images()
        loader = super().get_train_dataloader()
        if self.args.dataloader_num_workers:
            # Set after the Trainer built it: its own `worker_init_fn` (the seeding of map-style data) runs after. The
            # DataLoader that starts the workers is the one accelerate's wrapper holds, when it holds one.
            inner = getattr(loader, "base_dataloader", loader)
            inner.worker_init_fn = WorkersLeaveStopSignals(inner.worker_init_fn)
            if getattr(inner, "_initial_iter_for_state_dict", False) and getattr(inner, "_iterator", None) is not None:
                # accelerate asked the `StatefulDataLoader` (a stream's loader) for its state when it wrapped it, which
                # started its workers before this `worker_init_fn` was set: start them again with it. The state is the
                # initial one either way (torchdata has no public call for this; these are its own fields).
                inner._iterator._shutdown_workers()
                inner._iterator = None
                inner._initial_iter_for_state_dict = False
        return loader

    def _keep_decoded_training_images(self) -> None:
        """Decodes the training images once and gives the training collator their pixels, when
        `decoded_image_cache_mb` allows it (see `image_cache.py`); decided once per trainer."""
        if self._decoded_images_decided:
            return
        self._decoded_images_decided = True
        reason = self._decoded_images_unused()
        if reason is not None:
            if reason:
                logger.info(f"The training images are decoded at every epoch: {reason}.")
            return
        from .image_cache import decode_training_images

        collator = self.data_collator
        cache = decode_training_images(self.train_dataset, collator, self.args.dataloader_num_workers)
        self.data_collator = dataclasses.replace(collator, decoded_images=cache)

    def _decoded_images_unused(self) -> str | None:
        """Why the training images are not kept decoded (`""`: nothing to tell), or `None` when they may be."""
        collator, dataset = self.data_collator, self.train_dataset
        if self.args.decoded_image_cache_mb == 0 or not isinstance(collator, ImageTextCollator):
            return ""
        streamed = isinstance(dataset, IterableDataset | torch.utils.data.IterableDataset)
        if dataset is None or streamed or not hasattr(dataset, "__len__"):
            return ""  # a stream is read once per pass, from where it lies
        if collator.decoded_images is not None:
            return ""  # a collator of the caller's that has them
        if collator.augmentation is not None:
            return "they are augmented (a new crop at each epoch)"
        if collator.teacher is not None:
            return "the distillation teacher takes its own view of each image"
        if collator.image_preprocessor.output_size is None:
            return "NaFlex keeps each image at its own size"
        planned = self._planned_steps()
        rows = planned * self.args.train_batch_size * self.args.gradient_accumulation_steps if planned else 0
        if rows < 2 * len(dataset):
            return ""  # read at most about once per process: decoding ahead would save nothing
        from .image_cache import most_bytes

        size, budget = most_bytes(dataset, collator) / 2**20, self.args.decoded_image_cache_mb
        if size > budget:
            height, width = collator.image_preprocessor.output_size
            return (
                f"their pixels could take up to {size:,.1f} MiB (one {height}x{width} image for each of the "
                f"{len(dataset):,} training rows), more than `decoded_image_cache_mb` ({budget:g}); raise it to keep "
                "them in memory"
            )
        return None

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        """`Trainer.predict`, with `test_dataset` prepared and batched as an evaluation set is (image ids and class
        labels; the evaluation collator, never augmented; every pair kept), so that its metrics are `evaluate`'s."""
        dataset = self._prepared_for_evaluation(test_dataset)
        return super().predict(dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def _prepared_for_evaluation(self, dataset):
        """A dataset (or a dict of them) given to `evaluate` or `predict`, prepared as the trainer's own evaluation sets
        are; once per dataset (by its `datasets` fingerprint), so that a set passed to every call has its images
        hashed once."""
        from .data import prepared_for_evaluation

        if isinstance(dataset, dict):
            return {name: self._prepared_for_evaluation(each) for name, each in dataset.items()}
        fingerprint = getattr(dataset, "_fingerprint", None)
        if fingerprint is None:
            return prepared_for_evaluation(dataset, self.data_args, check=self._checks_given_columns)
        if fingerprint not in self._prepared_evaluation_sets:
            ready = prepared_for_evaluation(dataset, self.data_args, check=self._checks_given_columns)
            self._prepared_evaluation_sets[fingerprint] = ready
        return self._prepared_evaluation_sets[fingerprint]

    def get_test_dataloader(self, test_dataset) -> DataLoader:
        """`predict`'s DataLoader: the evaluation one (see [`get_eval_dataloader`]); transformers' would batch with
        the training collator and drop the last batch with `dataloader_drop_last`."""
        return self.get_eval_dataloader(test_dataset)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        """The evaluation DataLoader of the validation split (`None`), of a set by name (one of
        `extra_eval_datasets`, or a key of a dict `eval_dataset`), or of a given dataset.

        Built here, not by `Trainer.get_eval_dataloader`, for two things that one lacks: its batches would come from
        the training collator (augmented, when training augments), and it applies `dataloader_drop_last` to
        evaluation too, which would leave pairs out of the retrieval metrics (recalls in multiples of 1/batch).
        """
        name = eval_dataset if isinstance(eval_dataset, str) else None
        reusable = self.args.dataloader_persistent_workers and (name is not None or eval_dataset is None)
        if reusable and name in self._eval_loaders:
            return self._eval_loaders[name]
        # A set of the trainer's own (the validation split, an extra set by name) is the same rows every evaluation.
        own_set = name is not None or eval_dataset is None or eval_dataset is self.eval_dataset
        kept = self._eval_batches.get(name) if own_set else None
        if kept is not None and kept.complete and kept.dataset is self._own_eval_dataset(name):
            return kept
        if name is not None:
            named = {**(self.eval_dataset if isinstance(self.eval_dataset, dict) else {}), **self.extra_eval_datasets}
            if name not in named:
                raise KeyError(f"No evaluation set named {name!r}; the sets are: {', '.join(named) or 'none'}.")
            dataset = named[name]
        else:
            dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        workers = self.args.dataloader_num_workers
        loader = DataLoader(
            dataset,
            batch_size=self.args.eval_batch_size,
            sampler=self._get_eval_sampler(dataset),
            collate_fn=self.eval_data_collator,
            num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers,
            prefetch_factor=self.args.dataloader_prefetch_factor,
            multiprocessing_context=self.args.dataloader_multiprocessing_context if workers else None,
            drop_last=False,
            worker_init_fn=WorkersLeaveStopSignals() if workers else None,
        )
        loader = self.accelerator.prepare(loader)
        if reusable:
            self._eval_loaders[name] = loader
        if own_set and self.args.device.type == "cpu" and self.args.world_size == 1:
            # On the CPU, decoding the same images again at every evaluation takes the cores the model needs; on an
            # accelerator the workers decode while it computes, and keeping batches would hold its memory.
            loader = self._eval_batches[name] = EvaluationBatches(loader, dataset, EVALUATION_BATCHES_MAX_BYTES)
        return loader

    def _own_eval_dataset(self, name: str | None):
        """The dataset of the validation split (`None`) or of a named evaluation set, as the trainer holds it now."""
        if name is None:
            return self.eval_dataset
        named = {**(self.eval_dataset if isinstance(self.eval_dataset, dict) else {}), **self.extra_eval_datasets}
        return named.get(name)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Computes the batch's loss and keeps its embeddings (gathered from every process) for retrieval."""
        # The rows accelerate repeats to even out the last round are neither pairs nor negatives of this loss.
        self._mask_repeated_rows(inputs, self.args.per_device_eval_batch_size)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if self._eval_loss_parts is not None and "valid" in inputs:
            # This process's share of the batch's loss and its usable pairs, kept on the device; summed over the
            # processes once the set is done (see `evaluation_loop`).
            self._eval_loss_parts.append((loss.detach().float(), inputs["valid"].sum().float()))
        if self._eval_buffer is not None:
            collected = {**outputs}
            for key in ("image_ids", "class_labels", "valid"):
                if key in inputs:
                    collected[key] = inputs[key]
            # gather_for_metrics drops the samples the distributed sampler repeats to even out the last batch.
            gathered = self.accelerator.gather_for_metrics(collected)
            for key, value in gathered.items():
                self._eval_buffer[key].append(value.detach().cpu())
        return loss.detach(), None, None

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self._eval_buffer = defaultdict(list)
        self._eval_loss_parts = []
        try:
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
            collected = {key: torch.cat(values) for key, values in self._eval_buffer.items()}
            loss_parts = self._eval_loss_parts
        finally:
            self._eval_buffer = self._eval_loss_parts = None
        if loss_parts:
            # The loss per usable pair over the whole set, every batch weighted by its pairs. The Trainer's own mean
            # weights each process's share by its batch's rows, which under several processes changed with how the
            # last batch was split and with the rows repeated to even it out, and counted unusable rows. A batch's
            # pairs are summed over the processes; each process's share of the loss times them, over the world size,
            # summed over the processes, is the batch's loss times its pairs (see `distributed_clip_loss`). One
            # reduction per set, not per batch.
            shares = torch.stack([share for share, _ in loss_parts])
            pairs = torch.stack([count for _, count in loss_parts])
            if self.args.world_size > 1:
                pairs = self.accelerator.reduce(pairs, reduction="sum")
            total = (shares * pairs).sum() / self.args.world_size
            if self.args.world_size > 1:
                total = self.accelerator.reduce(total, reduction="sum")
            if float(pairs.sum()) > 0 and math.isfinite(float(total)):  # else the Trainer's, which filters NaN batches
                output.metrics[f"{metric_key_prefix}_loss"] = float(total / pairs.sum())
        valid = collected.pop("valid", None)
        rows = torch.arange(len(valid)) if valid is not None else None
        if valid is not None:
            collected = {key: value[valid] for key, value in collected.items()}
            rows = rows[valid]
        usable = len(collected.get("image_embeds", ()))
        if usable < 2:
            self._no_usable_evaluation_pairs(metric_key_prefix, usable, len(valid) if valid is not None else usable)
            if usable == 0:
                # The loss of a set with no pair is not 0 (what the masked sum gives): there is none.
                output.metrics[f"{metric_key_prefix}_loss"] = float("nan")
        else:
            evaluator = self._evaluator_for(getattr(dataloader, "dataset", None), metric_key_prefix)
            collected["rows"] = rows
            output.metrics.update(
                evaluator.compute_metrics(collected, encode_text=self.encode_text, metric_key_prefix=metric_key_prefix)
            )
            if metric_key_prefix == "eval" and evaluator.last_embeddings is not None:
                # Kept for the retrieval gallery the model card shows: the last evaluation of the validation split.
                self._last_evaluation = {
                    **evaluator.last_embeddings,
                    "dataset": evaluator.dataset,
                    "class_names": evaluator.class_names,
                }
            for key, value in self.contrastive_loss.logged_values(self.model).items():
                output.metrics[f"{metric_key_prefix}_{key}"] = value
        if valid is not None and usable < len(valid):
            # The metrics are over the usable pairs: how many were not (their images did not decode, say) is said
            # beside them, or `eval_samples` (every row) reads as their count.
            output.metrics[f"{metric_key_prefix}_unusable_pairs"] = len(valid) - usable
        return output

    def _new_evaluator(self, dataset, name: str | None) -> RetrievalEvaluator:
        """The evaluator of one evaluation set, with the run's columns, batch size, prompts and ranking chunks. It
        keeps the embeddings it scores (for the gallery) on the main process only."""
        evaluator = RetrievalEvaluator(
            dataset,
            name,
            image_column=getattr(self.eval_data_collator, "image_column", self.data_args.image_column),
            caption_column=getattr(self.eval_data_collator, "caption_column", self.data_args.caption_column),
            batch_size=self.args.eval_batch_size,
            zeroshot_templates=self.zeroshot_templates,
            chunk_size=self.args.retrieval_chunk_size,
            max_seq_length=self.max_seq_length,
            max_image_pixels=self.data_args.max_image_pixels,
            jpeg_draft=self.data_args.jpeg_draft,
        )
        evaluator.keep_embeddings = self.is_world_process_zero()
        return evaluator

    def _evaluator_for(self, dataset, metric_key_prefix: str) -> RetrievalEvaluator:
        """The evaluator of the set being evaluated: the one of that prefix or of that dataset, or a new one for a
        dataset given to `evaluate` directly."""
        evaluator = self.evaluators.get(metric_key_prefix)
        if evaluator is not None and evaluator.dataset is dataset:
            return evaluator
        for evaluator in self.evaluators.values():
            if evaluator.dataset is dataset:
                return evaluator
        return self._new_evaluator(dataset, None)

    def _no_usable_evaluation_pairs(self, prefix: str, usable: int, rows: int) -> None:
        """An evaluation set without two usable pairs has no retrieval metrics: a one-line error when the run selects
        its best model on them (the Trainer would stop with a `KeyError`), else a warning."""
        name = "the validation split" if prefix == "eval" else f"evaluation set {prefix.removeprefix('eval_')!r}"
        metric = self.args.metric_for_best_model
        if metric and not metric.startswith("eval_"):
            metric = f"eval_{metric}"
        sets = sorted(self.extra_eval_datasets, key=len, reverse=True)
        owner = next(
            (f"eval_{set_name}" for set_name in sets if (metric or "").startswith(f"eval_{set_name}_")), "eval"
        )
        message = (
            f"{name} has {usable} usable pair(s) of {rows} (the others' images or captions could not be used; the "
            "warnings above name them): it has no retrieval metrics."
        )
        if self.args.load_best_model_at_end and metric and owner == prefix and not metric.endswith("_loss"):
            raise ConfigError(
                f"{message} `metric_for_best_model` is {self.args.metric_for_best_model}, so the run cannot choose its "
                "best model: fix or replace those files, or choose a metric of another evaluation set."
            )
        logger.warning(message)

    def save_retrieval_examples(self, path: str | None = None) -> str | None:
        """Draws `retrieval_examples.png` (in `output_dir` unless `path` says otherwise) from the last evaluation of
        the validation split: a few held-out captions, fixed by the seed, with the images they retrieve, and with
        class labels a few images with their top classes. Returns the path, or `None` with no evaluation to draw."""
        from .gallery import RETRIEVAL_EXAMPLES_FILENAME, save_retrieval_gallery

        last = getattr(self, "_last_evaluation", None)
        if last is None or last["dataset"] is None or last["rows"] is None:
            return None
        rows = last["rows"].tolist()
        table = last["dataset"].with_format(None).select(rows)
        evaluator = self._evaluator_for(last["dataset"], "eval")
        image_column, caption_column = evaluator.image_column, evaluator.caption_column
        labels = last.get("class_labels")
        return save_retrieval_gallery(
            last["image_embeds"],
            last["text_embeds"],
            table[image_column],
            [str(caption) for caption in table[caption_column]],
            last.get("image_ids"),
            path=path or os.path.join(self.args.output_dir, RETRIEVAL_EXAMPLES_FILENAME),
            seed=self.args.seed,
            class_names=last["class_names"] if last.get("classifier") is not None else None,
            class_labels=labels if last.get("classifier") is not None else None,
            classifier=last.get("classifier"),
        )

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Normalised text embeddings from the model being trained (for zero-shot class prompts), tokenized as the
        collator tokenizes captions (SigLIP: padded to its one length), under the evaluation's autocast."""
        encode = text_encoder(
            self.model,
            self.processing_class.tokenizer,
            padding=self.text_padding,
            max_length=self.max_seq_length,
            device=self.args.device,
            context=self.compute_loss_context_manager,
        )
        return encode(texts)


# The most memory the kept evaluation batches of one set may take (uint8 pixels, token ids): the bundled demo's
# validation split takes 7 MiB, 10,000 images at 224 px 1.5 GiB (not kept).
EVALUATION_BATCHES_MAX_BYTES = 512 * 2**20


class EvaluationBatches:
    """
    An evaluation DataLoader whose batches are kept after its first full pass and replayed afterwards.

    An evaluation set is the same rows, decoded and collated the same way, at every evaluation (its collator does not
    augment), so the batches of the first pass are the batches of every later one. The DataLoader classes have no
    such cache (`persistent_workers` keeps the workers, which still decode every image again). Batches are kept only
    while they total at most `max_bytes`; each is handed out as a shallow copy, since the evaluation step replaces
    the pixels of its inputs with normalised ones.
    """

    def __init__(self, loader, dataset, max_bytes: int) -> None:
        self.loader, self.dataset, self.max_bytes = loader, dataset, max_bytes
        self.batch_size = getattr(loader, "batch_size", None)
        self.batches: list = []
        self.complete = False

    def __len__(self) -> int:
        return len(self.batches) if self.complete else len(self.loader)

    def __iter__(self):
        if self.complete:
            # Told to accelerate's gradient state as the prepared loader tells it (`DataLoaderShard.__iter__`): which
            # loader is active, and its last batch. Without it `gather_for_metrics` reads the state the training
            # loader left, and cuts the batches to that loader's remainder.
            state = self.loader if hasattr(self.loader, "begin") and hasattr(self.loader, "end") else None
            if state is not None:
                state.begin()
            try:
                for index, batch in enumerate(self.batches):
                    if state is not None and index == len(self.batches) - 1:
                        state.end_of_dataloader = True
                    yield dict(batch)
            finally:
                if state is not None:
                    state.end()
            return
        kept: list | None = []
        size = 0
        for batch in self.loader:
            if kept is not None:
                size += sum(value.nbytes for value in batch.values() if isinstance(value, torch.Tensor))
                if size <= self.max_bytes:
                    kept.append(batch)
                else:
                    kept = None
            yield dict(batch)
        if kept is not None:  # a full pass (an interrupted one keeps nothing)
            self.batches, self.complete = kept, True


def _evaluation_at(log_history: list[dict], first: bool) -> dict[str, float] | None:
    """The metrics of the evaluation before training (`first`: `eval_on_start`, at step 0) or of the last one.

    The last is the final `evaluate()` of the run when it made one (after the best checkpoint was loaded back).
    """
    evaluations = [entry for entry in log_history if any(key.startswith("eval_") for key in entry)]
    if first:
        evaluations = [entry for entry in evaluations if entry.get("step") == 0][:1]
    elif evaluations and evaluations[-1].get("step") == 0 and len(evaluations) == 1:
        evaluations = []  # only the baseline: nothing after training
    if not evaluations:
        return None
    entry = evaluations[0] if first else evaluations[-1]
    return {key: value for key, value in entry.items() if key.startswith("eval_")}


def _matmul_weights(*modules: nn.Module) -> int:
    """Elements of the weight matrices (and convolution kernels) of `modules`; embedding tables are looked up, not
    multiplied, and do not count."""
    tables = {
        id(p) for module in modules for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    return sum(p.numel() for module in modules for p in module.parameters() if p.ndim >= 2 and id(p) not in tables)


def _row_relations(
    inputs: dict, hard_negatives: torch.Tensor | None, hard_negative_valid: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """What the loss needs to know about a batch's rows besides their embeddings: which image each shows (rows of one
    image are never each other's negatives) and their hard negatives. Empty for a batch with neither."""
    relations = {}
    if inputs.get("image_ids") is not None:
        relations["image_ids"] = inputs["image_ids"]
    if hard_negatives is not None:
        relations["hard_negatives"] = hard_negatives
        relations["hard_negative_valid"] = hard_negative_valid
    return relations


def _prepare_for_sharding(model: torch.nn.Module, fsdp: bool) -> list[str]:
    """Makes a model wrappable by accelerate's FSDP2 and DeepSpeed (accelerate 1.16, torch 2.13, DeepSpeed 0.19);
    returns the names of the parameters it reshaped, which the saves turn back.

    - `fully_shard` refuses 0-dimensional parameters, and DeepSpeed's broadcast of the weights cannot view one as
      bytes; CLIP keeps `logit_scale` as one. Each becomes shape `(1,)` in place (the same parameter object, so the
      optimizer groups and the towers' locks still hold it). The model's forward broadcasts it as before, and the
      loss reads it as a scalar whatever its shape.
    - FSDP: accelerate puts `model.get_input_embeddings()` in a sharding unit of its own (for a language model's
      embedding and head). A two-tower model has two input embeddings, one per tower: CLIP raises
      `NotImplementedError` there, and SigLIP answers with its text tower's token embedding, whose parent module
      (`SiglipTextEmbeddings`, one of its `_no_split_modules`) accelerate has sharded already, and sharding it again
      fails. This model answers "none", which leaves each tower's embeddings in its tower's units.
    """
    reshaped = []
    for name, parameter in model.named_parameters():
        if parameter.dim() == 0:
            parameter.data = parameter.data.reshape(1)
            reshaped.append(name)
    if fsdp:
        model.get_input_embeddings = lambda: None
    return reshaped


def _finished_state(output_dir: str, checkpoint_state: TrainerState) -> TrainerState | None:
    """The `trainer_state.json` a finished run saved in `output_dir` after its training, when it continues
    `checkpoint_state` (the same step, the checkpoint's log its beginning); `None` when there is none."""
    path = os.path.join(output_dir, TRAINER_STATE_NAME)
    try:
        finished = TrainerState.load_from_json(path)
    except (OSError, ValueError, TypeError):
        return None
    logged = checkpoint_state.log_history
    if finished.global_step != checkpoint_state.global_step or finished.log_history[: len(logged)] != logged:
        return None
    return finished


def _finished_train_metrics(output_dir: str) -> dict[str, float]:
    """The training figures a finished run left in `output_dir/train_results.json` (loss, runtime, samples/s, FLOPs),
    for a "resume" that trains nothing; empty when there are none."""
    import json

    path = os.path.join(output_dir, "train_results.json")
    try:
        with open(path) as handle:
            saved = json.load(handle)
    except (OSError, ValueError):
        return {}
    keys = ("train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos")
    return {key: saved[key] for key in keys if isinstance(saved.get(key), int | float) and math.isfinite(saved[key])}


class WorkersLeaveStopSignals:
    """`worker_init_fn` of clip-trainer's DataLoaders: a worker ignores SIGTERM and SIGINT, then runs `then` (the
    Trainer's own `worker_init_fn`, if any).

    A cluster scheduler, `timeout` or a terminal's Ctrl-C signals the whole process group, workers included. A worker
    killed by SIGTERM takes the main process down with "DataLoader worker is killed by signal" before it can save the
    checkpoint its own handler ([`StopOnSignalCallback`]) promises. The main process alone decides: it finishes the
    step, saves and stops, and shuts its workers down as usual; a worker whose main process died exits on its own
    (torch's workers watch their parent). A class, so that workers started by spawn can unpickle it.
    """

    def __init__(self, then: Callable[[int], None] | None = None) -> None:
        self.then = then
        _stop_workers_at_exit()

    def __call__(self, worker_id: int) -> None:
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.then is not None:
            self.then(worker_id)


_WORKERS_STOPPED_AT_EXIT = False


def _stop_workers_at_exit() -> None:
    """Registers, once per process, an exit handler that kills the DataLoader workers still alive.

    torch leaves the workers of an iterator that is still referenced at exit to `multiprocessing`, whose own exit
    handler terminates daemon processes with SIGTERM and then waits for them; a worker that ignores SIGTERM (see
    [`WorkersLeaveStopSignals`]) would keep the process from ever exiting. Registered after `multiprocessing`'s, this
    handler runs before it (exit handlers run last-registered first), and a worker has nothing to save.
    """
    global _WORKERS_STOPPED_AT_EXIT
    if _WORKERS_STOPPED_AT_EXIT:
        return
    _WORKERS_STOPPED_AT_EXIT = True
    import atexit
    import multiprocessing.util  # noqa: F401 - registers its exit handler now, if it has not yet: ours must come after

    atexit.register(_kill_dataloader_workers)


def _kill_dataloader_workers() -> None:
    import multiprocessing
    import signal

    # The daemon processes `multiprocessing` would terminate next (a started process no longer says what it runs);
    # DataLoader workers are daemons.
    workers = [process for process in multiprocessing.active_children() if process.daemon]
    if workers:
        try:  # torch's SIGCHLD handler would raise "DataLoader worker ... is killed by signal" for each one
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        except ValueError:  # not the main thread: nothing to reset there
            pass
    for process in workers:
        process.kill()
    for process in workers:
        process.join(timeout=5)
