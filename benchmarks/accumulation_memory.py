"""Peak memory and throughput of one big batch against cached and independent accumulation, at several batch sizes.

For each effective batch size (default 64, 128, 256, 512) and each mode, one training step's forward and backward
(no optimizer) runs in a fresh subprocess, so that every figure is a clean high-water mark:

  plain        the whole batch in one forward and backward: every pair against every other, activations of the
               whole batch in memory at once.
  cached       `GradientCache` over micro-batches of `--micro-batch` pairs: the same loss and gradients as `plain`,
               activations of one micro-batch, a second forward per micro-batch.
  independent  plain gradient accumulation: each micro-batch's own loss (negatives from its micro-batch only),
               activations of one micro-batch, one forward per micro-batch.

With `--checkpointing on` (or `both`: each configuration with and without), the towers' encoder layers keep no
activations in the forward and recompute them in the backward (transformers' activation checkpointing, what the
Trainer's `gradient_checkpointing` turns on): the activations of a step shrink to the layers' inputs, at the cost of
a third (or, in the cached mode, a second extra) forward.

Peak memory is `torch.cuda.max_memory_allocated` on a GPU. On the CPU, torch's allocations are invisible to
`tracemalloc`, so it is the rise of the process's maximum resident set size (`getrusage`) from after the model, its
gradients and the inputs exist (before the warm-up step) to the end of the timed steps: the step's own working
memory, blurred by the allocator's reuse of freed memory, so compare modes rather than read absolute figures.

Samples/s is the effective batch size over the median time of the timed steps (after one warm-up step); the median,
because on a shared machine a single slow step says more about the neighbours than about the method.

Usage:
    python benchmarks/accumulation_memory.py                       # tiny model, CPU: about a minute on 2 cores
    python benchmarks/accumulation_memory.py --preset vit-b-32     # ViT-B/32 architecture, random weights (GPU)
    python benchmarks/accumulation_memory.py --batch-sizes 256,1024 --micro-batch 64 --modes plain,cached
    python benchmarks/accumulation_memory.py --batch-sizes 256 --modes plain,cached --checkpointing both

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import CLIPConfig, CLIPModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clip_trainer.gradient_cache import GradientCache  # noqa: E402
from clip_trainer.loss import clip_loss  # noqa: E402

PRESETS: dict[str, dict] = {
    # A small model whose activations are large enough to measure on a CPU.
    "tiny": {
        "vision_config": {"hidden_size": 96, "intermediate_size": 384, "num_hidden_layers": 3,
                          "num_attention_heads": 4, "image_size": 64, "patch_size": 8},
        "text_config": {"hidden_size": 96, "intermediate_size": 384, "num_hidden_layers": 3,
                        "num_attention_heads": 4, "max_position_embeddings": 32, "vocab_size": 1024},
        "projection_dim": 96,
    },
    # The architecture of openai/clip-vit-base-patch32, built in code with random weights (nothing is downloaded).
    "vit-b-32": {
        "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "image_size": 224, "patch_size": 32},
        "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                        "num_attention_heads": 8, "max_position_embeddings": 77, "vocab_size": 49408},
        "projection_dim": 512,
    },
}  # fmt: skip
MODES = ("plain", "cached", "independent")


def build_model(preset: str, device: torch.device, checkpointing: bool = False) -> CLIPModel:
    spec = PRESETS[preset]
    text = {
        **spec["text_config"],
        "bos_token_id": 0,
        "pad_token_id": 1,
        "eos_token_id": spec["text_config"]["vocab_size"] - 1,
    }
    config = CLIPConfig(text_config=text, vision_config=spec["vision_config"], projection_dim=spec["projection_dim"])
    torch.manual_seed(0)
    model = CLIPModel._from_config(config, attn_implementation="sdpa").to(device)
    if checkpointing:  # as `Trainer.train` turns it on for `gradient_checkpointing` (non-reentrant checkpoints)
        model.activation_checkpointing_enable()
    model.train()
    return model


def make_batch(model: CLIPModel, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random pixels and captions that fill the text context (the fixed 77 tokens of open_clip, for ViT-B/32)."""
    vision, text = model.config.vision_config, model.config.text_config
    input_ids = torch.randint(2, text.eos_token_id, (size, text.max_position_embeddings), device=device)
    input_ids[:, -1] = text.eos_token_id
    return {
        "pixel_values": torch.randn(size, 3, vision.image_size, vision.image_size, device=device),
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
    }


