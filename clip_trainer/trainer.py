"""`CLIPContrastiveTrainer`: `transformers.Trainer` with CLIP's contrastive loss and retrieval evaluation."""

from __future__ import annotations

import dataclasses
import difflib
import time
from collections import defaultdict

import torch
from torch import nn
from transformers import EarlyStoppingCallback, Trainer
from transformers.utils import logging

from .arguments import CLIPTrainingArguments, ConfigError
from .callbacks import ClampLogitScaleCallback
from .collator import ImageTextCollator
from .evaluation import DEFAULT_ZEROSHOT_TEMPLATES, build_zeroshot_classifier, retrieval_metrics, zeroshot_accuracy
from .faults import NonFiniteLossCallback
from .loss import contrastive_loss

logger = logging.get_logger(__name__)

# Batch entries that describe the rows and are not model inputs.
ROW_INFO_KEYS = ("image_ids", "class_labels", "skipped_samples", "valid")


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


class CLIPContrastiveTrainer(Trainer):
    """A `transformers.Trainer` for CLIP models trained on image-caption pairs.

    - `compute_loss` is CLIP's symmetric cross-entropy over normalised embeddings ([`contrastive_loss`]); with several
      processes and `gather_negatives` each process contrasts its pairs against the global batch.
    - The optimizer applies no weight decay to biases, norms, embeddings and `logit_scale`; `logit_scale` is clamped at
      `log(max_logit_scale)` after every step; the temperature is logged.
    - Evaluation collects the embeddings of the whole validation set (across processes) and reports retrieval recall
      and, when `class_names` are given, zero-shot accuracy next to `eval_loss`, so `metric_for_best_model` and early
      stopping can use them.
    - Images arrive from [`ImageTextCollator`] as `uint8`; they are normalised on the device.

    Args:
        class_names (`list[str]`, *optional*): zero-shot classes, indexed by the batches' `class_labels`.
        zeroshot_templates (`list[str]`, *optional*): prompts with one `{}` for the class name.
        Other arguments are those of `transformers.Trainer`; `processing_class` must be the `CLIPProcessor`.
    """

    def __init__(
        self,
        *args,
        class_names: list[str] | None = None,
        zeroshot_templates: list[str] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        # --- args -------------------------------------------------------------------------------------------------
        if not isinstance(self.args, CLIPTrainingArguments):
            raise ConfigError("CLIPContrastiveTrainer needs `CLIPTrainingArguments` (clip_trainer.arguments).")
        # --- model ------------------------------------------------------------------------------------------------
        if not hasattr(self.model, "logit_scale"):
            raise ConfigError(
                f"{type(self.model).__name__} has no `logit_scale`; CLIPContrastiveTrainer needs a CLIPModel."
            )
        # The loss is ours: the model is never asked for one.
        self.model_accepts_loss_kwargs = False
        # --- data -------------------------------------------------------------------------------------------------
        image_processor = getattr(self.processing_class, "image_processor", None)
        if image_processor is None:
            raise ConfigError("`processing_class` must be a CLIPProcessor (tokenizer + image processor).")
        # uint8 pixels are mapped to the processor's normalised values in one multiply-add: x * scale + shift.
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(1, -1, 1, 1)
        self._pixel_scale = 1.0 / (255.0 * std)
        self._pixel_shift = -mean / std
        # --- loss -------------------------------------------------------------------------------------------------
        self.add_callback(ClampLogitScaleCallback(self.args.log_max_logit_scale))
        # Skips updates whose loss or gradients are NaN/inf, stops after `max_nonfinite_steps` in a row. Added after
        # the Trainer's reporters, so its `on_train_end` (which raises when it stopped the run) runs once they closed.
        self.nonfinite_guard = NonFiniteLossCallback(self.args.max_nonfinite_steps)
        self.add_callback(self.nonfinite_guard)
        self.gradient_cache = None
        if self.args.gradient_accumulation_steps > 1 and self.args.accumulation_mode == "cached":
            from .gradient_cache import GradientCache

            self.gradient_cache = GradientCache()
        # --- metrics ----------------------------------------------------------------------------------------------
        self.class_names = class_names
        self.zeroshot_templates = list(zeroshot_templates or DEFAULT_ZEROSHOT_TEMPLATES)
        if self.args.early_stopping_patience is not None:
            self.add_callback(
                EarlyStoppingCallback(self.args.early_stopping_patience, self.args.early_stopping_threshold)
            )
        # A device tensor once training runs (see `training_step`); read at logging steps only.
        self._skipped_samples: int | torch.Tensor = 0
        self._filter_nonfinite_loss = self.args.logging_nan_inf_filter
        self._samples_since_log = 0
        self._flops_since_log = 0
        self._tower_weights: tuple[int, int] | None = None
        self._last_log_time: float | None = None
        self._eval_buffer: dict[str, list[torch.Tensor]] | None = None
        # --- hub ------------------------------------------------------------------------------------------------
        # What the model card says about the run (set by run.py); the final evaluation's metrics go in too.
        self.card_info: dict | None = None
        self.final_eval_metrics: dict[str, float] | None = None

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
        groups = [
            {"params": [p for n, p in named if n not in no_decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0},
        ]
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
    def _prepare_inputs(self, inputs: dict) -> dict:
        inputs = super()._prepare_inputs(inputs)
        pixels = inputs.get("pixel_values")
        if pixels is not None and pixels.dtype == torch.uint8:
            if self._pixel_scale.device != pixels.device:
                self._pixel_scale = self._pixel_scale.to(pixels.device)
                self._pixel_shift = self._pixel_shift.to(pixels.device)
            inputs["pixel_values"] = torch.addcmul(self._pixel_shift, pixels.float(), self._pixel_scale)
        return inputs

    def logit_scale(self) -> torch.Tensor:
        """The inverse temperature `exp(logit_scale)`, with its gradient."""
        return self.model.logit_scale.exp()

    def embed(self, model: nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image and text embeddings of a batch, in float32 for the loss."""
        model_inputs = {key: value for key, value in inputs.items() if key not in ROW_INFO_KEYS}
        outputs = model(**model_inputs, return_loss=False)
        return outputs.image_embeds.float(), outputs.text_embeds.float()

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        all_image_embeds, all_text_embeds = self.embed(model, inputs)
        image_embeds, text_embeds = all_image_embeds, all_text_embeds
        if "valid" in inputs:  # evaluation keeps unusable rows as placeholders; they are no pairs
            image_embeds, text_embeds = image_embeds[inputs["valid"]], text_embeds[inputs["valid"]]
        batch_size = self.args.per_device_train_batch_size if model.training else self.args.per_device_eval_batch_size
        loss = contrastive_loss(
            image_embeds,
            text_embeds,
            self.logit_scale(),
            gather_negatives=self.args.gather_negatives,
            pad_to=max(batch_size, image_embeds.shape[0]),
        )
        if return_outputs:
            return loss, {"image_embeds": all_image_embeds, "text_embeds": all_text_embeds}
        return loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.gradient_cache is not None:
            # The cached accumulation needs every micro-batch of the optimizer step before the first backward.
            self.gradient_cache.start_step(batch_samples)
        return batch_samples, num_items_in_batch

    def training_step(self, model, inputs, num_items_in_batch=None):
        skipped = inputs.get("skipped_samples")
        if skipped is not None:
            # accelerate has already moved the batch to the device: `int(skipped)` would wait for the device at every
            # step. The count is summed where it is and read at logging steps, which synchronise anyway.
            self._skipped_samples = self._skipped_samples + skipped
        self._samples_since_log += inputs["input_ids"].shape[0]
        if self.args.peak_tflops is not None:
            self._flops_since_log += self.floating_point_ops(inputs)
        if self.gradient_cache is not None and self.gradient_cache.owns(inputs):
            loss = self.gradient_cache.training_step(self, model, inputs)
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite_guard.observe_loss(loss)
        if self._filter_nonfinite_loss:
            # `logging_nan_inf_filter`, on the device: a NaN or inf loss is logged as the average of the losses since
            # the last log, which is what the Trainer substitutes. Only the logged value changes, never a gradient.
            since_log = 1 + self.state.global_step - self._globalstep_last_logged
            loss = torch.where(torch.isfinite(loss), loss, self._tr_loss.to(loss.dtype) / since_log)
        return loss

    def floating_point_ops(self, inputs: dict) -> int:
        """Training FLOPs of a batch for `total_flos`: 6 x matmul weights x tokens, tower by tower.

        transformers' estimate multiplies every parameter by the text tokens alone (for ViT-B/32 it says 58 GFLOP per
        pair where `clip_trainer.flops` counts 44), and it walks every module to count the parameters at every
        step; the towers' weights are counted once here.
        """
        model = self.accelerator.unwrap_model(self.model)
        pixels, input_ids = inputs.get("pixel_values"), inputs.get("input_ids")
        if pixels is None or input_ids is None or not hasattr(model, "vision_model"):
            return super().floating_point_ops(inputs)
        if self._tower_weights is None:
            self._tower_weights = (
                _matmul_weights(model.vision_model, model.visual_projection),
                _matmul_weights(model.text_model, model.text_projection),
            )
        vision, text = self._tower_weights
        patch = model.config.vision_config.patch_size
        image_tokens = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch) + 1  # patches and the class token
        return 6 * input_ids.shape[0] * (vision * image_tokens + text * input_ids.shape[1])

    # ------------------------------------------------------------------------------------------------------------
    # Logging
    # ------------------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the temperature, the throughput and the skip counts to the Trainer's training logs.

        Evaluation metrics need no buffer: they are computed once over the whole set in `evaluation_loop`.
        """
        logs = dict(logs)
        if "loss" in logs and not any(key.startswith("eval_") for key in logs):
            scale = self.model.logit_scale.detach().exp().item()
            logs["logit_scale"] = round(scale, 4)
            logs["temperature"] = round(1.0 / scale, 6)
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
            skipped = int(self._skipped_samples)
            if skipped:
                logs["skipped_samples"] = skipped
            if self.nonfinite_guard.skipped_steps:
                logs["nonfinite_steps_skipped"] = self.nonfinite_guard.skipped_steps
        super().log(logs, start_time)

    def _inner_training_loop(self, *args, **kwargs):
        self._last_log_time, self._samples_since_log, self._flops_since_log = time.perf_counter(), 0, 0
        # transformers applies `logging_nan_inf_filter` by reading every step's loss on the host
        # (`torch.isnan(loss) or ...`), a device synchronisation per step; `training_step` filters on the device
        # instead, so the Trainer's own check is off while training (evaluation switches it back, see below).
        self._filter_nonfinite_loss = self.args.logging_nan_inf_filter
        self.args.logging_nan_inf_filter = False
        try:
            return super()._inner_training_loop(*args, **kwargs)
        finally:
            self.args.logging_nan_inf_filter = self._filter_nonfinite_loss

    def create_model_card(self, *args, **kwargs) -> None:
        """Writes clip-trainer's model card (metrics before/after, curves, usage) instead of the generic one.

        `Trainer.push_to_hub` calls this just before uploading `output_dir`.
        """
        if self.card_info is None or not self.is_world_process_zero():
            return super().create_model_card(*args, **kwargs)
        from .hub import document_run

        document_run(self, self.card_info, self.final_eval_metrics)

    # ------------------------------------------------------------------------------------------------------------
    # Evaluation
    # ------------------------------------------------------------------------------------------------------------
    def get_eval_dataloader(self, eval_dataset=None):
        """Evaluation batches keep unusable rows as flagged placeholders (see [`ImageTextCollator`])."""
        collator = self.data_collator
        if isinstance(collator, ImageTextCollator):
            self.data_collator = dataclasses.replace(collator, keep_invalid_rows=True)
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = collator

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Computes the batch's loss and keeps its embeddings (gathered from every process) for retrieval."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
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
        # Evaluation filters its losses on the host as transformers does (it reads them there anyway).
        filter_during_training = self.args.logging_nan_inf_filter
        self.args.logging_nan_inf_filter = self._filter_nonfinite_loss
        try:
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
            collected = {key: torch.cat(values) for key, values in self._eval_buffer.items()}
        finally:
            self._eval_buffer = None
            self.args.logging_nan_inf_filter = filter_during_training
        valid = collected.pop("valid", None)
        if valid is not None:
            collected = {key: value[valid] for key, value in collected.items()}
        if collected.get("image_embeds") is not None and len(collected["image_embeds"]) > 0:
            metrics = self.compute_embedding_metrics(collected)
            output.metrics.update({f"{metric_key_prefix}_{key}": value for key, value in metrics.items()})
            output.metrics[f"{metric_key_prefix}_logit_scale"] = self.model.logit_scale.detach().exp().item()
        return output

    def compute_embedding_metrics(self, collected: dict[str, torch.Tensor]) -> dict[str, float]:
        """Retrieval recall over the whole evaluation set, and zero-shot accuracy when classes are known."""
        metrics = retrieval_metrics(
            collected["image_embeds"],
            collected["text_embeds"],
            collected.get("image_ids"),
            chunk_size=self.args.retrieval_chunk_size,
        )
        if self.class_names and "class_labels" in collected:
            classifier = build_zeroshot_classifier(self.encode_text, self.class_names, self.zeroshot_templates)
            metrics.update(zeroshot_accuracy(collected["image_embeds"], collected["class_labels"], classifier))
        return metrics

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Normalised text embeddings from the model being trained (for zero-shot class prompts)."""
        model = self.model
        was_training = model.training
        model.eval()
        tokenizer = self.processing_class.tokenizer
        max_length = model.config.text_config.max_position_embeddings
        chunks = []
        for start in range(0, len(texts), 256):
            tokens = tokenizer(
                texts[start : start + 256], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(self.args.device)
            with self.compute_loss_context_manager():
                features = model.get_text_features(**tokens)
            features = getattr(features, "pooler_output", features)
            chunks.append(nn.functional.normalize(features.float(), dim=-1).cpu())
        model.train(was_training)
        return torch.cat(chunks)


def _matmul_weights(*modules: nn.Module) -> int:
    """Elements of the weight matrices (and convolution kernels) of `modules`; embedding tables are looked up, not
    multiplied, and do not count."""
    tables = {
        id(p) for module in modules for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    return sum(p.numel() for module in modules for p in module.parameters() if p.ndim >= 2 and id(p) not in tables)


def check_metric_for_best_model(args: CLIPTrainingArguments, has_labels: bool) -> None:
    """Fails fast when `metric_for_best_model` names a metric that evaluation will never compute."""
    from .evaluation import RETRIEVAL_METRIC_NAMES, ZEROSHOT_METRIC_NAMES

    metric = args.metric_for_best_model
    if metric is None:
        return
    name = metric[len("eval_") :] if metric.startswith("eval_") else metric
    known = {"loss", "logit_scale", *RETRIEVAL_METRIC_NAMES}
    if has_labels:
        known.update(ZEROSHOT_METRIC_NAMES)
    if name not in known:
        if name in ZEROSHOT_METRIC_NAMES:
            hint = " (zero-shot metrics need `label_column`)"
        else:
            match = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean `eval_{match[0]}`?)" if match else ""
        raise ConfigError(
            f"`metric_for_best_model` is {metric!r}, which evaluation never computes{hint}. Choose one of: "
            + ", ".join(f"eval_{key}" for key in sorted(known))
            + "."
        )
