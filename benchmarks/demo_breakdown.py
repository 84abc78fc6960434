"""Where the demo's wall time goes: each part of a `run_clip.py` run outside its training steps, timed in-process.

Runs `clip_trainer.run.main` with the arguments given (those of `run_clip.py`) and wraps the stages it calls with
wall-clock timers; nothing else changes. The parts: Python and the imports (from the process's start), the
arguments, the data, the tokenizer and model, the trainer's construction, the step-0 evaluation, the evaluations and
checkpoints during training, loading the best model, the final evaluation, the final save (weights; the curves, the
retrieval gallery and the card; ONNX when asked), and the exit. "training loop" is `train()` less its evaluations,
checkpoints and best-model load: the training steps and what the Trainer does around them (workers starting each
epoch, logging).

Usage (the demo as `make demo` runs it, without TensorBoard):
    python benchmarks/demo_breakdown.py configs/demo.json --report_to none --output_dir outputs/demo-breakdown \
        --overwrite_output_dir true

The last line printed is one JSON object: seconds per part, and `wall` (process start to the end of `main`).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path


def _process_start() -> float:
    """The wall-clock time this process started (Linux: /proc), so that the interpreter's start is counted too."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return time.time()


START = _process_start()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clip_trainer import threads  # noqa: E402

threads.set_openmp_environment()  # as run_clip.py does, before torch is imported

from transformers import Trainer  # noqa: E402

import clip_trainer.run as run  # noqa: E402
from clip_trainer import trainer as trainer_module  # noqa: E402

PARTS: dict[str, float] = defaultdict(float)
PARTS["python and imports"] = time.time() - START
_phase = {"name": "before training"}


_stack: list[list] = []  # [part, time spent in nested timed parts] of the parts being timed


@contextmanager
def timed(part: str | None):
    """Adds the wall time of the block to `part`, less the time of the timed parts nested in it (a checkpoint's
    model save is counted once, under checkpoints). `None` times nothing."""
    if part is None:
        yield
        return
    began = time.time()
    _stack.append([part, 0.0])
    try:
        yield
    finally:
        _, nested = _stack.pop()
        elapsed = time.time() - began
        PARTS[part] += elapsed - nested
        if _stack:
            _stack[-1][1] += elapsed


def wrap(owner, name: str, part) -> None:
    """Times `owner.name` under `part` (a name, or a function of the call's arguments that returns one or `None`)."""
    original = getattr(owner, name)

    def timed_call(*args, **kwargs):
        with timed(part(*args, **kwargs) if callable(part) else part):
            return original(*args, **kwargs)

    setattr(owner, name, timed_call)


def _evaluation_part(self, *args, **kwargs) -> str:
    if _phase["name"] != "training":
        return "final evaluation"
    return "step-0 evaluation" if self.state.global_step == 0 else "evaluations during training"


def _final_save(self, output_dir=None, _internal_call: bool = False) -> str | None:
    return None if _internal_call else "final save: weights"


def _train(original):
    def train(self, *args, **kwargs):
        _phase["name"] = "training"
        try:
            # The training loop's own time: `train()` less the timed parts inside it.
            with timed("training loop"):
                return original(self, *args, **kwargs)
        finally:
            _phase["name"] = "after training"

    return train


def main(argv: list[str]) -> dict[str, float]:
    cls = trainer_module.CLIPContrastiveTrainer
    wrap(run, "parse_arguments", "arguments")
    wrap(run, "check_arguments", "arguments")
    wrap(run, "load_model_config", "arguments")
    wrap(run, "load_image_text_data", "data")
    wrap(run, "load_extra_eval_sets", "data")
    wrap(run, "load_processor", "tokenizer and processor")
    wrap(run, "load_model", "model")
    wrap(cls, "__init__", "trainer construction")
    cls.train = _train(cls.train)
    wrap(cls, "evaluate", _evaluation_part)
    wrap(Trainer, "_save_checkpoint", "checkpoints during training")
    wrap(Trainer, "_load_best_model", "loading the best model")
    wrap(cls, "save_model", _final_save)
    wrap(cls, "export_onnx", "final save: ONNX")
    wrap(trainer_module, "save_training_plots", "final save: training curves")
    wrap(cls, "save_retrieval_examples", "final save: retrieval gallery")
    wrap(trainer_module, "write_model_card", "final save: model card")
    began = time.time()
    run.main(argv)
    main_time = time.time() - began
    # The rest of `main`: the train/eval metrics and state files, the card's data.
    PARTS["other (metrics files, logging)"] = main_time - sum(v for k, v in PARTS.items() if k != "python and imports")
    return dict(PARTS)


def _report(parts: dict[str, float]) -> None:
    parts = dict(parts)
    parts["wall to the end of main"] = END["main"] - START
    outside = parts["wall to the end of main"] - parts.get("training loop", 0.0)
    width = max(len(key) for key in parts)
    for key, value in parts.items():
        print(f"{key:<{width}}  {value:7.2f} s", file=sys.stderr)
    print(f"{'outside the training loop':<{width}}  {outside:7.2f} s", file=sys.stderr)
    parts["outside the training loop"] = outside
    print(json.dumps({key: round(value, 3) for key, value in parts.items()}), flush=True)


END: dict[str, float] = {}

if __name__ == "__main__":
    result = main(sys.argv[1:])
    END["main"] = time.time()
    # Registered last, so it runs first at exit: the DataLoader workers' and the interpreter's own shutdown come
    # after it, and only a wall time taken outside the process (`time python ...`) counts them.
    atexit.register(_report, result)
