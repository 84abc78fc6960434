"""Distillation on the bundled data: a student half the width of the demo model, trained with the demo model as its
teacher, against the same student alone at the same budget.

The student is `configs/models/clip-tiny-half-64px.json` (hidden size, MLP and projection halved: about a quarter of
the demo model's weights). Both arms train with `configs/demo.json` as it is (10 epochs, batch 64, augmentation, the
best epoch by `eval_mean_recall`), on one prepared split (written once by a `--prepare_only` run with the demo's seed),
so that the teacher never trained on a pair the students are measured on; only the training seed varies. The
distilled arm adds `--teacher_model_name_or_path TEACHER` (weight 1, each model's own temperature unless set). The
teacher is the demo model, trained here first (seed 42) unless `--teacher` names one trained on the same split.

Every step is clip-trainer's own command (`clip_trainer.run.main`, the function behind `run_clip.py`). It prints a
table of held-out text-to-image recall@10 (median of the seeds, and each seed), then one line of JSON. About 75 s per
run on a quiet 2-core CPU, 7 runs:

    python benchmarks/distillation.py [--seeds 42 43 44] [--teacher DIR] [--work_dir DIR] [--arms alone distilled]
        [--student_train_samples N] [--student_epochs E]

`--student_train_samples N` trains both student arms on N pairs drawn at random (seed 0) from the split's training
pairs, the teacher still on all of them: the regime distillation is for, a teacher with more data behind it than the
student gets. `--student_epochs E` trains both students E epochs (the teacher keeps the demo's 10). Either option
gives the runs folders of their own (`student-alone-n800-42`, `student-alone-e30-42`). `--teacher_epochs E` trains
the teacher E epochs instead of the demo's 10 (in `teacher-e60`; its distilled students in `...-T60-42`): a teacher
clearly stronger than the student alone, on the same pairs.

Finished runs in `--work_dir` are reused, so another distillation setting (`--distillation_weight`,
`--distillation_temperature`, `--distillation_intra_modal_weight`) can be tried against the stored teacher and runs of the student alone by running the
script again with the same `--work_dir`: a setting other than the default writes its distilled runs to folders named
by it (`student-with-teacher-w4-t0.1-42`), so settings never reuse each other's runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from datasets import DatasetDict, load_from_disk

from clip_trainer.run import main as run

REPO = Path(__file__).resolve().parent.parent
DEMO = str(REPO / "configs" / "demo.json")
HALF_WIDTH = str(REPO / "configs" / "models" / "clip-tiny-half-64px.json")
METRIC = "t2i_recall@10"
COMMON = ["--report_to", "none", "--overwrite_output_dir", "true", "--save_total_limit", "1"]


def recall(folder: Path) -> float:
    return json.loads((folder / "eval_results.json").read_text())[f"eval_{METRIC}"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="Training seeds of the students.")
    parser.add_argument("--teacher", default=None, help="A demo model trained on the same split (default: train one).")
    parser.add_argument("--distillation_weight", default="1.0", help="The distilled arm's `distillation_weight`.")
    parser.add_argument(
        "--distillation_temperature",
        default=None,
        help="The distilled arm's `distillation_temperature` (default: none).",
    )
    parser.add_argument(
        "--distillation_intra_modal_weight",
        default=None,
        help="The distilled arm's `distillation_intra_modal_weight` (default: none, the cross-modal term alone).",
    )
    parser.add_argument(
        "--student_train_samples",
        type=int,
        default=None,
        help="Train the students on this many of the split's training pairs, drawn at random (default: all of them).",
    )
    parser.add_argument(
        "--student_epochs",
        type=int,
        default=None,
        help="Train both students this many epochs (default: the demo's 10; the teacher keeps the demo's).",
    )
    parser.add_argument(
        "--teacher_epochs",
        type=int,
        default=None,
        help="Train the teacher this many epochs (default: the demo's 10); ignored with --teacher.",
    )
    parser.add_argument("--work_dir", default=None, help="Where to write data and models (default: a temp folder).")
    parser.add_argument(
        "--arms", nargs="+", choices=["alone", "distilled"], default=["alone", "distilled"], help="The arms to train."
    )
    args = parser.parse_args(argv)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="distillation-"))
    work_dir.mkdir(parents=True, exist_ok=True)

    # One split for every run: the demo's held-out 15% at its own seed.
    data = work_dir / "data"
    if not (data / "dataset_dict.json").is_file():
        run([DEMO, "--prepare_only", "true", "--output_dir", str(data), *COMMON])
    on_data = ["--dataset_name", str(data)]

    teacher_setting = "" if args.teacher or args.teacher_epochs is None else f"-e{args.teacher_epochs}"
    teacher = Path(args.teacher) if args.teacher else work_dir / f"teacher{teacher_setting}"
    if not (teacher / "model.safetensors").is_file():
        teacher_budget = [] if args.teacher_epochs is None else ["--num_train_epochs", str(args.teacher_epochs)]
        run([DEMO, *on_data, *teacher_budget, "--seed", "42", "--output_dir", str(teacher), *COMMON])
    students_data, student_setting = on_data, ""
    if args.student_train_samples is not None:
        # The students' own split: the same held-out pairs, fewer training pairs (a random draw, not the first rows:
        # the prepared split keeps the emoji data's order, which is grouped).
        student_setting = f"-n{args.student_train_samples}"
        subset = work_dir / f"data{student_setting}"
        if not (subset / "dataset_dict.json").is_file():
            splits = load_from_disk(str(data))
            train = (
                splits["train"].shuffle(seed=0).select(range(min(args.student_train_samples, len(splits["train"]))))
            )
            DatasetDict(train=train, validation=splits["validation"]).save_to_disk(str(subset))
        students_data = ["--dataset_name", str(subset)]
    if args.student_epochs is not None:
        student_setting += f"-e{args.student_epochs}"
        students_data = [*students_data, "--num_train_epochs", str(args.student_epochs)]
    distil = ["--teacher_model_name_or_path", str(teacher), "--distillation_weight", args.distillation_weight]
    if args.distillation_temperature is not None:
        distil += ["--distillation_temperature", args.distillation_temperature]
    if args.distillation_intra_modal_weight is not None:
        distil += ["--distillation_intra_modal_weight", args.distillation_intra_modal_weight]

    # A setting other than the default gets its own folders (and the default keeps the names it always had), so that
    # settings tried in one work folder share the teacher and the student-alone runs but never each other's runs.
    setting = "" if args.distillation_weight == "1.0" else f"-w{args.distillation_weight}"
    setting += "" if args.distillation_temperature is None else f"-t{args.distillation_temperature}"
    setting += "" if args.distillation_intra_modal_weight is None else f"-i{args.distillation_intra_modal_weight}"
    setting += teacher_setting.replace("-e", "-T")
    arms = {"student alone": ([], student_setting), "student + teacher": (distil, student_setting + setting)}
    arms = {name: arm for name, arm in arms.items() if ("alone" if not arm[0] else "distilled") in args.arms}
    scores: dict[str, list[float]] = {name: [] for name in arms}
    for seed in args.seeds:
        for name, (flags, suffix) in arms.items():
            out = work_dir / f"{name.replace(' ', '-').replace('+', 'with')}{suffix}-{seed}"
            if not (out / "eval_results.json").is_file():
                run([DEMO, *students_data, "--config_name", HALF_WIDTH, "--seed", str(seed), "--output_dir", str(out),
                     *flags, *COMMON])  # fmt: skip
            scores[name].append(recall(out))
            print(f"seed {seed}, {name}: {METRIC} {scores[name][-1]:.4f}", flush=True)

    teacher_score = recall(teacher) if (teacher / "eval_results.json").is_file() else None
    medians = {name: statistics.median(values) for name, values in scores.items()}
    gain = medians["student + teacher"] - medians["student alone"] if len(medians) == 2 else None
    print(f"\nheld-out {METRIC} (median of seeds {', '.join(map(str, args.seeds))}; per seed)")
    print("| model | median | per seed |")
    print("|---|---|---|")
    if teacher_score is not None:
        budget = f", {args.teacher_epochs} epochs" if teacher_setting else ""
        print(f"| teacher (demo model{budget}, seed 42) | {teacher_score:.1%} | – |")
    for name, values in scores.items():
        print(f"| half-width {name} | {medians[name]:.1%} | {' / '.join(f'{v:.1%}' for v in values)} |")
    if gain is not None:
        print(f"distillation gain: {gain * 100:+.1f} points (target: at least +2)")
    summary = {"metric": METRIC, "seeds": args.seeds, "teacher": teacher_score, "scores": scores, "medians": medians,
               "gain_points": None if gain is None else round(gain * 100, 2),
               "student_train_samples": args.student_train_samples, "student_epochs": args.student_epochs, "teacher_epochs": args.teacher_epochs, "distillation_weight": float(args.distillation_weight),
               "distillation_temperature": args.distillation_temperature,
               "distillation_intra_modal_weight": args.distillation_intra_modal_weight}  # fmt: skip
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1:])
