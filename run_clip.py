#!/usr/bin/env python
"""Train or fine-tune CLIP: `python run_clip.py configs/default.json [--flag value ...]`. See README.md."""

import sys

from clip_trainer.command_line import rerun_in_project_environment
from clip_trainer.threads import set_openmp_environment

# Run by a Python without the install (the system's `python3`) in a clone where `make` made `.venv`: run with it.
rerun_in_project_environment(sys.argv)

# The CPU thread policy (clip_trainer/threads.py), before torch loads OpenMP; a policy the user set wins.
set_openmp_environment()

# The command line is checked (and --help answered) before torch is imported.
from clip_trainer.cli import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command(prog="run_clip.py"))
