"""Smoke test of `benchmarks/throughput.py`: a tiny run on the CPU ends with one JSON line of positive figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.mark.slow
def test_tiny_preset_prints_json_summary_last():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(SCRIPT), "--preset", "tiny", "--steps", "3", "--warmup", "1", "--batch-size", "8"]
    command += ["--repeats", "1"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.strip().splitlines()
    summary = json.loads(lines[-1])

    assert summary["preset"] == "tiny"
    assert summary["batch_size"] == 8
    assert summary["steps"] == 3
    for key in ("device", "torch", "transformers", "date", "precision", "timing", "settings"):
        assert summary[key], key
    for key in ("samples_per_second", "mfu"):
        assert set(summary[key]) == {"a", "b", "c"}
        assert all(value > 0 for value in summary[key].values()), summary[key]
    assert set(summary["data_wait_share"]) == {"a", "b"}
    assert all(0 <= value < 1 for value in summary["data_wait_share"].values())
    for key in ("ratio_a_b", "ratio_a_c", "flops_per_sample", "peak_flops"):
        assert summary[key] > 0, key
    # The human-readable lines come first, one per variant.
    assert sum(line.startswith(("(a)", "(b)", "(c)")) for line in lines) == 3
