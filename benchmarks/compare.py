"""clip-trainer against open_clip and the stock Hugging Face recipe, on the demo's data, model and schedule.

One command trains the same model three ways and scores every result with one evaluator:

  clip-trainer   `run_clip.py` (this checkout), the demo's settings.
  open_clip      open_clip's own training script, `open_clip_train.main`, in open_clip's environment (the one CI
                 builds, `.venv-open-clip`, with the `open-clip` extra), through `benchmarks/open_clip_arm.py`.
  stock          transformers' example `examples/pytorch/contrastive-image-text/run_clip.py`, given with
                 `--stock-script` (it is not in the transformers package; take the file of the transformers release
                 you have installed; it needs torchvision, which `.venv-open-clip` has), run unchanged through
                 `benchmarks/stock_arm.py`.

Every arm gets, for each round: the bundled emoji data with the demo's held-out split for that round's seed (15%,
exactly the rows `run_clip.py configs/demo.json --seed S` holds out), the demo's tokenizer (trained on that split's
training captions, 2,048 tokens) and architecture (`configs/models/clip-tiny-64px.json`; open_clip gets the same
layers, widths, heads, activation and pooling as a model config), batch 64, 10 epochs, AdamW (lr 1e-3, weight decay
0.1, betas 0.9/0.999, eps 1e-8), 50 warm-up steps then cosine, gradient clipping at 1.0, fp32, one DataLoader worker,
no augmentation, no evaluation or checkpoint while training, and the same OpenMP thread policy (clip_trainer/
threads.py). The arms run one after the other, in a rotated order each round; round r uses seed 42 + r.

Reported per arm (medians over the rounds):
  samples/s   training pairs over the time of the training steps only (the Trainer's `train_runtime`; for open_clip
              the time inside its `train_one_epoch`), so start-up, data preparation and saving are left out;
  wall        the whole command, from start to exit (imports, data, training, saving);
  peak RSS    the maximum resident memory of the arm's main process (DataLoader workers not included);
  recall      one evaluator for all: each saved model (open_clip's through its own API, in its environment) embeds
              the held-out images (the same preprocessed pixels for every arm) and captions; recall@k is the share
              of held-out images whose own caption ranks in the top k among all held-out captions, and of captions
              whose own image does, averaged over both directions (rank = 1 + the number of candidates scored strictly
              higher).

Usage:
    python benchmarks/compare.py --stock-script PATH/TO/transformers/examples/pytorch/contrastive-image-text/run_clip.py
    python benchmarks/compare.py --arms clip-trainer,open_clip --rounds 1 --epochs 1    # a quick check

The last line printed is one JSON object with every run and the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

from clip_trainer.threads import OPENMP_ENVIRONMENT, set_openmp_environment  # noqa: E402

set_openmp_environment()  # this process embeds images and captions with torch too

ARMS = ("clip-trainer", "open_clip", "stock")
DEMO_CONFIG = REPO / "configs" / "demo.json"
OPEN_CLIP_MODEL = "clip-trainer-bench"
RECALL_KS = (1, 5, 10)
# The demo's optimisation, as every arm spells it (open_clip's AdamW defaults differ: betas 0.9/0.98, eps 1e-6).
BATCH_SIZE, LEARNING_RATE, WEIGHT_DECAY, WARMUP_STEPS, MAX_GRAD_NORM = 64, 1e-3, 0.1, 50, 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARMS)}")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (one seed each: 42, 43, ...); default 3")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (the demo's 10)")
    parser.add_argument("--max-train-samples", type=int, default=None, help="fewer training pairs, for a quick check")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs clip-trainer")
    parser.add_argument(
        "--open-clip-python",
        default=str(REPO / ".venv-open-clip" / "bin" / "python"),
        help="the Python of open_clip's environment (open_clip_torch with its training script)",
    )
    parser.add_argument("--stock-script", default=None, help="transformers' examples/.../run_clip.py (stock arm)")
    parser.add_argument(
        "--stock-python", default=None, help="the Python that runs the stock script (default: --open-clip-python)"
    )
    parser.add_argument("--work-dir", default=None, help="where runs are written (default: a temporary folder)")
    args = parser.parse_args(argv)
    args.arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if args.rounds < 1 or args.epochs < 1:
        parser.error("--rounds and --epochs must be at least 1")
    if "stock" in args.arms and args.stock_script is None:
        parser.error(
            "the stock arm needs --stock-script: transformers' examples/pytorch/contrastive-image-text/run_clip.py "
            "(from the transformers repository at your installed version), or leave `stock` out of --arms"
        )
    if args.stock_python is None:
        args.stock_python = args.open_clip_python
    return args


# ------------------------------------------------------------------------------------------------------------------
# The evaluator
# ------------------------------------------------------------------------------------------------------------------
def retrieval_recalls(image_embeds, text_embeds, ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """
    Recall@k of paired embeddings (row i of each is one pair), in both directions.

    Args:
        image_embeds, text_embeds (`torch.Tensor` or `numpy.ndarray` of shape `(n, dim)`):
            The embeddings; normalised here (cosine similarity).
        ks (`tuple[int, ...]`):
            The k of recall@k.

    Returns:
        `dict[str, float]`: `i2t_recall@k`, `t2i_recall@k` and their mean `recall@k` for each k. The rank of the
        right candidate is 1 + the number of candidates scored strictly higher.
    """
    import torch

    images = torch.nn.functional.normalize(torch.as_tensor(image_embeds, dtype=torch.float64), dim=-1)
    texts = torch.nn.functional.normalize(torch.as_tensor(text_embeds, dtype=torch.float64), dim=-1)
    if images.shape != texts.shape or images.ndim != 2:
        raise ValueError(
            f"paired embeddings of one shape expected, got {tuple(images.shape)} and {tuple(texts.shape)}"
        )
    scores = images @ texts.T
    right = scores.diagonal()
    ranks = {
        "i2t": 1 + (scores > right[:, None]).sum(dim=1),
        "t2i": 1 + (scores > right[None, :]).sum(dim=0),
    }
    result = {}
    for k in ks:
        for direction, rank in ranks.items():
            result[f"{direction}_recall@{k}"] = (rank <= k).double().mean().item()
        result[f"recall@{k}"] = (result[f"i2t_recall@{k}"] + result[f"t2i_recall@{k}"]) / 2
    return result


def embed_hf_model(model_dir: Path, pixels, captions: list[str]):
    """Normalised embeddings of a saved `CLIPModel` folder (its own tokenizer, captions padded to the model's
    positions), for the given preprocessed pixels."""
    import torch
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    length = model.config.text_config.max_position_embeddings
    images, texts = [], []
    with torch.no_grad():
        for start in range(0, len(captions), 256):
            tokens = tokenizer(
                captions[start : start + 256],
                padding="max_length",
                truncation=True,
                max_length=length,
                return_tensors="pt",
            )
            images.append(model.get_image_features(pixel_values=pixels[start : start + 256]).pooler_output)
            texts.append(model.get_text_features(**tokens).pooler_output)
    return torch.cat(images), torch.cat(texts)


# ------------------------------------------------------------------------------------------------------------------
# One round's data and starting point
# ------------------------------------------------------------------------------------------------------------------
def open_clip_model_config(config, tokenizer_dir: Path) -> dict[str, Any]:
    """An open_clip model config with the architecture of a `CLIPConfig` built from scratch: pre-norm ViT with a
    class token, causal text transformer pooled at the tokenizer's end token, quick-GELU, the same widths, depths,
    heads and projection, and the HF tokenizer folder as its tokenizer."""
    vision, text = config.vision_config, config.text_config
    if vision.hidden_act != "quick_gelu" or text.hidden_act != "quick_gelu":
        raise ValueError("open_clip's CLIP towers use GELU or quick-GELU; this benchmark maps quick-GELU only")
    return {
        "embed_dim": config.projection_dim,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "width": vision.hidden_size,
            "layers": vision.num_hidden_layers,
            "head_width": vision.hidden_size // vision.num_attention_heads,
            "mlp_ratio": vision.intermediate_size / vision.hidden_size,
        },
        "text_cfg": {
            "context_length": text.max_position_embeddings,
            "vocab_size": text.vocab_size,
            "width": text.hidden_size,
            "heads": text.num_attention_heads,
            "layers": text.num_hidden_layers,
            "mlp_ratio": text.intermediate_size / text.hidden_size,
            "hf_tokenizer_name": str(tokenizer_dir),
            "pool_type": "eos",
            "eos_id": text.eos_token_id,
            "pad_id": text.pad_token_id,
        },
    }


def prepare_round(seed: int, folder: Path, max_train_samples: int | None) -> dict[str, Any]:
    """The demo's split for `seed`, written as files every arm reads; the demo's tokenizer, image processor and new
    model (saved: the stock recipe starts from a saved model); the held-out pixels and captions for the evaluator."""
    import numpy as np
    from datasets import Image as ImageFeature
    from transformers import set_seed

    from clip_trainer.command_line import parse_arguments
    from clip_trainer.data import load_image_text_data
    from clip_trainer.modeling import load_model, load_model_config, load_processor

    model_args, data_args, training_args = parse_arguments(
        [str(DEMO_CONFIG), "--seed", str(seed), "--output_dir", str(folder / "unused"), "--report_to", "none"]
    )
    # As run_clip.py does it: seed, the split, the tokenizer on the training captions, then the new weights.
    set_seed(seed)
    data = load_image_text_data(data_args, seed=seed, train=True, evaluate=True)
    config = load_model_config(model_args)
    processor = load_processor(model_args, config, data.training_captions(data_args.caption_column))
    model = load_model(model_args, config, processor.tokenizer)
    start = folder / "start"
    model.save_pretrained(start)
    processor.save_pretrained(start)

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    splits = {"train": data.train, "validation": data.validation}
    if max_train_samples is not None:
        splits["train"] = splits["train"].select(range(min(max_train_samples, len(splits["train"]))))
    # (Written after the `max_train_samples` cut, so a cut split may hold a few more pairs than rows.)
    rows: dict[str, list[tuple[str, str]]] = {}
    for name, split in splits.items():
        raw = split.cast_column("image", ImageFeature(decode=False))
        rows[name] = []
        for index, example in enumerate(raw):
            path = images / f"{name}-{index:05d}.png"
            path.write_bytes(example["image"]["bytes"])
            # The loader joins rows that show the same image into one row of several captions (5 of the demo's
            # training rows); every arm gets them back as one pair per caption, as the parquet has them.
            captions = example["caption"] if isinstance(example["caption"], list) else [example["caption"]]
            rows[name].extend((str(path), caption) for caption in captions)
    files = {}
    for name, pairs in rows.items():
        # JSON lines for the stock recipe and clip-trainer, a tab-separated file for open_clip's CsvDataset.
        files[f"{name}_json"] = folder / f"{name}.json"
        files[f"{name}_json"].write_text("".join(json.dumps({"image_path": p, "caption": c}) + "\n" for p, c in pairs))
        files[f"{name}_csv"] = folder / f"{name}.csv"
        files[f"{name}_csv"].write_text(
            "filepath\ttitle\n" + "".join(f"{p}\t{c.replace(chr(9), ' ')}\n" for p, c in pairs)
        )
    # The evaluator's inputs: one set of preprocessed pixels (the demo's image processor), the captions.
    from PIL import Image

    pixels = processor.image_processor(
        [Image.open(path).convert("RGB") for path, _ in rows["validation"]], return_tensors="np"
    )["pixel_values"].astype(np.float32)
    np.save(folder / "validation_pixels.npy", pixels)
    (folder / "validation_captions.json").write_text(json.dumps([c for _, c in rows["validation"]]))
    model_config = folder / "open_clip_config"
    model_config.mkdir(exist_ok=True)
    (model_config / f"{OPEN_CLIP_MODEL}.json").write_text(json.dumps(open_clip_model_config(model.config, start)))
    return {
        "start": start,
        "files": files,
        "train_pairs": len(rows["train"]),
        "validation_pairs": len(rows["validation"]),
        "open_clip_config": model_config,
        "max_seq_length": model.config.text_config.max_position_embeddings,
    }


# ------------------------------------------------------------------------------------------------------------------
# The arms
# ------------------------------------------------------------------------------------------------------------------
def arm_command(arm: str, args: argparse.Namespace, prepared: dict, seed: int, out: Path) -> list[str]:
    files = prepared["files"]
    common_hf = [
        "--per_device_train_batch_size", str(BATCH_SIZE),
        "--learning_rate", str(LEARNING_RATE),
        "--weight_decay", str(WEIGHT_DECAY),
        "--warmup_steps", str(WARMUP_STEPS),
        "--lr_scheduler_type", "cosine",
        "--max_grad_norm", str(MAX_GRAD_NORM),
        "--num_train_epochs", str(args.epochs),
        "--seed", str(seed),
        "--dataloader_num_workers", "1",
        "--save_strategy", "no",
        "--eval_strategy", "no",
        "--logging_steps", "25",
        "--report_to", "none",
        # A folder that does not exist yet: the stock script reads `overwrite_output_dir`, gone from transformers 5's
        # TrainingArguments, only when its output folder exists.
        "--output_dir", str(out / "model"),
    ]  # fmt: skip
    if arm == "clip-trainer":
        # The demo's model, tokenizer size and split (given as the files every arm reads), without augmentation,
        # evaluation or checkpoints while training.
        return [
            args.python, str(REPO / "run_clip.py"),
            "--train_file", str(files["train_json"]),
            "--image_column", "image_path",
            "--caption_column", "caption",
            "--validation_split_percentage", "0",
            "--config_name", str(REPO / "configs" / "models" / "clip-tiny-64px.json"),
            "--tokenizer_vocab_size", "2048",
            "--augment", "false",
            "--eval_on_start", "false",
            "--load_best_model_at_end", "false",
            *common_hf,
            "--overwrite_output_dir", "true",
        ]  # fmt: skip
    if arm == "stock":
        return [
            args.stock_python, str(BENCHMARKS / "stock_arm.py"), str(Path(args.stock_script).resolve()),
            "--model_name_or_path", str(prepared["start"]),
            "--train_file", str(files["train_json"]),
            "--image_column", "image_path",
            "--caption_column", "caption",
            "--max_seq_length", str(prepared["max_seq_length"]),
            "--remove_unused_columns", "false",
            "--do_train",
            *common_hf,
        ]  # fmt: skip
    settings = {
        "model_config": str(prepared["open_clip_config"]),
        "timing": str(out / "timing.json"),
        "argv": [
            "--train-data", str(files["train_csv"]),
            "--dataset-type", "csv",
            "--csv-img-key", "filepath",
            "--csv-caption-key", "title",
            "--model", OPEN_CLIP_MODEL,
            "--batch-size", str(BATCH_SIZE),
            "--epochs", str(args.epochs),
            "--lr", str(LEARNING_RATE),
            "--wd", str(WEIGHT_DECAY),
            "--beta1", "0.9", "--beta2", "0.999", "--eps", "1e-8",
            "--warmup", str(WARMUP_STEPS),
            "--lr-scheduler", "cosine",
            "--grad-clip-norm", str(MAX_GRAD_NORM),
            "--precision", "fp32",
            "--device", "cpu",
            "--workers", "1",
            "--seed", str(seed),
            # The whole picture, as the other arms see it: a random crop of all of a square image's area is all of it
            # (torchvision's RandomResizedCrop falls back to the whole image when the drawn shape does not fit).
            "--aug-cfg", "scale=(1.0,1.0)",
            "--zeroshot-frequency", "0",
            "--val-frequency", "0",
            "--save-frequency", str(args.epochs),
            "--log-every-n-steps", "25",
            "--logs", str(out),
            "--name", "run",
        ],
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(settings))
    return [args.open_clip_python, str(BENCHMARKS / "open_clip_arm.py"), "train", str(out / "settings.json")]


def run_measured(command: list[str], log: Path, env: dict[str, str]) -> tuple[int, float, float]:
    """Runs `command`; returns its exit status, wall time (s) and its main process's peak RSS (MiB, from wait4)."""
    began = time.perf_counter()
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - began
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, wall, usage.ru_maxrss / 1024


