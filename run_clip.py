#!/usr/bin/env python
"""Train or fine-tune CLIP: `python run_clip.py configs/default.json [--flag value ...]`. See README.md."""

import os
import sys

# OpenMP threads that spin while they wait slow a CPU step by 8x (the demo on 2 cores: README, "CPU runs") as soon
# as a DataLoader worker wants a core. Set before torch loads OpenMP, and only when the user has not chosen.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The command line is checked (and --help answered) before torch is imported.
from clip_trainer.cli import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command(prog="run_clip.py"))
