#!/usr/bin/env python
"""Train or fine-tune CLIP: `python run_clip.py configs/default.json [--flag value ...]`. See README.md."""

import sys

from clip_trainer.run import cli

if __name__ == "__main__":
    sys.exit(cli())
