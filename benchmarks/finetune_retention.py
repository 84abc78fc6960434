"""What a fine-tune costs elsewhere, and which recipe keeps it: measured on the bundled emoji data.

A small CLIP (`configs/models/clip-tiny-64px.json`) is pretrained from scratch on every Unicode group but one, the
"domain", then fine-tuned on 70% of the domain's pairs with each recipe, and measured on the other 30% of the domain
(in-domain) and on the held-out 15% of the pretraining groups (the reference set), by text-to-image recall@10.

The domain is Symbols (223 pairs): its captions (`up-right arrow`, `red square`, `no bicycles`, `keycap: 7`,
`Aries`) and pictures (signs, arrows, coloured shapes, buttons) are unlike the other groups', and they are
compositional, so what 156 pairs teach carries to the 67 held-out ones. Flags, the other obvious choice, does not
work as a domain: each held-out flag names a country no training pair names, so nothing can be learnt for it (tried:
in-domain recall stayed at chance, 0.09-0.14 for 81 pairs, whatever the recipe).

Recipes:

- `plain`: every weight trains;
- `vision locked`: `freeze_vision_model` (the text tower and the temperature train);
- `top-1 layers`: `vision_trainable_layers 1 --text_trainable_layers 1` (of 2 per tower), norms and projections;
- `LoRA r8`: `lora_rank 8` on the attention projections of both towers (needs `pip install 'clip-trainer[lora]'`);
- `plain + EMA`: every weight trains, and the model saved is the moving average of the weights (`ema_decay 0.9`,
  an average over about 10 of the 50 steps, chosen by `metric_for_best_model eval_ema_t2i_recall@10`);
- `... + distillation from the pretrained`: `distill_from_pretrained`, the starting model as a frozen teacher
  (`distillation_weight` 1, or 0.25 / 0.5 where the name says so), plain or with the vision tower locked;
- `... + replay`: each fine-tuning batch also holds pretraining pairs (rehearsal): a `train_mixture` of the domain's
  156 pairs and as many pairs drawn at random from the pretraining set (never the reference set), weight 1 each, at
  batch 64, so that every step still sees about 32 domain pairs and an epoch has as many steps as the plain recipe's
  (each step twice the pairs). It needs data like the pretraining data; here it is a sample of the very pretraining
  set, the most replay can do; `vision locked + replay (lr 1e-3)` / `(20 epochs)` give the text tower, the part that
  trains, twice the step or twice the steps, and `vision locked + replay + EMA` a moving average;
- `plain (lr 1e-4)`, `plain (lr 2e-4)`, `plain (20 epochs)`: the plain recipe with a smaller step, or twice the steps
  (whether a longer fine-tune gains more than the plain reference every share is counted against);
- `WiSE-FT a=...`: the plain (or vision-locked, EMA, distilled) fine-tune's weights interpolated with the pretrained
  ones (`wise_ft_alphas` 0.25 0.5 0.6 0.75 0.9, measured in the fine-tune's run; the rule's floor
  `wise_ft_min_retention` is `--wise_ft_min_retention`, 0.9 unless set).

The target line lists the rows that keep at least 95% of the reference recall@10 with at least 90% of plain
fine-tuning's in-domain gain. Every step is clip-trainer's own command (`clip_trainer.run.main`, the function behind
`run_clip.py`), on data written as prepared folders. It prints a table, then one line of JSON. A few minutes on a
2-core CPU:

    python benchmarks/finetune_retention.py [--domain Flags] [--seed 0] [--work_dir DIR] [--recipes NAME ...]
        [--wise_ft_min_retention 0.95]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

from datasets import DatasetDict

from clip_trainer.demo_data import load_emoji_dataset
from clip_trainer.run import main as run

REPO = Path(__file__).resolve().parent.parent
METRIC = "t2i_recall@10"
COMMON = ["--report_to", "none", "--dataloader_num_workers", "1", "--save_strategy", "no", "--logging_steps", "50",
          "--per_device_eval_batch_size", "256"]  # fmt: skip
PRETRAIN = ["--config_name", str(REPO / "configs" / "models" / "clip-tiny-64px.json"), "--tokenizer_vocab_size",
            "2048", "--per_device_train_batch_size", "64", "--learning_rate", "1e-3", "--weight_decay", "0.1",
            "--warmup_steps", "50", "--num_train_epochs", "10", "--eval_strategy", "no"]  # fmt: skip
FINE_TUNE = ["--per_device_train_batch_size", "32", "--learning_rate", "5e-4", "--weight_decay", "0.1",
             "--warmup_steps", "5", "--num_train_epochs", "10", "--eval_strategy", "no", "--do_train", "--do_eval"]  # fmt: skip
RECIPES = {
    "plain": [],
    "vision locked": ["--freeze_vision_model", "true"],
    "top-1 layers": ["--vision_trainable_layers", "1", "--text_trainable_layers", "1"],
    "LoRA r8": ["--lora_rank", "8", "--lora_alpha", "16", "--learning_rate", "2e-3"],
    "plain + EMA": ["--ema_decay", "0.9"],
    # The pretrained model as a teacher: the fine-tune is pulled towards its similarity distributions.
    "plain + distillation from the pretrained": ["--distill_from_pretrained", "true"],
    "vision locked + distillation from the pretrained": [
        "--freeze_vision_model",
        "true",
        "--distill_from_pretrained",
        "true",
    ],  # fmt: skip
    # Weaker pulls towards the pretrained model (the default weight is 1): more of the fine-tune's gain, less kept.
    "plain + distillation from the pretrained (weight 0.25)": [
        "--distill_from_pretrained", "true", "--distillation_weight", "0.25",
    ],
    "plain + distillation from the pretrained (weight 0.5)": [
        "--distill_from_pretrained", "true", "--distillation_weight", "0.5",
    ],
    "vision locked + distillation from the pretrained (weight 0.5)": [
        "--freeze_vision_model", "true", "--distill_from_pretrained", "true", "--distillation_weight", "0.5",
    ],
    # Rehearsal: the fine-tune's batches mix in pretraining pairs (REPLAY: the data flags are the mixture's).
    "plain + replay": ["REPLAY"],
    "vision locked + replay": ["REPLAY", "--freeze_vision_model", "true"],
    # The locked recipe with replay trains only the text tower and the temperature: a larger or a longer step for it.
    "vision locked + replay (lr 1e-3)": ["REPLAY", "--freeze_vision_model", "true", "--learning_rate", "1e-3"],
    "vision locked + replay (20 epochs)": ["REPLAY", "--freeze_vision_model", "true", "--num_train_epochs", "20"],
    "vision locked + replay + EMA": ["REPLAY", "--freeze_vision_model", "true", "--ema_decay", "0.9"],
    # A smaller step: the fine-tune stays nearer the pretrained weights while it trains (the plain recipe's rate is
    # 5e-4).
    "plain (lr 1e-4)": ["--learning_rate", "1e-4"],
    "plain (lr 2e-4)": ["--learning_rate", "2e-4"],
    # Plain fine-tuning at the longer schedule: whether a longer fine-tune gains more in the domain than the plain
    # reference (10 epochs), against which every share of the gain is counted.
    "plain (20 epochs)": ["--num_train_epochs", "20"],
}  # fmt: skip
# WiSE-FT is measured on the plain, the vision-locked, the EMA and the distilled fine-tunes (`a = 1` is the fine-tune
# itself).
WISE_FT_RECIPES = (
    "plain",
    "vision locked",
    "plain + EMA",
    "plain + distillation from the pretrained",
    "vision locked + distillation from the pretrained",
    "plain + distillation from the pretrained (weight 0.25)",
    "plain + distillation from the pretrained (weight 0.5)",
    "vision locked + distillation from the pretrained (weight 0.5)",
    "plain (lr 1e-4)",
    "plain (lr 2e-4)",
    "plain + replay",
    "vision locked + replay",
    "vision locked + replay (lr 1e-3)",
    "vision locked + replay (20 epochs)",
    "vision locked + replay + EMA",
)
REPLAY = "REPLAY"  # in a recipe's flags: train on the domain mixed with pretraining pairs
WISE_FT_ALPHAS = ("0.25", "0.5", "0.6", "0.75", "0.9")


def write_splits(work_dir: Path, domain: str, seed: int) -> tuple[Path, Path, Path]:
    """Prepared folders: `pretrain` (train: other groups' 85%, validation: their 15%, the reference set), `domain`
    (train: 70% of the domain group, validation: the other 30%) and `replay` (train only: as many pretraining pairs,
    drawn at random, as the domain has training pairs)."""
    emoji = load_emoji_dataset()
    groups = sorted(set(emoji["group"]))
    if domain not in groups:
        raise SystemExit(f"--domain {domain!r} is not a group of the emoji data; choose from: {', '.join(groups)}.")
    in_domain = emoji.filter(lambda group: group == domain, input_columns="group")
    others = emoji.filter(lambda group: group != domain, input_columns="group")
    pretrain = others.train_test_split(test_size=0.15, seed=seed)
    tuning = in_domain.train_test_split(test_size=0.3, seed=seed)
    folders = work_dir / "pretrain-data", work_dir / "domain-data", work_dir / "replay-data"
    DatasetDict(train=pretrain["train"], validation=pretrain["test"]).save_to_disk(folders[0])
    DatasetDict(train=tuning["train"], validation=tuning["test"]).save_to_disk(folders[1])
    replay = pretrain["train"].shuffle(seed=seed).select(range(len(tuning["train"])))
    DatasetDict(train=replay).save_to_disk(folders[2])
    print(f"domain {domain!r}: {len(tuning['train'])} fine-tuning / {len(tuning['test'])} held-out pairs; "
          f"pretraining {len(pretrain['train'])} / reference {len(pretrain['test'])} pairs", flush=True)  # fmt: skip
    return folders


def results(folder: Path) -> dict[str, float]:
    return json.loads((folder / "eval_results.json").read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domain", default="Symbols", help="The emoji group held out of pretraining.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default=None, help="Where to write data and models (default: a temp folder).")
    parser.add_argument("--recipes", nargs="+", default=None, help="Measure only these recipes (default: all).")
    parser.add_argument(
        "--wise_ft_min_retention",
        default="0.9",
        help="The WiSE-FT rule's floor: the share of the pretrained model's reference recall a saved `a` keeps.",
    )
    args = parser.parse_args(argv)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="finetune-retention-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    pretrain_data, domain_data, replay_data = write_splits(work_dir, args.domain, args.seed)
    seed = ["--seed", str(args.seed)]

    pretrained = work_dir / "pretrained"
    if not (pretrained / "model.safetensors").is_file():
        run([*PRETRAIN, *COMMON, *seed, "--dataset_name", str(pretrain_data), "--output_dir", str(pretrained),
             "--overwrite_output_dir", "true"])  # fmt: skip
    reference = json.dumps({"reference": {"dataset_name": str(pretrain_data), "split": "validation"}})
    fine_tune_data = ["--model_name_or_path", str(pretrained), "--dataset_name", str(domain_data),
                      "--extra_eval_sets", reference]  # fmt: skip
    # Replay: the domain's pairs and the replay pairs, one each in turn on average; validation is the domain's own
    # split (the replay folder has none, and nothing is held out of it).
    mixture = json.dumps({str(domain_data): 1, str(replay_data): 1})
    replay_data_flags = ["--model_name_or_path", str(pretrained), "--train_mixture", mixture,
                         "--validation_split_percentage", "0", "--extra_eval_sets", reference]  # fmt: skip
    before = work_dir / "before"
    run([*fine_tune_data, *COMMON, *seed, "--do_eval", "--output_dir", str(before)])
    base = results(before)

    rows = {"pretrained": (base[f"eval_{METRIC}"], base[f"eval_reference_{METRIC}"])}
    chosen = {}  # recipe -> the WiSE-FT a its rule saved (`wise_ft_min_retention` on the reference set)
    for name, flags in RECIPES.items():
        if args.recipes is not None and name not in args.recipes:
            continue
        if name.startswith("LoRA") and importlib.util.find_spec("peft") is None:
            print("LoRA skipped: peft is not installed (pip install 'clip-trainer[lora]').", flush=True)
            continue
        out = work_dir / name.replace(" ", "-")
        wise = name in WISE_FT_RECIPES
        # With an EMA, its metric chooses it as the model saved (and WiSE-FT interpolates from it).
        metric = f"eval_ema_{METRIC}" if "--ema_decay" in flags else f"eval_{METRIC}"
        extra = ["--wise_ft_alphas", *WISE_FT_ALPHAS, "--metric_for_best_model", metric,
                 "--wise_ft_min_retention", args.wise_ft_min_retention] if wise else []  # fmt: skip
        data = fine_tune_data
        if REPLAY in flags:  # twice the pairs per step, as many steps: batch 64 of which about 32 domain pairs
            data = replay_data_flags
            flags = [*(flag for flag in flags if flag != REPLAY), "--per_device_train_batch_size", "64"]
        run([*data, *FINE_TUNE, *COMMON, *seed, *flags, *extra, "--output_dir", str(out),
             "--overwrite_output_dir", "true"])  # fmt: skip
        if not wise:
            final = results(out)
            rows[name] = (final[f"eval_{METRIC}"], final[f"eval_reference_{METRIC}"])
            continue
        table = json.loads((out / "wise_ft_results.json").read_text())
        chosen[name] = table["alpha"]
        for row in sorted(table["rows"], key=lambda row: -row["alpha"]):
            if row["alpha"] > 0:
                label = name if row["alpha"] == 1 else f"{name} + WiSE-FT a={row['alpha']:g}"
                rows[label] = (row[f"eval_{METRIC}"], row[f"eval_reference_{METRIC}"])

    domain_before, reference_before = rows["pretrained"]
    plain_gain = rows["plain"][0] - domain_before
    table = []
    for name, (domain, kept) in rows.items():
        gain = domain - domain_before
        table.append({
            "recipe": name, "domain_r10": round(domain, 4), "gain": round(gain, 4),
            "share_of_plain_gain": round(gain / plain_gain, 3) if plain_gain else None,
            "reference_r10": round(kept, 4), "reference_kept": round(kept / reference_before, 3),
        })  # fmt: skip
    # The target: at least 95% of the reference recall kept with at least 90% of plain fine-tuning's in-domain gain.
    target = [row["recipe"] for row in table[1:]
              if row["reference_kept"] >= 0.95 and (row["share_of_plain_gain"] or 0) >= 0.9]  # fmt: skip

    print(f"\nin-domain: held-out {args.domain} pairs; reference: held-out pairs of the other groups; {METRIC}")
    print("| recipe | in-domain R@10 | gain | share of plain's gain | reference R@10 | reference kept |")
    print("|---|---|---|---|---|---|")
    for row in table:
        share = "–" if row["share_of_plain_gain"] is None else f"{row['share_of_plain_gain']:.0%}"
        print(f"| {row['recipe']} | {row['domain_r10']:.3f} | {row['gain']:+.3f} | {share} | "
              f"{row['reference_r10']:.3f} | {row['reference_kept']:.0%} |")  # fmt: skip
    print(f"recipes keeping >= 95% of the reference R@10 with >= 90% of plain's gain: {', '.join(target) or 'none'}")
    floor = float(args.wise_ft_min_retention)
    print(f"WiSE-FT's rule (best in-domain R@10 keeping >= {floor:.0%} of the reference R@10) saved: "
          + ", ".join(f"{name}: a={alpha:g}" for name, alpha in chosen.items()))  # fmt: skip
    summary = {"domain": args.domain, "seed": args.seed, "metric": METRIC, "rows": table, "meets_target": target,
               "wise_ft_rule_alpha": chosen, "wise_ft_min_retention": float(args.wise_ft_min_retention)}  # fmt: skip
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1:])
