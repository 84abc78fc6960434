"""Counting the floating-point work of a CLIP training step, and the utilisation it reaches (MFU).

`torch.utils.flop_counter.FlopCounterMode` counts matmuls, convolutions and the fused attention kernels of CUDA; what
it lacks is a formula for the CPU's fused attention kernel, which is added here so the same model counts the same
on either device. Only matmul-like work is counted (element-wise ops, norms and softmax are not), as MFU figures
usually are; a fused attention backward counts its recomputation of the attention scores, as the counter does.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter

from clip_trainer.loss import clip_loss

# Inputs of a CLIP model's forward; everything else in a batch (row ids, skip counts) is left out.
MODEL_INPUT_KEYS = ("pixel_values", "input_ids", "attention_mask", "position_ids")


def _cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_flash_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def _extra_flop_formulas() -> dict[Any, Any]:
    """Formulas for the CPU's fused attention, which `FlopCounterMode` would otherwise count as zero."""
    formulas = {}
    aten = torch.ops.aten
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_attention_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_flash_attention_backward_flops
    return formulas


def _model_inputs(batch: Mapping[str, Any], device: torch.device, rows: int | None = None) -> dict[str, torch.Tensor]:
    inputs = {}
    for key in MODEL_INPUT_KEYS:
        value = batch.get(key)
        if value is None:
            continue
        if rows is not None:
            value = value[:rows]
        if key == "pixel_values" and not torch.is_floating_point(value):
            # The collator's uint8 pixels; the cost of a step does not depend on their values.
            value = value.float()
        inputs[key] = value.to(device)
    return inputs


def count_training_step_flops(model: nn.Module, batch: Mapping[str, Any]) -> int:
    """FLOPs of one forward and backward pass of `model` on `batch` with CLIP's contrastive loss.

    The step is the one [`CLIPContrastiveTrainer`] runs: the model's normalised embeddings, then [`clip_loss`]. No
    optimizer step is taken, gradients that existed before are put back, and the random number generators are
    restored, so the model leaves exactly as it came (weights, `.grad`, train/eval mode).

    Args:
        model (`nn.Module`): a `CLIPModel` (anything returning `image_embeds`, `text_embeds` with a `logit_scale`).
        batch (`Mapping[str, Any]`): model inputs (`pixel_values`, `input_ids`, `attention_mask`); other keys are
            ignored and `uint8` pixels are converted to float.

    Returns:
        `int`: the counted FLOPs for the whole batch.
    """
    device = next(model.parameters()).device
    inputs = _model_inputs(batch, device)
    parameters = list(model.parameters())
    saved_grads = [parameter.grad for parameter in parameters]
    for parameter in parameters:
        parameter.grad = None
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices), torch.enable_grad():
            counter = flop_counter.FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())
            with counter:
                outputs = model(**inputs, return_loss=False)
                loss = clip_loss(outputs.image_embeds.float(), outputs.text_embeds.float(), model.logit_scale.exp())
                loss.backward()
    finally:
        # Put the caller's gradients back (the same tensors, not copies): the count leaves no trace.
        for parameter, grad in zip(parameters, saved_grads):
            parameter.grad = grad
    return counter.get_total_flops()


def training_flops_per_sample(
    model: nn.Module, batch: Mapping[str, Any], train_batch_size: int | None = None
) -> float:
    """FLOPs of one training step (forward + backward) per image-text pair, counted with `FlopCounterMode`.

    A CLIP step costs the same per pair at any batch size except for the `batch x batch` logits matmul, which is
    tiny next to the towers (3 KFLOP per pair at batch 256 against 44 GFLOP for ViT-B/32). Counting a small batch
    and dividing is therefore exact up to that term; with `train_batch_size` it is corrected too, by counting the
    batch and its first half and extrapolating the `a + c * batch` cost per pair to `train_batch_size`.

    Run it before training starts: it runs a backward pass (whose gradients are discarded, see
    [`count_training_step_flops`]) and needs the memory of one small step.

    Args:
        model (`nn.Module`): the CLIP model, on the device it trains on.
        batch (`Mapping[str, Any]`): a few rows of training inputs, with the caption length of training batches.
        train_batch_size (`int`, *optional*): the per-device batch size of training, for the logits correction.

    Returns:
        `float`: FLOPs per image-text pair and training step.
    """
    rows = int(batch["input_ids"].shape[0])
    if rows < 1:
        raise ValueError("`batch` has no rows; give at least one (two for the `train_batch_size` correction).")
    total = count_training_step_flops(model, batch)
    if train_batch_size is None or rows < 2:
        return total / rows
    half = rows // 2
    half_total = count_training_step_flops(model, _model_inputs(batch, torch.device("cpu"), rows=half))
    # Per-pair cost f(n) = a + c * n, with c * n the pair's share of the quadratic logits matmul.
    slope = (total / rows - half_total / half) / (rows - half)
    return total / rows + slope * (train_batch_size - rows)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_flops(
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    n: int | None = None,
    iterations: int | None = None,
) -> float:
    """The FLOP/s the device reaches on a large square matmul: the practical peak that MFU is measured against.

    Args:
        device (`torch.device` or `str`): where to measure.
        dtype (`torch.dtype`, *optional*): defaults to `bfloat16` on CUDA (what mixed-precision training runs its
            matmuls in) and `float32` on the CPU (where training runs in float32).
        n (`int`, *optional*): matrix side; defaults to 8192 on CUDA and 1024 on the CPU.
        iterations (`int`, *optional*): timed matmuls per repeat; defaults to 20 on CUDA and 5 on the CPU.

    Returns:
        `float`: FLOP/s of the fastest of three timed repeats (`2 n^3` FLOPs per matmul). GPU time is taken with
        CUDA events, so the figure does not include launch latency.
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if on_cuda else torch.float32)
    n = n or (8192 if on_cuda else 1024)
    iterations = iterations or (20 if on_cuda else 5)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):  # warm-up: kernel selection, clocks
        torch.mm(a, b, out=out)
    _synchronize(device)
    best = float("inf")
    for _ in range(3):
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iterations):
                torch.mm(a, b, out=out)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000.0
        else:
            started = time.perf_counter()
            for _ in range(iterations):
                torch.mm(a, b, out=out)
            seconds = time.perf_counter() - started
        best = min(best, seconds)
    return 2.0 * n**3 * iterations / best


def mfu(samples_per_second: float, flops_per_sample: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: the share of `peak_flops` that `samples_per_second` training pairs amount to."""
    if peak_flops <= 0:
        raise ValueError(f"`peak_flops` must be positive, got {peak_flops}.")
    return samples_per_second * flops_per_sample / peak_flops