def training_figures(arm: str, out: Path, train_pairs: int, epochs: int) -> tuple[float, float]:
    """The training steps' seconds and samples/s of a finished run. The Trainer's own figures for the two Trainer
    arms (`train_runtime`, and `train_samples_per_second`: rows times epochs over it); for open_clip, which drops
    the last partial batch of an epoch, the pairs of its full batches over the time inside `train_one_epoch`."""
    if arm == "open_clip":
        seconds = json.loads((out / "timing.json").read_text())["train_seconds"]
        return seconds, (train_pairs // BATCH_SIZE) * BATCH_SIZE * epochs / seconds
    results = json.loads((out / "model" / "train_results.json").read_text())
    return results["train_runtime"], results["train_samples_per_second"]


def arm_embeddings(arm: str, args: argparse.Namespace, prepared: dict, folder: Path, out: Path, env: dict):
    import numpy as np
    import torch

    pixels = folder / "validation_pixels.npy"
    captions = folder / "validation_captions.json"
    if arm != "open_clip":
        return embed_hf_model(out / "model", torch.from_numpy(np.load(pixels)), json.loads(captions.read_text()))
    settings = {
        "model_config": str(prepared["open_clip_config"]),
        "model_name": OPEN_CLIP_MODEL,
        "checkpoint": str(out / "run" / "checkpoints" / f"epoch_{args.epochs}.pt"),
        "pixels": str(pixels),
        "captions": str(captions),
        "image_embeds": str(out / "image_embeds.npy"),
        "text_embeds": str(out / "text_embeds.npy"),
    }
    (out / "embed.json").write_text(json.dumps(settings))
    subprocess.run(
        [args.open_clip_python, str(BENCHMARKS / "open_clip_arm.py"), "embed", str(out / "embed.json")],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    return np.load(out / "image_embeds.npy"), np.load(out / "text_embeds.npy")


def torch_version(python: str) -> str:
    result = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    return result.stdout.strip() or "unavailable"


def arm_environment() -> dict[str, str]:
    """Every arm runs under clip-trainer's thread policy (or the one the caller set), offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("WANDB_MODE", "disabled")
    set_openmp_environment(env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def summarise(runs: list[dict], arms: list[str]) -> dict[str, dict[str, float]]:
    summary = {}
    for arm in arms:
        done = [run for run in runs if run["arm"] == arm and run.get("returncode") == 0]
        if not done:
            continue
        keys = ["samples_per_second", "wall_seconds", "peak_rss_mib", *[f"recall@{k}" for k in RECALL_KS]]
        summary[arm] = {key: statistics.median(run[key] for run in done) for key in keys}
        for k in RECALL_KS:
            values = [run[f"recall@{k}"] for run in done]
            summary[arm][f"recall@{k}_spread"] = max(values) - min(values)
        summary[arm]["rounds"] = len(done)
    if "clip-trainer" in summary:
        ours = summary["clip-trainer"]
        for arm, figures in summary.items():
            if arm != "clip-trainer":
                figures["speedup_of_clip_trainer"] = ours["samples_per_second"] / figures["samples_per_second"]
                figures["wall_ratio_of_clip_trainer"] = ours["wall_seconds"] / figures["wall_seconds"]
    return summary


def print_table(summary: dict[str, dict[str, float]], runs: list[dict]) -> None:
    print(
        "\n| arm | torch | samples/s | wall (s) | peak RSS (MiB) | R@1 | R@5 | R@10 | clip-trainer speed x | wall x |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arm, row in summary.items():
        version = next(run["torch"] for run in runs if run["arm"] == arm)
        ratios = (
            f"{row['speedup_of_clip_trainer']:.2f} | {row['wall_ratio_of_clip_trainer']:.2f}"
            if "speedup_of_clip_trainer" in row
            else "- | -"
        )
        recalls = " | ".join(
            f"{100 * row[f'recall@{k}']:.1f} (±{100 * row[f'recall@{k}_spread'] / 2:.1f})" for k in RECALL_KS
        )
        print(
            f"| {arm} | {version} | {row['samples_per_second']:.0f} | {row['wall_seconds']:.1f} | "
            f"{row['peak_rss_mib']:.0f} | {recalls} | {ratios} |"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    missing = [arm for arm in args.arms if arm != "clip-trainer" and not Path(_python_of(arm, args)).exists()]
    for arm in missing:
        print(f"skipping {arm}: no Python at {_python_of(arm, args)}", file=sys.stderr)
    arms = [arm for arm in args.arms if arm not in missing]
    env = arm_environment()
    versions = {arm: torch_version(_python_of(arm, args)) for arm in arms}
    runs: list[dict] = []
    with contextlib.ExitStack() as stack:
        work = Path(args.work_dir) if args.work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for round_index in range(args.rounds):
            seed = 42 + round_index
            folder = work / f"round-{round_index}"
            prepared = prepare_round(seed, folder, args.max_train_samples)
            order = arms[round_index % len(arms) :] + arms[: round_index % len(arms)]
            for arm in order:
                out = folder / arm
                out.mkdir(parents=True, exist_ok=True)
                command = arm_command(arm, args, prepared, seed, out)
                returncode, wall, rss = run_measured(command, out / "log.txt", env)
                run = {
                    "arm": arm,
                    "round": round_index,
                    "seed": seed,
                    "returncode": returncode,
                    "torch": versions[arm],
                }
                run.update(wall_seconds=round(wall, 2), peak_rss_mib=round(rss, 1))
                if returncode != 0:
                    tail = (out / "log.txt").read_text(errors="replace")[-1500:]
                    print(f"{arm} (seed {seed}) failed with status {returncode}:\n{tail}", file=sys.stderr)
                    runs.append(run)
                    continue
                seconds, samples_per_second = training_figures(arm, out, prepared["train_pairs"], args.epochs)
                run["samples_per_second"] = round(samples_per_second, 1)
                run["train_seconds"] = round(seconds, 2)
                image_embeds, text_embeds = arm_embeddings(arm, args, prepared, folder, out, env)
                run.update(
                    {key: round(value, 4) for key, value in retrieval_recalls(image_embeds, text_embeds).items()}
                )
                runs.append(run)
                print(json.dumps(run), flush=True)
    summary = summarise(runs, arms)
    print_table(summary, runs)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": " ".join(["python", "benchmarks/compare.py", *(argv if argv is not None else sys.argv[1:])]),
        "thread_policy": {key: env.get(key) for key in OPENMP_ENVIRONMENT},
        "runs": runs,
        "summary": summary,
    }
    print(json.dumps(result), flush=True)
    return result


def _python_of(arm: str, args: argparse.Namespace) -> str:
    return {"clip-trainer": args.python, "open_clip": args.open_clip_python, "stock": args.stock_python}[arm]


if __name__ == "__main__":
    main()