class Step:
    """One optimizer step's forward and backward in each mode, with the callables the trainer gives [`GradientCache`]."""

    def __init__(self, model: CLIPModel, micro_batch: int, accumulation: int, bf16: bool) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.bf16 = bf16
        self.cache = GradientCache(
            embed=self.embed,
            loss_scalars=lambda: (model.logit_scale.exp(),),
            loss=lambda images, texts, scale, pad_to, valid: clip_loss(images, texts, scale, valid=valid),
            backward=lambda loss: loss.backward(),
            micro_batch_size=micro_batch,
            accumulation_steps=accumulation,
        )

    def embed(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        context = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with context:
            outputs = self.model(**inputs, return_loss=False)
        return outputs.image_embeds.float(), outputs.text_embeds.float()

    def run(self, mode: str, batches: list[dict], whole: dict) -> None:
        self.model.zero_grad(set_to_none=False)  # gradients stay allocated, as between an optimizer's steps
        scale = self.model.logit_scale.exp
        if mode == "plain":
            clip_loss(*self.embed(whole), scale()).backward()
        elif mode == "cached":
            self.cache.start_step(batches)
            for batch in batches:
                self.cache.training_step(batch)
        else:
            for batch in batches:
                (clip_loss(*self.embed(batch), scale()) / len(batches)).backward()


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def worker(options: argparse.Namespace) -> dict:
    """Runs one configuration in this (fresh) process and returns its figures."""
    device = torch.device(options.device)
    model = build_model(options.preset, device, options.checkpointing == "on")
    micro = min(options.micro_batch, options.batch_size)
    sizes = [micro] * (options.batch_size // micro) + (
        [options.batch_size % micro] if options.batch_size % micro else []
    )
    whole = make_batch(model, options.batch_size, device)
    # The micro-batches are views of the whole batch: both modes hold the same inputs.
    batches = [{key: value[start : start + size] for key, value in whole.items()}
               for start, size in zip(range(0, options.batch_size, micro), sizes)]  # fmt: skip
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    step = Step(model, micro, len(batches), options.bf16)

    cuda = device.type == "cuda"
    # On the CPU the high-water mark cannot be reset, so the warm-up step counts towards it, from a baseline taken
    # before it; on the GPU the peak is measured over the timed steps alone.
    baseline = max_rss_bytes()
    step.run(options.mode, batches, whole)  # warm-up (kernels, allocator)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    step_times = []
    for _ in range(options.steps):
        start = time.perf_counter()
        step.run(options.mode, batches, whole)
        if cuda:
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - baseline if cuda else max_rss_bytes() - baseline
    return {
        "preset": options.preset,
        "mode": options.mode,
        "batch_size": options.batch_size,
        "micro_batch": micro if options.mode != "plain" else options.batch_size,
        "negatives_per_pair": options.batch_size - 1 if options.mode != "independent" else micro - 1,
        "checkpointing": options.checkpointing == "on",
        "peak_memory_mib": round(peak / 2**20, 1),
        "samples_per_second": round(options.batch_size / statistics.median(step_times), 1),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "bf16": options.bf16,
    }


def run_isolated(options: argparse.Namespace, mode: str, batch_size: int, checkpointing: bool = False) -> dict:
    """`worker` in a fresh interpreter: the CPU's max-RSS high-water mark cannot be reset inside one process."""
    command = [
        sys.executable, __file__, "--worker", "--preset", options.preset, "--mode", mode,
        "--batch-size", str(batch_size), "--micro-batch", str(options.micro_batch), "--steps", str(options.steps),
        "--device", options.device, "--checkpointing", "on" if checkpointing else "off",
    ] + (["--bf16"] if options.bf16 else [])  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        failure = "out of memory" if "out of memory" in result.stderr.lower() else result.stderr.strip()[-300:]
        return {"mode": mode, "batch_size": batch_size, "checkpointing": checkpointing, "error": failure}
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    header = f"{'batch':>6} {'mode':<12} {'ckpt':<5} {'micro':>6} {'negatives':>10} {'peak MiB':>10} {'samples/s':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        checkpointing = "on" if row.get("checkpointing") else "off"
        if "error" in row:
            print(f"{row['batch_size']:>6} {row['mode']:<12} {checkpointing:<5} {'':>6} {row['error'][:40]:>33}")
            continue
        print(
            f"{row['batch_size']:>6} {row['mode']:<12} {checkpointing:<5} {row['micro_batch']:>6} "
            f"{row['negatives_per_pair']:>10} {row['peak_memory_mib']:>10.1f} {row['samples_per_second']:>10.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--batch-sizes", default="64,128,256,512", help="Effective batch sizes, comma-separated.")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--modes", default=",".join(MODES), help=f"Comma-separated subset of {', '.join(MODES)}.")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps after one warm-up step.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the towers (loss stays float32).")
    parser.add_argument(
        "--checkpointing",
        choices=("off", "on", "both"),
        default="off",
        help="Activation checkpointing of the encoder layers (the Trainer's `gradient_checkpointing`); `both` runs "
        "every configuration without and with it.",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        print(json.dumps(worker(options)))
        return

    rows = []
    for batch_size in (int(size) for size in options.batch_sizes.split(",")):
        for mode in options.modes.split(","):
            for checkpointing in {"off": [False], "on": [True], "both": [False, True]}[options.checkpointing]:
                rows.append(run_isolated(options, mode, batch_size, checkpointing))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress
    device = next((row["device"] for row in rows if "device" in row), options.device)
    memory = "torch.cuda.max_memory_allocated" if options.device.startswith("cuda") else "max RSS rise"
    print(f"preset {options.preset}, micro-batch {options.micro_batch}, device {device}, peak memory: {memory}")
    print_table(rows)
    print(json.dumps({"preset": options.preset, "micro_batch": options.micro_batch, "results": rows}))


if __name__ == "__main__":
    main()
